"""Triton GPU kernels of umt5_fast, one kernel a module with its launcher beside it.

``bucket`` (the T5 relative-position bucket, shared by both attention kernels), ``attention``
(prefill / encoder attention with the bias computed in-kernel), ``decode_attention`` (one query
row against the static KV cache, split along keys), ``gated_ffn`` (GEMMs with fused activation,
gate product or residual add), ``rms_norm``. ``umt5_fast.ops.triton`` wires them to the ops
contract.
"""
import os


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Kernel modules read this at import time, as ``triton.jit`` does: under the interpreter each
    program instance runs as numpy code, so they use one small fixed launch configuration instead
    of autotuning over GPU-sized ones.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
