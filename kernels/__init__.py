"""Triton GPU kernels of umt5_fast, one kernel a module with its launcher beside it.

``bucket`` (the T5 relative-position bucket, shared by both attention kernels), ``attention``
(prefill / encoder attention with the bias computed in-kernel), ``decode_attention`` (one query
row against the static KV cache, split along keys), ``gated_ffn`` (GEMMs with fused activation,
gate product or residual add), ``rms_norm``. ``umt5_fast.ops.triton`` wires them to the ops
contract.
"""
import os

import torch

# Shared memory the autotuning candidates may plan for (H100 allows 227 KB a block, A100 163 KB);
# a candidate that still overflows fails to launch and the autotuner skips it.
SHARED_MEMORY_BUDGET = 192 * 1024


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_configs(tuned, default, interpreter):
    """The autotuning candidates of a kernel, read once when its module is imported (as ``triton.jit``
    reads ``TRITON_INTERPRET``).

    ``interpreter`` alone under the interpreter, where each program runs as numpy code and block
    sizes only need to exercise the tails; ``default`` alone when ``UMT5_FAST_AUTOTUNE=0`` (test
    runs on a GPU, where tuning every shape would cost minutes of compiles); else ``tuned``.
    """
    if interpreted():
        return [interpreter]
    if os.environ.get("UMT5_FAST_AUTOTUNE", "1") == "0":
        return [default]
    return tuned


def input_precision(dtype) -> str:
    """``tl.dot``'s precision: fp32 operands multiply in true fp32 ("ieee"), as torch does by
    default, not in TF32; half-precision operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
