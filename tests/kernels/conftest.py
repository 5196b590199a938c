"""Kernel tests run on the GPU when there is one, else in Triton's CPU interpreter at small shapes.

``TRITON_INTERPRET`` must be set before ``triton`` (and so any kernel module) is imported, because
``triton.jit`` picks the interpreter when the kernel is defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The interpreter's tl.dot multiplies the raw bits of bfloat16 operands, so bf16 runs on CUDA only.
    config.addinivalue_line("markers", "cuda_only: needs a CUDA device (bfloat16 kernels)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (the Triton interpreter mishandles bfloat16 tl.dot)")
    for item in items:
        if "cuda_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def nan_filled(device):
    """``nan_filled(shape, dtype)``: an output buffer poisoned with NaN, so any element a kernel
    fails to write fails the comparison."""
    def make(shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return make
