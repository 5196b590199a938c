"""Single-file text-encoder formats (see docs/formats.md).

``comfy``: ComfyUI text-encoder safetensors (fp16 / bf16 / fp8 / scaled fp8), transformers' names;
``gguf``: llama.cpp ``t5encoder`` GGUF files (city96's conversions); ``wan``: Wan's
``models_t5_umt5-xxl-enc-bf16.pth`` (or a safetensors file with its names). Each module holds one
table from its tensor names to ours and a ``read``; this module picks the format from the file.
"""
from pathlib import Path
from typing import Optional

from umt5_fast.config import UMT5Config
from umt5_fast.formats import comfy, common, wan
from umt5_fast.formats.common import FormatCheckpoint
from umt5_fast.loading import CheckpointError

__all__ = ["detect", "read", "FormatCheckpoint"]

_TENSOR_FILE_FORMATS = (wan, comfy)  # told apart by their tensor names (wan's are not transformers')


def detect(path) -> str:
    """The format of ``path`` ("comfy", "gguf" or "wan"), from the file itself: the GGUF magic, else
    the tensor names of a safetensors / torch-saved file."""
    return _open(Path(path))[0]


def read(path, config: Optional[UMT5Config] = None) -> FormatCheckpoint:
    """``(config, sources, shapes, packed)`` of one file, under our (transformers') tensor names.

    ``config``: use it (e.g. from a config.json next to the file) instead of inferring one from the
    file's metadata and tensor shapes. Sources are lazy: nothing is read until a source is called.
    """
    path = Path(path)
    name, opened = _open(path)
    module = _gguf_module() if name == "gguf" else {m.NAME: m for m in _TENSOR_FILE_FORMATS}[name]
    return module.read(path, opened, config)


def _open(path: Path):
    """(format name, the opened file) -- one open serves both detection and reading."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".gguf" or _starts_with_gguf_magic(path):
        gguf_format = _gguf_module()
        return gguf_format.NAME, gguf_format.open_file(path)
    if suffix not in common.SAFETENSORS_SUFFIXES + common.TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint file type {suffix!r}; expected .safetensors, .gguf or a "
                              f"torch-saved state dict ({', '.join(common.TORCH_SUFFIXES)})")
    file = common.TensorFile(path)
    for module in _TENSOR_FILE_FORMATS:
        if module.claims(file.shapes):
            return module.NAME, file
    raise CheckpointError(f"{path}: no tensor has a name of a known UMT5 text-encoder layout (transformers / "
                          f"ComfyUI, Wan); first names: {sorted(file.shapes)[:8]}")


def _starts_with_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"  # the file magic of every GGUF version


def _gguf_module():
    """The GGUF reader, imported only for GGUF files: it needs the optional ``gguf`` package."""
    try:
        from umt5_fast.formats import gguf as gguf_format
    except ImportError as exc:
        raise ImportError(f"reading GGUF files needs the `gguf` package (pip install gguf): {exc}") from exc
    return gguf_format
