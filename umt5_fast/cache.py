"""Decoder KV caches.

Both caches keep, per decoder layer, the self-attention K/V written so far and the
cross-attention K/V projected once from the encoder output. ``StaticCache`` preallocates
``[B, H, S_max, D]`` buffers for the longest possible output (generation: no per-step allocation,
beams reordered by index into a spare buffer); ``DynamicCache`` grows by concatenation (the
``forward(use_cache=True)`` API, where the final length is unknown).
"""
from typing import List, Optional, Tuple

import torch

KV = Tuple[torch.Tensor, torch.Tensor]


class DynamicCache:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.self_kv: List[Optional[KV]] = [None] * num_layers
        self.cross_kv: List[Optional[KV]] = [None] * num_layers
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def batch_size(self) -> Optional[int]:
        """Rows held (None while empty)."""
        kv = self.self_kv[0] if self.num_layers else None
        return None if kv is None else kv[0].shape[0]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> KV:
        """Store K/V ``[B, H, L, D]`` of positions ``start..start+L-1``; return all cached so far.

        The cache owns contiguous copies, as transformers' DynamicCache (which concatenates onto an
        empty tensor) does: torch's reduced-precision matmul rounds differently for a transposed
        view than for a contiguous K on some CPUs (AVX2 without AVX512-BF16), so the layout is part
        of matching transformers' bf16 results."""
        old = self.self_kv[layer]
        if old is not None:
            keys = torch.cat([old[0][:, :, :start], keys], dim=2)
            values = torch.cat([old[1][:, :, :start], values], dim=2)
        self.self_kv[layer] = (keys.contiguous(), values.contiguous())
        return self.self_kv[layer]

    def reorder(self, index: torch.Tensor):
        """Keep rows ``index`` (in that order, repeats allowed), self- and cross-attention alike."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        self.cross_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv]

    # transformers' Cache methods that hand-written decoding loops call
    def reorder_cache(self, beam_idx: torch.Tensor):
        self.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self.reorder(indices)

    def batch_repeat_interleave(self, repeats: int):
        rows = self.batch_size()
        if rows is not None:
            self.reorder(torch.arange(rows, device=self.self_kv[0][0].device).repeat_interleave(repeats))

    def crop(self, max_length: int):
        """Keep the first ``max_length`` positions (negative: drop that many from the end)."""
        if max_length < 0:
            max_length = self.length + max_length
        if max_length >= self.length:
            return
        self.self_kv = [None if kv is None else (kv[0][:, :, :max_length].contiguous(),
                                                 kv[1][:, :, :max_length].contiguous()) for kv in self.self_kv]
        self.length = max(max_length, 0)

    def __len__(self):  # layers holding K/V, as transformers counts them
        return len(self.to_legacy_cache())

    def __getitem__(self, layer: int):
        return self.to_legacy_cache()[layer]

    def __iter__(self):
        return iter(self.to_legacy_cache())

    def to_legacy_cache(self):
        """transformers' tuple format: per layer (self_k, self_v, cross_k, cross_v), for the layers that
        hold K/V."""
        return tuple(tuple(self.self_kv[i]) + (tuple(self.cross_kv[i]) if self.cross_kv[i] else ())
                     for i in range(self.num_layers) if self.self_kv[i] is not None)

    @classmethod
    def from_legacy_cache(cls, legacy) -> "DynamicCache":
        """From transformers' tuples, as ``validation.check_legacy_cache`` accepts them."""
        cache = cls(len(legacy))
        for i, layer in enumerate(legacy):
            cache.self_kv[i] = (layer[0], layer[1])
            if len(layer) == 4:
                cache.cross_kv[i] = (layer[2], layer[3])
        cache.length = legacy[0][0].shape[2] if legacy else 0
        return cache


