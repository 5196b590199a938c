"""Checks at the API boundary: each raises with the argument's name and the problem."""
import torch


def check_device(name: str, tensor: torch.Tensor, device):
    """``tensor`` is on the model's ``device`` (None: not checked)."""
    if device is not None and tensor.device != torch.device(device):
        raise ValueError(f"{name} is on {tensor.device} but the model is on {device}")


def check_ids(name: str, ids, vocab_size: int, device=None, allow_none=True):
    if ids is None:
        if allow_none:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, sequence_length], got {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(ids.shape)})")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} has zero-length sequences (shape {tuple(ids.shape)})")
    check_device(name, ids, device)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_embeds(name: str, embeds, d_model: int, device=None, dtype=None, require_finite=True):
    if embeds is None:
        return
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if dtype is not None and embeds.dtype != dtype:
        raise TypeError(f"{name} has dtype {embeds.dtype} but the model's embeddings are {dtype}")
    if embeds.dim() != 3 or embeds.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape [batch, sequence_length, d_model={d_model}], "
                         f"got {tuple(embeds.shape)}")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(embeds.shape)})")
    check_device(name, embeds, device)
    if require_finite and not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def check_mask(name: str, mask, shape, device=None) -> torch.Tensor:
    """Validate a 0/1 padding mask of ``shape``; return it as bool (True = attend). A row of padding
    only is allowed: as in transformers (its additive mask, finfo.min, swamps every score alike), a
    query that sees no key attends to all keys uniformly, which every backend's attention does."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (matching the inputs), got {tuple(mask.shape)}")
    check_device(name, mask, device)
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (1 = attend), got other values")
    return mask.bool()


def check_additive_mask(name: str, mask: torch.Tensor, shape, device) -> torch.Tensor:
    """transformers' 4-D decoder mask ``[batch or 1, heads or 1, queries, >= keys]`` of ``shape``'s
    sizes: added to the attention scores as it is (0 = attend, a large negative value = masked), in
    place of the causal and padding masks; so a floating dtype, not a 0/1 or bool mask."""
    batch, heads, queries, keys = shape
    if not mask.is_floating_point():
        raise ValueError(f"a 4-D {name} is added to the attention scores, as transformers adds it: pass a "
                         f"floating mask (0 where attending, a large negative value where masked), got {mask.dtype}")
    if (mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads) or mask.shape[2] != queries
            or mask.shape[3] < keys):
        raise ValueError(f"a 4-D {name} must have shape [{batch} or 1, {heads} or 1, {queries}, >= {keys}] "
                         f"(batch, heads, queries, keys), got {tuple(mask.shape)}")
    check_device(name, mask, device)
    return mask


def check_labels(labels, num_classes: int, expected_shape=None):
    """Integer ``[batch, length]`` labels in ``[0, num_classes)`` or -100 (ignored), of
    ``expected_shape`` when it is known."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.long, torch.int32):
        raise TypeError("labels must be an integer torch.Tensor [batch, length] (-100 = ignored)")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [batch, length], got {tuple(labels.shape)}")
    if expected_shape is not None and tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} (matching the inputs), "
                         f"got {tuple(labels.shape)}")
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ValueError(f"labels holds {int(bad[0])}, outside [0, {num_classes}) (and not -100, ignored)")


def check_legacy_cache(legacy, num_layers: int, num_heads: int, d_kv: int, dtype: torch.dtype, device):
    """transformers' tuple cache: per decoder layer (self K, self V[, cross K, cross V]), each
    ``[batch, num_heads, length, d_kv]`` of the model's dtype, one batch and self length in all."""
    if not isinstance(legacy, (tuple, list)) or len(legacy) != num_layers:
        raise ValueError(f"past_key_values must be a cache returned by this model or a tuple of "
                         f"{num_layers} per-layer tuples")
    self_shape = None
    for i, layer in enumerate(legacy):
        if not isinstance(layer, (tuple, list)) or len(layer) not in (2, 4):
            raise ValueError(f"past_key_values[{i}] must hold 2 or 4 tensors (self K/V, cross K/V)")
        for j, t in enumerate(layer):
            name = f"past_key_values[{i}][{j}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[1] != num_heads or t.shape[3] != d_kv:
                raise ValueError(f"{name} must have shape [batch, num_heads={num_heads}, length, d_kv={d_kv}], "
                                 f"got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the model computes in {dtype}")
            check_device(name, t, device)
        if self_shape is None:
            self_shape = layer[0].shape
        if layer[0].shape != self_shape or layer[1].shape != self_shape:
            raise ValueError(f"past_key_values[{i}] self-attention K/V have shapes {tuple(layer[0].shape)} and "
                             f"{tuple(layer[1].shape)}; every layer's must be {tuple(self_shape)}")
        if len(layer) == 4 and (layer[2].shape != layer[3].shape or layer[2].shape[0] != self_shape[0]):
            raise ValueError(f"past_key_values[{i}] cross-attention K/V have shapes {tuple(layer[2].shape)} and "
                             f"{tuple(layer[3].shape)}; they must match, with batch {self_shape[0]}")


def same_batch(name_a: str, a: int, name_b: str, b: int):
    if a != b:
        raise ValueError(f"{name_a} has batch size {a} but {name_b} has batch size {b}")
