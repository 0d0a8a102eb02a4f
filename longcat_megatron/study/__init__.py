"""The embedding-scaling vs expert-scaling study (``python -m longcat_megatron.study --help``).

spec.py: the YAML spec and the matched model configs; runner.py: the corpus, one run as a training
subprocess, its result file; report.py: the markdown table and the plots. docs/embedding_study.md.
"""
