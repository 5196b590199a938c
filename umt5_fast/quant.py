"""Packed 8-bit linear weights: kept compressed in memory, expanded one layer at a time.

``QuantizedWeight``: our weight-only int8 (per-output-channel symmetric scales), read as is by the
int8 kernels. ``Float8Weight`` and ``Q8_0Weight`` hold checkpoint formats as stored (fp8
safetensors, GGUF Q8_0 blocks); ``Linear`` expands them to the activations' dtype right before
each call. All share one interface: ``dequantize(dtype)``, ``shape``, ``device``, ``dtype``,
``to(device)``, and are made of two tensors, ``qweight`` and ``scale`` (the buffers ``Linear``
stores).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch


ROW_BLOCK_ELEMENTS = 1 << 22  # fp32 scratch of one block of rows: 16 MiB


def expand_in_row_blocks(shape, dtype: torch.dtype, rows_fn: Callable[[slice], torch.Tensor],
                         device=None) -> torch.Tensor:
    """A ``shape`` tensor of ``dtype`` filled from ``rows_fn(rows) -> fp32 rows`` (rows of the 2-D
    ``[-1, shape[-1]]`` view), one block of rows at a time: each value is rounded once, and the fp32
    scratch stays small whatever the matrix (e.g. a 1B-entry embedding)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    rows = out.view(-1, shape[-1])
    step = max(1, ROW_BLOCK_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        rows[start:start + step] = rows_fn(slice(start, start + step))
    return out


@dataclass
class PackedWeight:
    """A ``[out, in]`` weight stored as ``qweight`` (8-bit) plus an optional ``scale`` tensor;
    subclasses give the fp32 values of a block of rows (``_dequantize_rows``)."""
    qweight: torch.Tensor
    scale: Optional[torch.Tensor]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return expand_in_row_blocks(self.shape, dtype, self._dequantize_rows, self.device)

    def _dequantize_rows(self, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self):
        return self.qweight.shape

    @property
    def device(self):
        return self.qweight.device

    @property
    def dtype(self):
        return self.qweight.dtype

    def to(self, device):
        return type(self)(self.qweight.to(device), None if self.scale is None else self.scale.to(device))


@dataclass
class QuantizedWeight(PackedWeight):
    """``weight ~= qweight.float() * scale[:, None]``; ``qweight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "QuantizedWeight":
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(qweight.contiguous(), scale.contiguous())

    def _dequantize_rows(self, rows):
        return self.qweight[rows].float() * self.scale[rows, None]


@dataclass
class Float8Weight(PackedWeight):
    """fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``) ``[out, in]`` and an optional per-tensor fp32
    ``scale`` (ComfyUI's "scaled fp8"): ``weight = qweight.float() * scale``, else ``qweight`` itself.

    Every fp8 value is exact in fp16/bf16/fp32, so an unscaled weight expands without rounding;
    a scaled one is multiplied in fp32 and rounded once to the target dtype.
    """

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.scale is None:
            return self.qweight.to(dtype)
        if self.qweight.device.type == "cpu":
            # A 0-d CPU scale enters the multiply as an fp32 scalar: one rounding, and no fp32 scratch.
            return self.qweight.to(dtype).mul_(self.scale.float())
        return super().dequantize(dtype)  # fp32 blocks of rows: one rounding on any device

    def _dequantize_rows(self, rows):
        return self.qweight[rows].float() * self.scale.float()


@dataclass
class Q8_0Weight(PackedWeight):
    """ggml's Q8_0 (llama.cpp ``block_q8_0``: an fp16 scale ``d`` then 32 int8 values, 34 bytes):
    ``weight[r, 32 * b + j] = d[r, b] * q[r, b, j]``.

    ``qweight`` int8 ``[out, in / 32, 32]`` and ``scale`` fp16 ``[out, in / 32, 1]``; built by
    ``from_blocks`` they are zero-copy views of the file's blocks (e.g. a memory-mapped GGUF).
    """
    BLOCK_SIZE = 32
    BLOCK_BYTES = 2 + BLOCK_SIZE

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> "Q8_0Weight":
        """``blocks``: uint8 ``[out, in / 32 * 34]``, each row a run of 34-byte Q8_0 blocks."""
        split = blocks.view(blocks.shape[0], -1, cls.BLOCK_BYTES)
        return cls(split[..., 2:].view(torch.int8), split[..., :2].view(torch.float16))

    @property
    def shape(self):
        rows, blocks, block_size = self.qweight.shape
        return torch.Size((rows, blocks * block_size))

    def _dequantize_rows(self, rows):
        # int8 * fp16 is exact in fp32 (at most 7 + 11 significant bits): one rounding, to dtype.
        return (self.qweight[rows].float() * self.scale[rows].float()).flatten(1)
