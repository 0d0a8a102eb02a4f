"""Training data: megatron-core datasets behind ``build_pretrain_iterators`` (pretrain.py) and
``build_sft_iterators`` (sft.py), the DP sampler, fingerprints for exact resume and checks of
indexed ``.bin/.idx`` files. Preprocessing tools live in the top-level ``data_tools`` package."""
