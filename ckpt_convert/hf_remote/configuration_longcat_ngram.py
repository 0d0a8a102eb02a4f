"""Configuration of LongCat-Flash models with N-gram Embedding (``model_type: longcat_flash_ngram``).

Shipped next to exported weights (``auto_map`` in config.json) so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works offline. Written for the
longcat-megatron project from the released LongCat-Flash-Lite semantics.
"""

from huggingface_hub.dataclasses import strict
from transformers import LongcatFlashConfig


@strict
class LongcatFlashNgramConfig(LongcatFlashConfig):
    r"""LongcatFlashConfig plus the N-gram Embedding fields.

    ngram_vocab_size_ratio (`int`, defaults to 78):
        Base rows of each n-gram sub-table as a multiple of `vocab_size`; sub-table `i` has
        `ngram_vocab_size_ratio * vocab_size + 2*i + 1` rows (its hash modulus).
    emb_neighbor_num (`int`, defaults to 4):
        N, the largest n-gram order (including the current token); orders 2..N get tables.
    emb_split_num (`int`, defaults to 4):
        K, sub-tables per order; each has `hidden_size // (K*(N-1))` columns.
    """

    model_type = "longcat_flash_ngram"

    ngram_vocab_size_ratio: int | float = 78
    emb_neighbor_num: int = 4
    emb_split_num: int = 4


__all__ = ["LongcatFlashNgramConfig"]
