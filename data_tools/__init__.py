"""Offline data tools: preprocessing to megatron-core indexed datasets, merging, SFT data, the tiny corpus,
N-gram hash-collision diagnostics."""
