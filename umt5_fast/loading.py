"""Checkpoints in and out: transformers directories (safetensors single or sharded, safe .bin).

Load path: config.json -> model skeleton on the meta device -> each checkpoint tensor is either
used in place (a memory-mapped view, when dtype and device already match) or converted once into
its parameter -> checks (missing / unexpected / mis-shaped keys, all listed in one error).
"""
import ctypes
import json
import mmap
import os
import struct
import sys
import weakref
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, Optional

import torch
import torch.nn as nn

from umt5_fast.config import CONFIG_NAME, UMT5Config, dtype_name, read_json_object
from umt5_fast.generation import DEFAULTS as GENERATION_DEFAULTS, GenerationSettings, settings_dict
from umt5_fast.quant import PackedWeight

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def with_variant(name: str, variant: Optional[str]) -> str:
    """transformers' file name of a weights ``variant`` ("model.safetensors" -> "model.fp16.safetensors",
    "model.safetensors.index.json" -> "model.safetensors.index.fp16.json")."""
    if variant is not None and not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'fp16', got {variant!r}")
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Heads and stacks of other UMT5 task classes: present in a checkpoint of another class, unused here.
_TASK_PREFIXES = ("encoder.", "decoder.", "lm_head.", "classification_head.", "qa_outputs.", "classifier.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every offending tensor."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class SafetensorsFile:
    """A memory-mapped .safetensors file; ``tensor(name)`` is a zero-copy view of its bytes."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(f"{self.path} is corrupt or truncated: header of {header_len} bytes in a "
                                      f"{size}-byte file")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{self.path} is corrupt: its header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path} is corrupt: __metadata__ must map strings to strings")
        self.data_start = 8 + header_len
        self.entries = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape, (begin, end) = tuple(info["shape"]), tuple(info["data_offsets"])
                if not all(type(v) is int and v >= 0 for v in shape + (begin, end)):  # no 32.5, no True
                    raise ValueError("shape and data_offsets must be non-negative integers")
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.path} is corrupt: bad header entry for tensor {name!r}") from exc
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path} is corrupt or truncated: tensor {name!r} needs bytes [{begin}, {end}) of "
                    f"the data section ({nbytes} expected) but the file has {size - self.data_start}")
            self.entries[name] = (dtype, shape, begin)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:  # as the safetensors library: each byte belongs to one tensor
                raise CheckpointError(f"{self.path} is corrupt: tensors {first!r} and {second!r} overlap")
        self._map = None

    def keys(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][1]

    def tensor(self, name) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        count = _numel(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:  # private copy-on-write map: writable views, file untouched
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            start = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
            self.mapped_span = (start, start + len(self._map))
            _FILE_MAPPINGS.add(self)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + begin).view(shape)


# SafetensorsFiles with a live mapping: release_file_pages only touches memory inside one of them.
_FILE_MAPPINGS = weakref.WeakSet()


def release_file_pages(tensor: torch.Tensor):
    """Drop the pages of ``tensor`` from this process's resident memory when it is a view of a
    checkpoint file's mapping (``MADV_DONTNEED``; Linux, best effort): after converting or
    quantising a layer at load, its stored bytes are not needed, and without this the whole file
    stays resident while any weight still views the mapping. The mapping is private and never
    written, so a later read of those bytes (there is none) would fault the file's data back in: no
    memory can change meaning.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if any(f.mapped_span[0] <= start and end <= f.mapped_span[1] for f in list(_FILE_MAPPINGS)):
        page = _page_size()
        if page:  # whole pages inside the tensor only: its neighbours' bytes stay
            _madvise(-(-start // page) * page, end // page * page, MADV_DONTNEED)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class CheckpointReader:
    """Name -> tensor over every file of a checkpoint directory (or one file)."""

    def __init__(self, path, use_safetensors: Optional[bool] = None, variant: Optional[str] = None):
        """``use_safetensors`` (transformers' option): True reads only safetensors files, False only
        ``.bin`` ones, None prefers safetensors; ``variant``: the files of that weights variant."""
        path = Path(path)
        self.sources: Dict[str, Callable[[], torch.Tensor]] = {}
        self.shapes: Dict[str, tuple] = {}
        forms = {True: ((SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME),), False: ((BIN_NAME, BIN_INDEX_NAME),),
                 None: ((SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME), (BIN_NAME, BIN_INDEX_NAME))}[use_safetensors]
        names = [with_variant(name, variant) for pair in forms for name in pair]
        if path.is_file():
            files = [path]
        else:
            found = next((name for name in names if (path / name).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no weights in {path}: expected {', '.join(names)}"
                                        + ("" if use_safetensors is None else f" (use_safetensors={use_safetensors})"))
            files = self._sharded(path, found) if found.endswith(".json") else [path / found]
        for file in files:
            if file.suffix == ".safetensors":
                st = SafetensorsFile(file)
                for name in st.keys():
                    self.sources[name] = (lambda st=st, name=name: st.tensor(name))
                    self.shapes[name] = st.shape(name)
            else:
                state = _load_bin(file)
                for name, tensor in state.items():
                    self.sources[name] = (lambda t=tensor: t)
                    self.shapes[name] = tuple(tensor.shape)

    @staticmethod
    def _sharded(directory: Path, index_name: str):
        index_path = directory / index_name
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is corrupt: expected a JSON object with a 'weight_map'") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path} is corrupt: its 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shard files that are missing: {missing}")
        return [directory / f for f in files]


def _load_bin(file: Path) -> Dict[str, torch.Tensor]:
    try:  # weights_only: a pickle cannot run code; mmap: no second copy in RAM
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file} could not be loaded safely ({exc})") from exc
    except Exception as exc:
        raise CheckpointError(f"{file} could not be loaded safely ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------
# Building a model from tensors
# ---------------------------------------------------------------------------------------------
def resolve_dtype(dtype, config: UMT5Config, reader: Optional[CheckpointReader] = None) -> torch.dtype:
    if dtype is None:
        return torch.float32  # transformers' default too
    if dtype == "auto":
        # like transformers: the config's torch_dtype, else the dtype of the first float weight
        named = config.torch_dtype
        if named is None and reader is not None:
            first = next((reader.sources[k]() for k in reader.sources), None)
            return first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
        dtype = named or "float32"
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        return _DTYPE_NAMES[name]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def param_dtype(name: str, dtype: torch.dtype, keep_in_fp32: Iterable[str]) -> torch.dtype:
    """transformers keeps the FFN output projections ``wo`` in fp32 for fp16 models (T5 overflow)."""
    if dtype == torch.float16 and any(f".{module}." in f".{name}" for module in keep_in_fp32):
        return torch.float32
    return dtype


def build_model(cls, config: UMT5Config, sources: Dict[str, Callable[[], torch.Tensor]], shapes: Dict[str, tuple],
                *, dtype: Optional[torch.dtype] = torch.float32, device="cpu", backend="auto", quantize=None, keep_in_fp32=("wo",),
                progress: bool = False, packed: Collection[str] = ()):
    """``packed``: checkpoint keys whose sources return packed weights (``dequantize(dtype)``) instead of
    tensors; a linear layer keeps a ``quant.PackedWeight`` as is, anything else is dequantised here."""
    from umt5_fast.model import Linear, PackedEmbedding
    check_quantize_mode(quantize)
    device = torch.device(device)
    with torch.device("meta"):
        model = cls(config, backend="eager")
    params = dict(model.named_parameters())  # first name of each tied parameter
    renamed = _match_names(params, sources)
    problems = _check(model, params, renamed, shapes)
    if problems:
        raise CheckpointError(f"checkpoint does not fit {cls.__name__}:\n  " + "\n  ".join(problems))
    names = list(params)
    for i, name in enumerate(names):
        key = renamed[name]
        tensor = sources[key]()
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if key in packed and isinstance(tensor, PackedWeight) and isinstance(owner, Linear) and attr == "weight":
            owner.load_packed(tensor.to(device))  # stays 8-bit; expanded per call
        elif key in packed and isinstance(tensor, PackedWeight) and name == "shared.weight" \
                and hasattr(model, "set_packed_embedding"):  # stays 8-bit; rows expanded per lookup
            model.set_packed_embedding(PackedEmbedding(tensor.to(device), param_dtype(name, dtype or torch.float32,
                                                                                       keep_in_fp32)))
        else:
            if key in packed:  # e.g. an fp8 embedding or a K-quant weight: expanded once, here
                tensor = tensor.dequantize(param_dtype(name, dtype or torch.float32, keep_in_fp32))
            if not tensor.is_floating_point():  # every UMT5 weight is a float (transformers refuses others)
                raise CheckpointError(f"tensor {key} has dtype {tensor.dtype}; UMT5 weights are floating point")
            target = tensor.dtype
            if dtype is not None:
                target = param_dtype(name, dtype, keep_in_fp32)
            stored, tensor = tensor, tensor.to(device=device, dtype=target)  # no copy when both already match
            setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
            if quantize is not None and attr == "weight" and _quantized_linear(owner_name, owner):
                quantize_linear(owner, quantize, owner_name)  # layer by layer: the float model never sits in memory whole
            kept = getattr(owner, attr)
            if kept is None or kept.data_ptr() != stored.data_ptr():
                # converted or quantised: the stored bytes are not needed (an fp16 model's fp32
                # `wo` views keep the file mapped: without this the whole file stayed resident)
                release_file_pages(stored)
        if progress:
            print(f"\rloading {i + 1}/{len(names)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if getattr(model, "lm_head", None) is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    elif isinstance(model.shared, nn.Embedding):
        advise_random_reads(model.shared.weight)
    if quantize is not None:
        quantize_model(model, quantize)
    model.set_backend(backend)
    return model


MADV_RANDOM, MADV_DONTNEED = 1, 4  # <sys/mman.h>


def _page_size() -> Optional[int]:
    if not hasattr(os, "sysconf") or sys.platform != "linux":
        return None
    return os.sysconf("SC_PAGE_SIZE")


def _madvise(begin: int, end: int, advice: int):
    if end <= begin:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), advice)
    except (OSError, AttributeError):
        pass  # advice only


def advise_random_reads(tensor: torch.Tensor):
    """Tell the kernel that ``tensor``'s pages are read at random (``MADV_RANDOM``; Linux, best effort).

    An embedding memory-mapped from a checkpoint is read a few rows at a time: with the default
    read-ahead each faulted row pulls in its neighbours, and 4096 random token ids made 300 MB of a
    525 MB fp32 table resident where 16 MB were needed. Not for an LM head, which is read whole.
    """
    page = _page_size()
    if tensor.device.type != "cpu" or not page:
        return
    begin = tensor.data_ptr() // page * page
    _madvise(begin, tensor.data_ptr() + tensor.numel() * tensor.element_size(), MADV_RANDOM)


def _match_names(params, sources) -> Dict[str, str]:
    """Our parameter name -> checkpoint key, across the ``transformer.`` prefix of wrapped models."""
    renamed = {}
    for name in params:
        candidates = [name]
        if name.startswith("transformer."):
            candidates.append(name[len("transformer."):])
        else:
            candidates.append("transformer." + name)
        if name == "shared.weight" or name.endswith(".shared.weight"):  # tied copies may be all that is saved
            prefix = name[: -len("shared.weight")]
            candidates += [prefix + "encoder.embed_tokens.weight", prefix + "decoder.embed_tokens.weight"]
            bare = prefix[len("transformer."):] if prefix.startswith("transformer.") else "transformer." + prefix
            candidates += [bare + "shared.weight", bare + "encoder.embed_tokens.weight"]
        for candidate in candidates:
            if candidate in sources:
                renamed[name] = candidate
                break
    return renamed


def _check(model, params, renamed, shapes) -> list:
    """``params`` lists a tied LM head once (as ``shared.weight``), so it is never missing."""
    problems = []
    missing = [n for n in params if n not in renamed]
    if missing:
        problems.append(f"missing tensors: {missing}")
        if all(".relative_attention_bias." in n and ".block.0." not in n for n in missing):
            problems.append("only block 0 holds a relative_attention_bias table: this is a T5 / mT5 "
                            "checkpoint (one table shared by all layers), not UMT5 (one per layer)")
    for name, key in renamed.items():
        expected = tuple(params[name].shape)
        if tuple(shapes[key]) != expected:
            problems.append(f"tensor {key!r} has shape {tuple(shapes[key])}, expected {expected}")
    used = set(renamed.values())
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    own_prefixes = {name.split(".")[0] + "." for name in params}
    if "transformer." in own_prefixes:
        own_prefixes |= {name.split(".")[1] + "." for name in params if name.startswith("transformer.")}
    unexpected = []
    for key in shapes:
        if key in used:
            continue
        bare = key[len("transformer."):] if key.startswith("transformer.") else key
        if bare in aliases or bare.endswith("EncDecAttention.relative_attention_bias.weight"):
            continue  # tied copies; old T5 exports carry an unused cross-attention bias table
        if bare.startswith(_TASK_PREFIXES) and not any(bare.startswith(p) for p in own_prefixes):
            continue  # a stack or head of another task class (e.g. the decoder, for the encoder model)
        unexpected.append(key)
    if unexpected:
        problems.append(f"unexpected tensors (not part of {type(model).__name__} with this config): {unexpected}")
    return problems


def quantize_model(model, mode: str):
    """Weight-only reduced precision for every linear layer of the stacks and the LM head.

    ``"int8"``: per-output-channel int8 + fp32 scales; ``"bf16"``: bf16 weights. Activations,
    norms and embeddings stay in the model's dtype, so the CPU kernels widen weights in registers
    and decoding reads 4x / 2x fewer bytes. ``"w8a8"``: the int8 weights of ``"int8"``, and the
    activations entering each of those layers quantised to int8 per row at run time, so the
    product runs in integers (CTranslate2's int8; faster where compute dominates: batches, encoders).
    """
    check_quantize_mode(mode)
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is model.shared.weight:
        head.weight = nn.Parameter(model.shared.weight.detach().clone(), requires_grad=False)  # untie first
    for name, module in model.named_modules():
        if _quantized_linear(name, module):
            quantize_linear(module, mode, name)
    return model


def check_quantize_mode(mode):
    if mode not in (None, "int8", "w8a8", "bf16"):
        raise ValueError(f"quantize must be None, 'int8', 'w8a8' or 'bf16', got {mode!r}")


def _quantized_linear(name: str, module) -> bool:
    """Whether ``quantize`` covers this module: the linear layers of the stacks and the LM head."""
    from umt5_fast.model import Linear
    return isinstance(module, Linear) and (".block." in f".{name}" or name.endswith("lm_head"))


def quantize_linear(module, mode: str, name: str):
    if module.qweight is not None:  # already packed (an 8-bit checkpoint format)
        return
    if mode in ("int8", "w8a8"):
        try:
            module.quantize_int8(activations=mode == "w8a8")
        except ValueError as exc:
            raise ValueError(f"{name}.weight: {exc}") from None
    elif mode == "bf16":
        module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
# transformers' from_pretrained options that change nothing when loading local files (the last
# two: mismatched shapes are an error here, and .bin files are always read weights-only).
_IGNORED_HF_OPTIONS = ("low_cpu_mem_usage", "local_files_only", "trust_remote_code", "attn_implementation",
                       "revision", "cache_dir", "token", "use_auth_token", "force_download", "resume_download",
                       "proxies", "offload_folder", "offload_state_dict", "_from_auto", "_from_pipeline",
                       "ignore_mismatched_sizes", "weights_only")


def device_of_map(device_map, device):
    """The one device transformers' ``device_map`` names ("cpu", "cuda:0", {"": 0}, "auto": the GPU
    when there is one), or ``device`` (default: the CPU) when there is no map; a map that splits the
    model across devices, or disagrees with ``device``, is refused."""
    if device_map is None:
        return "cpu" if device is None else device
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map={device_map!r} places modules on several devices, which umt5_fast "
                             "does not support: pass one device (device_map='cpu' or device='cuda')")
        device_map = device_map[""]
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool):  # (a GPU index)
        device_map = f"cuda:{device_map}"
    try:
        mapped = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map={device_map!r} is not a device") from exc
    if device is not None:
        given = torch.device(device)
        if (given.type, given.index or 0) != (mapped.type, mapped.index or 0):  # ("cuda" is "cuda:0")
            raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass one of them")
    return mapped


