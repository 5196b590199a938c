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
import torch.nn.functional as F

try:  # the C++ expansion (csrc/expand_weights.cpp); torch expressions below are the fallback
    import umt5_fast._C as _C
except ImportError:
    _C = None


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


_QUANTIZABLE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _uses_cpu_kernels(qweight: torch.Tensor, dtype: torch.dtype) -> bool:
    return _C is not None and qweight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)


def _output(shape, dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def _into(out: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    return value if out is None else out.copy_(value)


def _expand_int8_blocks(qweight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``qweight * scale`` for int8 ``qweight`` ``[rows, blocks, block]`` (any strides but a
    contiguous last dimension: GGUF blocks are read in place) and ``scale`` ``[rows, blocks]``."""
    if qweight.stride(-1) != 1:
        qweight = qweight.contiguous()
    scale = scale.to(torch.float32).contiguous()
    _C.expand_int8(q=qweight.data_ptr(), row_stride=qweight.stride(0), block_stride=qweight.stride(1),
                   scale=scale.data_ptr(), rows=out.shape[0], cols=out.shape[1], block=qweight.shape[2],
                   dst=out.data_ptr(), to_bf16=out.dtype == torch.bfloat16, num_threads=torch.get_num_threads())
    return out


@dataclass
class PackedWeight:
    """A ``[out, in]`` weight stored as ``qweight`` (8-bit) plus an optional ``scale`` tensor;
    subclasses give the fp32 values of a block of rows (``_dequantize_rows``)."""
    qweight: torch.Tensor
    scale: Optional[torch.Tensor]

    def rows(self, index: torch.Tensor) -> "PackedWeight":
        """The rows ``index`` (1-D) as a packed weight of the same format (a per-tensor scale is shared)."""
        scale = self.scale if self.scale is None or self.scale.dim() == 0 else self.scale[index]
        return type(self)(self.qweight[index], scale)

    def dequantize(self, dtype=torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float weight; written into ``out`` (contiguous, of ``shape`` and ``dtype``) when given."""
        if _uses_cpu_kernels(self.qweight, dtype):
            return self._expand_on_cpu(_output(self.shape, dtype, out))
        return _into(out, expand_in_row_blocks(self.shape, dtype, self._dequantize_rows, self.device))

    def _expand_on_cpu(self, out: torch.Tensor) -> torch.Tensor:
        """``dequantize`` by the C++ kernels into ``out``: same values, one pass (CPU, bf16 / fp32)."""
        raise NotImplementedError

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
        """Per-row int8 of a 2-D float weight. Raises ValueError on inf / NaN (no int8 stands for them)."""
        if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0:
            raise ValueError(f"can only quantise a non-empty 2-D float weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        blocks = cls is W8A8Weight
        if _C is not None and weight.device.type == "cpu" and weight.dtype in _QUANTIZABLE_DTYPES:
            weight = weight.contiguous()
            rows = -(-weight.shape[0] // W8A8Weight.BLOCK_COLUMNS) * W8A8Weight.BLOCK_COLUMNS if blocks else weight.shape[0]
            qweight = (torch.zeros if blocks else torch.empty)((rows, weight.shape[1]), dtype=torch.int8)
            scale = torch.empty(weight.shape[0], dtype=torch.float32)
            finite = _C.quantize_int8_rows(weight=weight.data_ptr(), dtype=_QUANTIZABLE_DTYPES[weight.dtype],
                                           rows=weight.shape[0], cols=weight.shape[1], qweight=qweight.data_ptr(),
                                           scale=scale.data_ptr(), w8a8_blocks=blocks,
                                           num_threads=torch.get_num_threads())
        else:  # the specification of the C++ quantiser above (bit for bit)
            w = weight.float()
            finite = bool(torch.isfinite(w).all())
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            if blocks:
                qweight = W8A8Weight.pack(qweight)
        if not finite:
            raise ValueError("cannot quantise a weight holding inf or NaN to int8")
        return cls(qweight.contiguous(), scale.contiguous())

    def _dequantize_rows(self, rows):
        return self.qweight[rows].float() * self.scale[rows, None]

    def _expand_on_cpu(self, out):
        return _expand_int8_blocks(self.qweight.unsqueeze(1), self.scale, out)


@dataclass
class W8A8Weight(QuantizedWeight):
    """The int8 weights of ``QuantizedWeight``, multiplied with activations quantised to int8 per
    row at run time (``quantize="w8a8"``; CTranslate2's int8 compute): an integer GEMM, 2x the
    multiply rate of bf16 on CPUs with VNNI. ``linear`` gives
    ``float(round(x * (127 / amax)) @ weight.T) * (amax / 127 * scale)``, ``amax`` = max |x| of each row
    (a zero row gives zeros, a row with inf / NaN gives NaN; where 127 / amax overflows, below
    amax ~3.7e-37, the largest float and its reciprocal stand in for 127 / amax and amax / 127).

    ``qweight`` holds the int8 ``[out, in]`` weight in the kernels' column-block order: blocks of
    ``BLOCK_COLUMNS`` output rows (the last one padded with zero rows), each block ``16 * in``
    contiguous bytes, first ``in // 4`` groups of 64 bytes where byte ``4 * j + t`` of group ``g``
    is ``weight[16 * b + j, 4 * g + t]`` (one 32-bit lane per output column: the operand layout of
    ``vpdpbusd``), then the last ``in % 4`` entries of each of the 16 rows, row after row. As a
    tensor: ``[ceil(out / 16) * 16, in]`` int8; ``scale`` ``[out]`` gives ``out``.
    """
    BLOCK_COLUMNS = 16

    def __post_init__(self):
        out_features = self.scale.shape[0]
        blocks = -(-out_features // self.BLOCK_COLUMNS)
        if self.qweight.dim() != 2 or self.qweight.shape[0] != blocks * self.BLOCK_COLUMNS:
            raise ValueError(f"W8A8Weight.qweight must be [{blocks * self.BLOCK_COLUMNS}, in_features] (packed "
                             f"blocks of {self.BLOCK_COLUMNS} of the {out_features} output rows), "
                             f"got {tuple(self.qweight.shape)}")

    @classmethod
    def pack(cls, qweight: torch.Tensor) -> torch.Tensor:
        """int8 ``[out, in]`` rows -> the column-block order of ``qweight`` (see the class)."""
        out_features, in_features = qweight.shape
        padded = F.pad(qweight, (0, 0, 0, -out_features % cls.BLOCK_COLUMNS))
        blocks, groups = padded.shape[0] // cls.BLOCK_COLUMNS, in_features // 4
        by_block = padded.view(blocks, cls.BLOCK_COLUMNS, in_features)
        grouped = by_block[:, :, :4 * groups].reshape(blocks, cls.BLOCK_COLUMNS, groups, 4).transpose(1, 2)
        tail = by_block[:, :, 4 * groups:]
        return torch.cat([grouped.reshape(blocks, -1), tail.reshape(blocks, -1)], dim=1).view(padded.shape)

    def unpacked(self) -> torch.Tensor:
        """The int8 ``[out, in]`` weight in row order (the inverse of ``pack``)."""
        padded_rows, in_features = self.qweight.shape
        blocks, groups = padded_rows // self.BLOCK_COLUMNS, in_features // 4
        by_block = self.qweight.reshape(blocks, -1)
        grouped = by_block[:, :64 * groups].reshape(blocks, groups, self.BLOCK_COLUMNS, 4).transpose(1, 2)
        tail = by_block[:, 64 * groups:].reshape(blocks, self.BLOCK_COLUMNS, -1)
        rows = torch.cat([grouped.reshape(blocks, self.BLOCK_COLUMNS, -1), tail], dim=2)
        return rows.reshape(padded_rows, in_features)[:self.scale.shape[0]]

    @property
    def shape(self):
        return torch.Size((self.scale.shape[0], self.qweight.shape[1]))

    def rows(self, index: torch.Tensor) -> "W8A8Weight":
        return type(self)(self.pack(self.unpacked()[index]), self.scale[index])

    def dequantize(self, dtype=torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Unpacked once, then QuantizedWeight's expansion (not one unpacking per block of rows).
        return QuantizedWeight(self.unpacked(), self.scale).dequantize(dtype, out)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The reference in torch (fp32 ``x`` ``[..., in]``): products summed exactly in fp64."""
        rows = x.reshape(-1, x.shape[-1]).float()
        amax = rows.abs().amax(dim=1, keepdim=True)
        finite = rows.isfinite().all(dim=1, keepdim=True)
        # 127 / amax divided, not 127 * (1 / amax) (torch's scalar / tensor): the kernels' rounding.
        # Below amax ~3.7e-37 it overflows: the largest float instead, and the matching x_scale.
        largest = torch.finfo(torch.float32).max
        inverse = torch.full_like(amax, 127.0) / amax
        overflow = inverse.isinf()
        inverse = torch.where(amax > 0, inverse.clamp(max=largest), torch.zeros_like(amax))
        q = torch.round(rows * inverse).clamp_(-127, 127)
        q = torch.where(finite, q, torch.zeros_like(q))
        x_scale = torch.where(overflow, torch.full_like(amax, 1.0 / largest), amax / 127.0)
        x_scale = torch.where(finite, x_scale, torch.full_like(amax, float("nan")))
        sums = (q.double() @ self.unpacked().double().T).float()  # |sum| < 2^31: exact in fp64
        y = sums * (x_scale * self.scale.float()[None, :])
        return y.view(*x.shape[:-1], self.shape[0])


@dataclass
class W8A8RowWeight(W8A8Weight):
    """``W8A8Weight``'s product, bit for bit, on the int8 ``[out, in]`` rows as ``QuantizedWeight``
    holds them (``qweight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``): the layout
    ``quantize="w8a8"`` loads where the selected C++ kernels multiply it at least as fast
    (``w8a8_format``), and the LM head screen's view of an int8 head (no copy)."""

    def __post_init__(self):
        if self.qweight.dim() != 2 or self.qweight.shape[0] != self.scale.shape[0]:
            raise ValueError(f"W8A8RowWeight.qweight must be [{self.scale.shape[0]}, in_features] (one row per "
                             f"scale), got {tuple(self.qweight.shape)}")

    @classmethod
    def pack(cls, qweight: torch.Tensor) -> torch.Tensor:
        return qweight  # the rows are the layout

    def unpacked(self) -> torch.Tensor:
        return self.qweight

    @property
    def shape(self):
        return self.qweight.shape


def w8a8_format() -> type:
    """The W8A8 layout the CPU kernels of the selected instruction set multiply faster: column blocks
    (``W8A8Weight``) with AVX512-VNNI, rows (``W8A8RowWeight``) otherwise. Either gives the same
    results on every instruction set."""
    return W8A8RowWeight if _C is None or _C.w8a8_row_layout_preferred() else W8A8Weight


@dataclass
class Float8Weight(PackedWeight):
    """fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``) ``[out, in]`` and an optional per-tensor fp32
    ``scale`` (ComfyUI's "scaled fp8"): ``weight = qweight.float() * scale``, else ``qweight`` itself.

    Every fp8 value is exact in fp16/bf16/fp32, so an unscaled weight expands without rounding;
    a scaled one is multiplied in fp32 and rounded once to the target dtype.
    """

    def dequantize(self, dtype=torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.scale is None and not _uses_cpu_kernels(self.qweight, dtype):
            return _into(out, self.qweight.to(dtype))
        return super().dequantize(dtype, out)  # fp32 products: one rounding on any device

    def _dequantize_rows(self, rows):
        return self.qweight[rows].float() * self.scale.float()

    def _expand_on_cpu(self, out):
        # 256 codes: torch computes each value once (as _dequantize_rows does), the kernel looks them up.
        codes = torch.arange(256, dtype=torch.uint8).view(self.qweight.dtype)
        table = codes.to(out.dtype) if self.scale is None else (codes.float() * self.scale.float()).to(out.dtype)
        qweight = self.qweight.contiguous()  # held by a name: a temporary's memory would be freed before the call
        _C.expand_by_table(src=qweight.data_ptr(), n=out.numel(),
                           table=table.data_ptr(), element_bytes=table.element_size(),
                           dst=out.data_ptr(), num_threads=torch.get_num_threads())
        return out


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

    def _expand_on_cpu(self, out):
        return _expand_int8_blocks(self.qweight, self.scale, out)

    def _dequantize_rows(self, rows):
        # int8 * fp16 is exact in fp32 (at most 7 + 11 significant bits): one rounding, to dtype.
        return (self.qweight[rows].float() * self.scale[rows].float()).flatten(1)
