"""Build the quickstart's tiny corpus and tokenizer offline, from text that ships with Python.

Example::

    python -m data_tools.tiny_corpus --out runs/tiny_data
    python -m data_tools.preprocess --input runs/tiny_data/corpus.jsonl \\
        --tokenizer runs/tiny_data/tokenizer --output-prefix runs/tiny_data/corpus --workers 1

Writes ``OUT/corpus.jsonl`` (``{"text": ...}`` documents: English help topics from ``pydoc_data``
and standard-library sources split into ~4 KB pieces, a few MB in all) and ``OUT/tokenizer/``: a
byte-level BPE trained on that corpus with ``tokenizers`` (``tokenizer.json`` plus
``tokenizer_config.json`` naming the special tokens ``<|pad|>`` = 0, ``<|bos|>`` = 1,
``<|endoftext|>`` = 2 (EOS)).
Idempotent: a finished directory (``OUT/.complete`` matching the parameters) is left as it is.
Needs no network; takes a few seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
from typing import Iterator, Optional

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|endoftext|>"]
DEFAULT_VOCAB = 2048
DEFAULT_MAX_MB = 3.0
_PIECE_CHARS = 4096


def split_pieces(text: str, piece_chars: int = _PIECE_CHARS) -> Iterator[str]:
    """Pieces of about ``piece_chars`` characters cut at blank lines (tiny leftovers dropped)."""
    piece: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        piece.append(block)
        size += len(block) + 2
        if size >= piece_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
    if piece and size > 200:
        yield "\n\n".join(piece)


def corpus_documents(max_bytes: int) -> Iterator[str]:
    """Deterministic documents from the running Python's own help texts and sources."""
    total = 0
    try:
        from pydoc_data.topics import topics

        sources = [topics[k] for k in sorted(topics)]
    except ImportError:  # stripped Python builds
        sources = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            sources.append(f.read())
    for text in sources:
        for piece in split_pieces(text):
            if total >= max_bytes:
                return
            total += len(piece.encode("utf-8"))
            yield piece


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with our special tokens (ids 0..2) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer_dir(tok, directory: str) -> None:
    """tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer)."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<|pad|>",
        "bos_token": "<|bos|>",
        "eos_token": "<|endoftext|>",
        "model_max_length": 1 << 17,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("pad_token", "bos_token", "eos_token")}, f, indent=1)


def build_tiny_corpus(out: str, *, vocab_size: int = DEFAULT_VOCAB, max_mb: float = DEFAULT_MAX_MB) -> dict:
    """Create ``out/corpus.jsonl`` and ``out/tokenizer/`` unless already complete; returns the stamp."""
    stamp = {"vocab_size": vocab_size, "max_mb": max_mb, "python": sys.version.split()[0], "format": 1}
    stamp_file = os.path.join(out, ".complete")
    if os.path.isfile(stamp_file):
        with open(stamp_file) as f:
            if json.load(f) == stamp:
                return stamp
    tmp = out.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        docs = list(corpus_documents(int(max_mb * (1 << 20))))
        with open(os.path.join(tmp, "corpus.jsonl"), "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        save_tokenizer_dir(train_tokenizer(docs, vocab_size), os.path.join(tmp, "tokenizer"))
        os.makedirs(out, exist_ok=True)
        for name in ("corpus.jsonl", "tokenizer"):
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        with open(stamp_file, "w") as f:
            json.dump(stamp, f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stamp


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.tiny_corpus", description=__doc__.split("Example::")[0].strip(),
        epilog=__doc__.split("Example::")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory (corpus.jsonl, tokenizer/)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help=f"BPE vocabulary (default {DEFAULT_VOCAB})")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"corpus size in MiB (default {DEFAULT_MAX_MB})")
    args = parser.parse_args(argv)
    build_tiny_corpus(args.out, vocab_size=args.vocab_size, max_mb=args.max_mb)
    print(f"tiny corpus ready: {args.out}/corpus.jsonl, tokenizer in {args.out}/tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