def from_pretrained(cls, path, *, dtype=None, torch_dtype=None, device=None, backend="auto", quantize=None,
                    config: Optional[UMT5Config] = None, keep_in_fp32=("wo",), progress=None, gguf_file=None,
                    subfolder: str = "", use_safetensors: Optional[bool] = None, device_map=None,
                    variant: Optional[str] = None, output_loading_info: bool = False, **config_overrides):
    """Load a UMT5 checkpoint (a transformers directory, or one file) into ``cls``.

    ``dtype`` (or transformers' ``torch_dtype``): float32 (default), float16, bfloat16 or "auto";
    ``device``: where the weights live (default: the CPU); ``backend``: "auto" | "triton" | "cpu" | "eager";
    ``quantize="int8"`` / ``"bf16"``: weight-only int8 / bf16 linear layers and LM head; ``"w8a8"``: int8
    weights and per-row int8 activations (integer GEMM; see ``quantize_model``).

    ``path`` may also be one file: a ComfyUI / transformers-named ``.safetensors``, a ``.gguf``
    (``gguf_file=``: a file name inside the directory ``path``, as in transformers) or Wan's ``.pth``
    (``umt5_fast.formats``); a config.json next to it wins over the config inferred from the file.
    ``subfolder``: the checkpoint's folder inside ``path`` (e.g. a pipeline's "text_encoder");
    ``variant``: its weights variant ("model.fp16.safetensors"); ``device_map``: transformers' map
    to one device; ``config``: a config object or a path to one; ``output_loading_info``: also
    return transformers' loading report (empty lists: missing, unexpected and mismatched weights
    are errors here; the tensors of another task class's stacks or head, which transformers lists
    as unexpected, are left out silently). Other keyword arguments override config fields (e.g.
    ``num_labels=3``) or set config attributes (``max_length=5``, as transformers' config keeps
    them); transformers' options
    that mean nothing for local files (``low_cpu_mem_usage``, ``local_files_only``, ...) are
    accepted and ignored, anything else is a TypeError.
    """
    for option in _IGNORED_HF_OPTIONS:
        config_overrides.pop(option, None)
    device = device_of_map(device_map, device)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one of them")
    if use_safetensors not in (None, True, False):
        raise ValueError(f"use_safetensors must be True, False or None, got {use_safetensors!r}")
    unknown = sorted(key for key in config_overrides if not UMT5Config.is_field(key))
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}: neither loading "
                        "options nor UMT5Config fields")
    path = Path(path) / subfolder
    if gguf_file is not None:
        path = path / gguf_file
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if isinstance(config, (str, Path)):
        config = UMT5Config.from_pretrained(config)
    if config is not None:  # a copy: the model records its dtype and path in its own config
        if not hasattr(config, "to_dict"):
            raise TypeError(f"config must be a UMT5Config (ours or transformers'), got {type(config).__name__}")
        config = UMT5Config.from_dict(config.to_dict())
    if config is None:
        config_file = path / CONFIG_NAME if path.is_dir() else path.parent / CONFIG_NAME
        if config_file.is_file():
            config = UMT5Config.from_json_file(config_file)
        elif path.is_dir():
            raise FileNotFoundError(f"config.json not found in {config_file.parent}")
    if path.is_dir():
        reader = CheckpointReader(path, use_safetensors, variant)
        sources, shapes, packed = reader.sources, reader.shapes, ()
    else:
        from umt5_fast import formats
        reader = None  # "auto" dtype then comes from the config (formats infer it from the file)
        config, sources, shapes, packed = formats.read(path, config)
    if config_overrides:
        config = config.updated(**config_overrides)
    generation_file = path / "generation_config.json" if path.is_dir() and cls.can_generate() else None
    generation_settings = read_generation_config(generation_file) if generation_file else None
    if generation_settings is not None:  # (as transformers: generation options passed here win over the file's)
        generation_settings.update({k: v for k, v in config_overrides.items() if k in GENERATION_DEFAULTS})
    dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config, reader)
    total = sum(_numel(s) for s in shapes.values())
    show = progress if progress is not None else total > 200_000_000
    try:
        model = build_model(cls, config, sources, shapes, dtype=dtype, device=device, backend=backend,
                            quantize=quantize, keep_in_fp32=keep_in_fp32, progress=show, packed=packed)
    except CheckpointError as exc:  # name the checkpoint (tensor names are transformers', as mapped)
        raise CheckpointError(f"{path}: {exc}") from None
    if generation_settings is not None:
        model.generation_config = generation_settings
    model.config.torch_dtype = model.dtype  # as transformers records the dtype it loaded
    model.config.name_or_path = str(path)
    if output_loading_info:
        return model.eval(), dict(missing_keys=[], unexpected_keys=[], mismatched_keys=[], error_msgs=[])
    return model.eval()


