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
    return Tokenizer.from_file(file)


def tokenizer_info(path: str, tokenizer=None) -> TokenizerInfo:
    """Special-token ids and chat template of a tokenizer directory."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    directory = os.path.dirname(path) if path.endswith(".json") else path
    cfg_file = os.path.join(directory, "tokenizer_config.json")
    cfg: dict = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)

    def lookup(key: str) -> Optional[int]:
        name = _token_content(cfg.get(key))
        return tok.token_to_id(name) if name else None

    eos = lookup("eos_token")
    if eos is None:
        eos = next((tok.token_to_id(n) for n in _EOS_FALLBACKS if tok.token_to_id(n) is not None), None)
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
    )


def resolve_eod_token_id(data_cfg) -> int:
    """EOS id used as document separator: the tokenizer's EOS when ``data.tokenizer`` is set,
    else ``data.eod_token_id``."""
    if data_cfg.tokenizer:
        return tokenizer_info(data_cfg.tokenizer).eos_id
    return int(data_cfg.eod_token_id)
