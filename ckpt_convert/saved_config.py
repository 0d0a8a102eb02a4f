"""The model config saved next to a checkpoint (``run_config.yaml``), read by the exporter and by
``--verify``; its own module so that ``to_hf.py`` and ``verify.py`` do not import each other."""

from __future__ import annotations

import os

from ckpt_convert import ConversionError

RUN_CONFIG = "run_config.yaml"


def load_model_config(iter_dir: str):
    """The ModelConfig saved next to the checkpoint (``run_config.yaml``'s model section)."""
    import yaml

    from longcat_megatron.config import ConfigError, build_section
    from longcat_megatron.model.config import ModelConfig

    path = os.path.join(iter_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"'{path}' is missing: the converter needs the run config saved with "
                              "the checkpoint to know the model shape")
    tree = yaml.safe_load(open(path)) or {}
    try:
        cfg = build_section(ModelConfig, tree.get("model") or {}, "model")
        cfg.validate()
    except (ConfigError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None
    return cfg
