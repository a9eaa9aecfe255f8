"""Compiling a model in place with torch.compile, so that forward hooks (taps) keep firing."""

from __future__ import annotations

import logging

import torch
from torch import nn


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one message."""
        return not str(record.msg).startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME_NOTE = _NoCudaRuntimeNote()


def compile_in_place(model: nn.Module, mode: str = "default") -> None:
    """`model.compile(mode=mode)`, with TorchDynamo guarding on module hooks.

    Dynamo shares a compiled forward between instances of one class and by default does not check
    their hooks, so a student compiled without taps (a `train` stage) would lend its graph to the
    same architecture with taps (the `distill` stage after it), whose hooks would then never fire.
    Guarding on hooks (a process-wide dynamo setting) makes each keep its own graph.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # Compiling for the CPU, inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime
    # is found" when a CUDA toolkit is installed but no GPU is usable: nothing CUDA is built here, so
    # the warning only misleads. The filter drops that one message (addFilter adds it once).
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME_NOTE)
    model.compile(mode=mode)
