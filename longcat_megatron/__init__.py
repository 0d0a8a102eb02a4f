"""longcat-megatron: train LongCat-Flash(-Lite) models on megatron-core."""

import os as _os

# megatron-core's @jit_fuser uses torch.compile; on CPU that costs ~30 s per new shape and gains
# nothing. Must be set before torch._dynamo reads its config.
if _os.environ.get("LONGCAT_ALLOW_DYNAMO") != "1":
    _os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

__version__ = "0.1.0"
