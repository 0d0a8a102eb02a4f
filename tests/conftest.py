import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus + byte-level BPE tokenizer directory (data_tools.tiny_corpus), one per test module."""
    from data_tools.tiny_corpus import build_tiny_corpus

    out = str(tmp_path_factory.mktemp("tiny"))
    build_tiny_corpus(out, vocab_size=512, max_mb=0.25)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny):
    """The tiny corpus's tokenizer (``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tiny, "tokenizer", "tokenizer.json"))