def read_generation_config(path: Path) -> Optional[GenerationSettings]:
    """A checkpoint's generation_config.json (None if there is none)."""
    if not path.is_file():
        return None
    settings = GenerationSettings(read_json_object(path, "generation config"))
    return settings.as_derived_from_config() if settings.get("_from_model_config") else settings


def from_hf(cls, hf_model, backend="auto"):
    """Convert a live transformers UMT5 model: same weights (shared, not copied), our kernels."""
    config = UMT5Config.from_dict(hf_model.config.to_dict())
    state = hf_model.state_dict()
    sources = {k: (lambda t=t: t.detach()) for k, t in state.items()}
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    device = next(iter(state.values())).device
    # dtype=None keeps each weight's own dtype (e.g. wo in fp32 inside an fp16 model)
    model = build_model(cls, config, sources, shapes, dtype=None, device=device, backend=backend)
    hf_generation = getattr(hf_model, "generation_config", None)
    if hf_generation is not None and cls.can_generate():
        model.generation_config = GenerationSettings(hf_generation.to_diff_dict())
    return model.eval()


def save_pretrained(model, directory, max_shard_size=None, state_dict=None, variant=None):
    """Write config.json + safetensors weights that transformers' from_pretrained loads.

    Tied weights are written once (transformers re-ties them); int8 layers are written dequantised.
    An LM head untied from a tied checkpoint by ``quantize`` is written as an untied head, with the
    decoder-output rescale of tied heads folded into it, so the files hold the model as it runs.
    config.json records the model's dtype. ``max_shard_size`` (bytes, or a string like "200MB")
    splits the weights into shards plus ``model.safetensors.index.json``. ``state_dict``: the tensors
    to write instead of the model's (as they are, but a tied tensor once; packed weights of a
    quantized model are refused); ``variant``: in the file names, as transformers names a variant.
    """
    from safetensors.torch import save_file
    from umt5_fast.model import Linear, PackedEmbedding
    shard_limit = _parse_size(max_shard_size)  # bad arguments fail before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = dtype_name(model.dtype)
    config["architectures"] = [type(model).__name__]  # what transformers' save records
    if state_dict is not None:
        if not (isinstance(state_dict, dict) and all(isinstance(t, torch.Tensor) for t in state_dict.values())):
            raise TypeError("state_dict must map names to tensors")
        packed = sorted(name for name in state_dict if not name.endswith((".weight", ".bias")))
        if packed:  # (a quantized model's state_dict: transformers would load without those weights)
            raise ValueError(f"state_dict holds tensors transformers does not load ({packed[:3]}...): a "
                             "quantized model's packed weights; save it without state_dict, which writes "
                             "them dequantised")
        # a tied tensor is written once (model.state_dict() lists it under each of its names), under
        # the name the model's parameters give it, as transformers writes it
        own_names, first_of = {name for name, _ in model.named_parameters()}, {}
        for name in sorted(state_dict, key=lambda n: n not in own_names):
            t = state_dict[name]
            first_of.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), name)
        state = {name: state_dict[name].detach().to("cpu").contiguous() for name in state_dict
                 if name in first_of.values()}
    else:
        state = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
        for name, module in model.named_modules():
            if isinstance(module, (Linear, PackedEmbedding)) and module.qweight is not None:
                state[f"{name}.weight"] = module.packed_weight().dequantize().contiguous()
    head = getattr(model, "lm_head", None)
    if state_dict is None and head is not None and model.config.tie_word_embeddings \
            and head.weight is not model.shared.weight:
        weight = state["lm_head.weight"].float()
        if model.config.scale_decoder_outputs:
            weight = weight * model.config.d_model ** -0.5
        state["lm_head.weight"] = weight.to(state["shared.weight"].dtype)
        config.update(tie_word_embeddings=False, scale_decoder_outputs=False)
    UMT5Config.from_dict(config).save_pretrained(directory)
    weights_name, index_name = (with_variant(name, variant) for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME))
    shard_stem = weights_name.removesuffix(".safetensors")
    for stale in [directory / weights_name, directory / index_name,
                  *directory.glob(f"{shard_stem}-*-of-*.safetensors")]:  # an earlier save's files would shadow these
        stale.unlink(missing_ok=True)
    shards = _split(state, shard_limit)
    if len(shards) == 1:
        save_file(shards[0], str(directory / weights_name), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"{shard_stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / index_name).write_text(json.dumps(index, indent=2))
    settings = settings_dict(getattr(model, "generation_config", None))
    if settings:
        (directory / "generation_config.json").write_text(json.dumps(settings, indent=2))


def _parse_size(size) -> Optional[int]:
    if size is None:
        return None
    value = size if isinstance(size, int) and not isinstance(size, bool) else None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if value is None and text.endswith(unit):
            try:
                value = int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if value is None or value < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '200MB', got {size!r}")
    return value


def _split(state: Dict[str, torch.Tensor], limit: Optional[int]):
    shards, current, current_size = [], {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if limit is not None and current and current_size + size > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += size
    return shards + [current] if current or not shards else shards
