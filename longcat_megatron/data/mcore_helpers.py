"""Make sure megatron-core's compiled dataset helpers (``helpers_cpp``) can be imported.

The megatron-core 0.16.1 wheel ships ``megatron/core/datasets/helpers_cpp.*.so`` (built for CPU, no
CUDA needed), so a normal ``pip install -r requirements.txt`` needs nothing else. A source install
(e.g. an editable Megatron-LM checkout) has only ``helpers.cpp``; megatron-core then expects the
caller to run its ``compile_helpers()`` (``make`` + a C++ compiler + ``pybind11``) on one process.
"""

from __future__ import annotations

import importlib

import torch

from longcat_megatron.errors import UserInputError


class HelpersUnavailableError(UserInputError):
    """The C++ dataset helpers are missing and could not be compiled; the message says what to install."""


def ensure_dataset_helpers() -> None:
    """Import ``helpers_cpp``, compiling it once (rank 0, others wait) when it is missing."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError:
        pass
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        from megatron.core.datasets.utils import compile_helpers

        try:
            compile_helpers()
        except SystemExit as exc:  # megatron calls sys.exit(1) on failure
            raise HelpersUnavailableError(
                "megatron-core's C++ dataset helpers are missing and `make -C megatron/core/datasets` "
                "failed. Install a C++ compiler, make and `pip install pybind11`, or install the "
                "megatron-core wheel (`pip install megatron-core==0.16.1`), which ships them prebuilt."
            ) from exc
    if distributed:
        torch.distributed.barrier()
    importlib.invalidate_caches()
    importlib.import_module("megatron.core.datasets.helpers_cpp")