class StaticCache:
    """Preallocated decoder cache for up to ``max_length`` positions of ``batch_size`` rows.

    ``initial_length`` (default: all of ``max_length``) is how many positions are allocated at
    first; past them the buffers double (at most to ``max_length``), so that a generous
    ``max_new_tokens`` costs memory only for the positions a generation reaches.
    ``fixed_buffers=True`` keeps the same storage for the cache's whole life (all ``max_length``
    positions; beam reorders copy back instead of swapping buffers), which a captured CUDA graph needs.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, d_kv: int,
                 dtype: torch.dtype, device, fixed_buffers: bool = False, initial_length: Optional[int] = None):
        capacity = max_length if fixed_buffers or initial_length is None else min(max_length, initial_length)
        shape = (num_layers, batch_size, num_heads, capacity, d_kv)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._spare: Optional[KV] = None  # reorder target, allocated on the first beam reorder
        self.cross_kv: List[Optional[KV]] = [None] * num_layers
        self.num_layers = num_layers
        self.max_length = max_length
        self.fixed_buffers = fixed_buffers
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions allocated now."""
        return self.keys.shape[3]

    def reserve(self, length: int):
        """Make room for ``length`` positions (at most ``max_length``)."""
        if length > self.max_length:
            raise ValueError(f"the decoder sequence ({length} positions) is longer than the cache allows "
                             f"({self.max_length}); allocate a larger StaticCache")
        if length <= self.capacity:
            return
        capacity = min(self.max_length, max(length, 2 * self.capacity))
        grown = []
        for old in (self.keys, self.values):
            new = old.new_zeros(old.shape[:3] + (capacity, old.shape[4]))
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            grown.append(new)
        self.keys, self.values = grown
        self._spare = None

    def get_seq_length(self) -> int:
        return self.length

    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start) -> KV:
        if isinstance(start, torch.Tensor):
            # position on the device (a CUDA graph replays this): scatter, no host-side bound check
            positions = start + torch.arange(keys.shape[2], device=keys.device)
            self.keys[layer].index_copy_(2, positions, keys)
            self.values[layer].index_copy_(2, positions, values)
            return self.keys[layer], self.values[layer]
        end = start + keys.shape[2]
        self.reserve(end)
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def as_dynamic(self) -> DynamicCache:
        """The positions written so far, copied into a ``DynamicCache`` (which forward takes to go on;
        copies, as a CUDA graph's cache is the next call's)."""
        cache = DynamicCache(self.num_layers)
        for layer in range(self.num_layers):
            cache.self_kv[layer] = tuple(t[layer, :, :, :self.length].clone(memory_format=torch.contiguous_format)
                                         for t in (self.keys, self.values))
        cache.cross_kv = [None if kv is None else tuple(t.clone() for t in kv) for kv in self.cross_kv]
        cache.length = self.length
        return cache

    def keep_rows(self, index: torch.Tensor):
        """Shrink to rows ``index`` (one copy of the live cache; the dropped rows' memory is freed)."""
        self.keys, self.values = self.keys[:, index], self.values[:, index]
        self._spare = None
        self.cross_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv]

    def layer_buffers(self, layer: int) -> KV:
        """The full ``[B, H, capacity, D]`` buffers of a layer (for the decode-attention kernels)."""
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.Tensor):
        """Rows ``index`` become the new rows (beam search), copied into a spare buffer: no growth.

        ``index`` must keep every row within its source's group of beams."""
        if self._spare is None:
            self._spare = (torch.empty_like(self.keys), torch.empty_like(self.values))
        # Only the positions written so far move: the rest are never read before a step writes
        # them (the whole capacity would cost up to capacity / length times the copy).
        live = slice(0, self.length)
        for source, spare in zip((self.keys, self.values), self._spare):
            torch.index_select(source[:, :, :, live], 1, index, out=spare[:, :, :, live])
        if self.fixed_buffers:
            for target, spare in zip((self.keys, self.values), self._spare):
                target[:, :, :, live].copy_(spare[:, :, :, live])
            return
        self._spare, (self.keys, self.values) = (self.keys, self.values), self._spare
        # Cross-attention K/V are not reordered: beams only ever move within one source row, whose
        # beams all hold the same encoder output.
