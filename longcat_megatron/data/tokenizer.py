"""Local Hugging Face tokenizer directories (``tokenizer.json`` + ``tokenizer_config.json``), offline.

Only the fast ``tokenizers`` library is needed to tokenize; the special tokens (EOS/BOS/pad) and the
optional chat template come from ``tokenizer_config.json`` as written by ``transformers``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from longcat_megatron.errors import UserInputError

# Names tried, in order, when tokenizer_config.json does not name an EOS token.
_EOS_FALLBACKS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class TokenizerDirError(UserInputError):
    """The tokenizer directory is missing files or special tokens; the message says which."""


@dataclass
class TokenizerInfo:
    """What the data tools need from a tokenizer directory."""

    path: str
    vocab_size: int
    eos_id: int
    bos_id: Optional[int]
    pad_id: Optional[int]
    chat_template: Optional[str]
    # Set when tokenizer_config.json names no eos_token and a well-known name was used instead.
    eos_note: Optional[str] = None


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a directory (or a ``tokenizer.json`` file)."""
    from tokenizers import Tokenizer

    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise TokenizerDirError(
            f"tokenizer: '{file}' does not exist. Give a local Hugging Face tokenizer directory that "
            "holds tokenizer.json (save one with `tokenizer.save_pretrained(DIR)`)."
        )
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TokenizerDirError(
            f"tokenizer: '{file}' cannot be loaded ({str(exc).splitlines()[0][:200]}): it is corrupt or not a "
            "Hugging Face fast-tokenizer file. Re-save it with `tokenizer.save_pretrained(DIR)`."
        ) from None


def tokenizer_info(path: str, tokenizer=None) -> TokenizerInfo:
    """Special-token ids and chat template of a tokenizer directory."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    directory = os.path.dirname(path) if path.endswith(".json") else path
    cfg_file = os.path.join(directory, "tokenizer_config.json")
    cfg: dict = {}
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file, encoding="utf-8-sig") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerDirError(
                f"tokenizer: '{cfg_file}' is not valid JSON ({exc}). Fix it, or re-save the tokenizer with "
                "`tokenizer.save_pretrained(DIR)`."
            ) from None
        if not isinstance(cfg, dict):
            raise TokenizerDirError(f"tokenizer: '{cfg_file}' must hold a JSON object, not {type(cfg).__name__}")

    def lookup(key: str) -> Optional[int]:
        name = _token_content(cfg.get(key))
        if not name:
            return None
        if not isinstance(name, str) or tok.token_to_id(name) is None:
            if key != "eos_token":
                return None  # an unknown BOS/pad is reported where it is needed (--bos)
            raise TokenizerDirError(
                f"tokenizer: {key} {name!r} in '{cfg_file}' is not in the vocabulary of tokenizer.json. "
                f"Set {key} to a token the tokenizer has (or remove it)."
            )
        return tok.token_to_id(name)

    eos = lookup("eos_token")
    note = None
    if eos is None:
        name = next((n for n in _EOS_FALLBACKS if tok.token_to_id(n) is not None), None)
        if name is not None:
            eos = tok.token_to_id(name)
            note = (f"tokenizer_config.json names no eos_token; using {name!r} (id {eos}) as EOS. Set eos_token "
                    f"in '{cfg_file}' to make this explicit.")
    if eos is None:
        raise TokenizerDirError(
            f"tokenizer '{directory}': no EOS token found (set eos_token in tokenizer_config.json); "
            "documents must end with EOS"
        )
    template = cfg.get("chat_template")
    template_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    return TokenizerInfo(
        path=directory,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=eos,
        bos_id=lookup("bos_token"),
        pad_id=lookup("pad_token"),
        chat_template=template if isinstance(template, str) else None,
        eos_note=note,
    )


def resolve_eod_token_id(data_cfg) -> int:
    """EOS id used as document separator: the tokenizer's EOS when ``data.tokenizer`` is set,
    else ``data.eod_token_id``."""
    if data_cfg.tokenizer:
        return tokenizer_info(data_cfg.tokenizer).eos_id
    return int(data_cfg.eod_token_id)
