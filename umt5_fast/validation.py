"""Checks at the API boundary: each raises with the argument's name and the problem."""
import torch


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
    if device is not None and ids.device != torch.device(device):
        raise ValueError(f"{name} is on {ids.device} but the model is on {device}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_embeds(name: str, embeds, d_model: int, device=None, dtype=None):
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
    if device is not None and embeds.device != torch.device(device):
        raise ValueError(f"{name} is on {embeds.device} but the model is on {device}")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def check_mask(name: str, mask, shape, device=None, require_visible=True) -> torch.Tensor:
    """Validate a 0/1 padding mask of ``shape``; return it as bool (True = attend)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (matching the inputs), got {tuple(mask.shape)}")
    if device is not None and mask.device != torch.device(device):
        raise ValueError(f"{name} is on {mask.device} but the model is on {device}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (1 = attend), got other values")
    keep = mask.bool()
    if require_visible and not bool(keep.any(dim=-1).all()):
        row = int((~keep.any(dim=-1)).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} is all padding: every sequence needs at least one token")
    return keep


def check_labels(labels, expected_shape=None):
    """Integer ``[batch, length]`` labels (-100 = ignored), of ``expected_shape`` when it is known."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.long, torch.int32):
        raise TypeError("labels must be an integer torch.Tensor [batch, length] (-100 = ignored)")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [batch, length], got {tuple(labels.shape)}")
    if expected_shape is not None and tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} (matching the inputs), "
                         f"got {tuple(labels.shape)}")


def same_batch(name_a: str, a: int, name_b: str, b: int):
    if a != b:
        raise ValueError(f"{name_a} has batch size {a} but {name_b} has batch size {b}")
