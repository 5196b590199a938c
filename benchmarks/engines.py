"""Engine adapters: umt5_fast (each backend x precision), transformers, CTranslate2.

Every adapter has the same interface, used inside the measuring subprocess:

- ``load(checkpoint_dir, ctranslate2_dir, kind, threads)``: load for a workload kind ("encoder"
  loads the encoder-only class where the engine has one) with ``threads`` compute threads;
- ``encode(ids, mask) -> np.ndarray [B, L, d_model]`` (float32);
- ``generate(ids, mask, new_tokens, num_beams, top_k) -> np.ndarray [B, new_tokens]`` (the new ids
  only; ``top_k > 0``: sampled with top-k, the generator seeded with ``SAMPLING_SEED`` first).

Adapters are cheap descriptions until ``load``; the suite names them by ``name`` across processes.
"""
import importlib.util
from typing import Optional

import numpy as np

from .workloads import SAMPLING_SEED

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "bf16-model": 2, "fp16-model": 2, "int8": 1, "w8a8": 1}
# Whole models in half precision (weights and activations), as transformers' dtype=...: precision ->
# torch dtype name
MODEL_DTYPES = {"bf16-model": "bfloat16", "fp16-model": "float16"}
REFERENCE_ENGINE = "transformers-fp32"
# Default sweep: the engines the issue lists (others can still be named with --engines).
DEFAULT_ENGINES = ("umt5_fast-eager-fp32", "umt5_fast-cpu-fp32", "umt5_fast-cpu-int8", "umt5_fast-cpu-w8a8",
                   "umt5_fast-cpu-bf16",
                   REFERENCE_ENGINE, "ctranslate2-fp32", "ctranslate2-int8")


class Engine:
    family = ""

    def __init__(self, name: str, precision: str, missing: Optional[str] = None):
        self.name = name
        self.precision = precision
        self.missing = missing  # why this engine cannot run on this machine, or None
        self.model = None

    # --- what the floor assumes about the engine ---------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def activation_bytes(self) -> int:
        # activations stay float32 between layers (w8a8 quantises them inside each GEMM), except in
        # a bf16 / fp16 model
        return 2 if self.precision in MODEL_DTYPES else 4

    @property
    def gemm_dtype(self) -> str:
        # weight-only formats widen weights to fp32 before multiplying; w8a8's integer rate is not
        # measured, so its compute floor is the fp32 one (an upper bound of the true floor)
        return MODEL_DTYPES.get(self.precision, "float32")

    def unsupported_reason(self, workload) -> Optional[str]:
        return self.missing

    # --- the measured interface --------------------------------------------------------------
    def load(self, checkpoint_dir, ctranslate2_dir, kind: str, threads: int):
        raise NotImplementedError

    def encode(self, ids, mask) -> np.ndarray:
        raise NotImplementedError

    def generate(self, ids, mask, new_tokens: int, num_beams: int, top_k: int = 0) -> np.ndarray:
        raise NotImplementedError


def torch_decoding(new_tokens: int, num_beams: int, top_k: int) -> dict:
    """generate()'s options for a workload, shared by umt5_fast and transformers (same API); seeds
    torch's global generator when it samples, so that both draw the same ids."""
    if top_k:
        import torch
        torch.manual_seed(SAMPLING_SEED)
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=top_k > 0,
                top_k=top_k or None)


class UMT5FastEngine(Engine):
    family = "umt5_fast"

    def __init__(self, backend: str, precision: str, missing: Optional[str] = None):
        super().__init__(f"umt5_fast-{backend}-{precision}", precision, missing)
        self.backend = backend

    def load_options(self) -> dict:
        import torch
        if self.precision in MODEL_DTYPES:  # everything in bf16 / fp16, as transformers' dtype=...
            return dict(dtype=getattr(torch, MODEL_DTYPES[self.precision]), quantize=None)
        # fp32 activations with int8 / bf16 weights (w8a8: int8 inside each GEMM): what the C++ kernels take
        return dict(dtype=torch.float32, quantize=None if self.precision == "fp32" else self.precision)

    def load(self, checkpoint_dir, ctranslate2_dir, kind, threads):
        import umt5_fast
        cls = umt5_fast.UMT5EncoderModel if kind == "encoder" else umt5_fast.UMT5ForConditionalGeneration
        self.model = cls.from_pretrained(checkpoint_dir, backend=self.backend, progress=False, **self.load_options())

    def encode(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().numpy()

    def generate(self, ids, mask, new_tokens, num_beams, top_k=0):
        out = self.model.generate(ids, attention_mask=mask, **torch_decoding(new_tokens, num_beams, top_k))
        return out[:, 1:].numpy()  # drop the decoder start token


class TransformersEngine(Engine):
    """transformers' eager model in fp32 (the reference) or, as ``transformers-bf16`` /
    ``transformers-fp16``, in that dtype (the peers of umt5_fast's bf16 / fp16 models)."""
    family = "transformers"

    def __init__(self, precision: str = "fp32", missing: Optional[str] = None):
        name = REFERENCE_ENGINE if precision == "fp32" else f"transformers-{precision.removesuffix('-model')}"
        super().__init__(name, precision, missing)

    def load(self, checkpoint_dir, ctranslate2_dir, kind, threads):
        import torch
        import transformers
        transformers.logging.set_verbosity_error()
        cls = transformers.UMT5EncoderModel if kind == "encoder" else transformers.UMT5ForConditionalGeneration
        dtype = getattr(torch, MODEL_DTYPES.get(self.precision, "float32"))
        self.model = cls.from_pretrained(checkpoint_dir, dtype=dtype, attn_implementation="eager").eval()

    def encode(self, ids, mask):
        import torch
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().numpy()

    def generate(self, ids, mask, new_tokens, num_beams, top_k=0):
        import torch
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, **torch_decoding(new_tokens, num_beams, top_k))
        return out[:, 1:].numpy()


class CTranslate2Engine(Engine):
    family = "ctranslate2"
    COMPUTE_TYPES = {"fp32": "float32", "int8": "int8"}

    def __init__(self, precision: str, missing: Optional[str] = None):
        super().__init__(f"ctranslate2-{precision}", precision, missing)
        self.vocabulary = self.token_ids = None

    def unsupported_reason(self, workload):
        if workload.kind == "encoder":
            return "CTranslate2's Translator has no encoder-only call for T5-family models"
        return self.missing

    def load(self, checkpoint_dir, ctranslate2_dir, kind, threads):
        import ctranslate2
        from .models import ctranslate2_vocabulary
        self.model = ctranslate2.Translator(str(ctranslate2_dir), device="cpu",
                                            compute_type=self.COMPUTE_TYPES[self.precision],
                                            intra_threads=threads, inter_threads=1)
        self.vocabulary = ctranslate2_vocabulary(ctranslate2_dir)
        self.token_ids = {token: i for i, token in enumerate(self.vocabulary)}

    def generate(self, ids, mask, new_tokens, num_beams, top_k=0):
        import ctranslate2
        source = [[self.vocabulary[i] for i in row] for row in ids.tolist()]
        if top_k:
            ctranslate2.set_random_seed(SAMPLING_SEED)
        results = self.model.translate_batch(source, beam_size=num_beams, max_decoding_length=new_tokens,
                                             min_decoding_length=new_tokens, max_input_length=0,
                                             sampling_topk=top_k or 1)
        rows = [[self.token_ids[token] for token in result.hypotheses[0]] for result in results]
        width = max(len(row) for row in rows)
        return np.array([row + [-1] * (width - len(row)) for row in rows], dtype=np.int64)


def all_engines() -> list:
    """Every engine this suite knows, with ``missing`` set on those this machine cannot run."""
    try:
        from umt5_fast.ops import available_backends
        backends = available_backends()
        umt5_missing = None
    except ImportError as exc:
        backends, umt5_missing = ["eager"], f"umt5_fast is not importable ({exc})"
    engines = []
    for backend in ("cpu", "eager"):
        missing = umt5_missing or (None if backend in backends else
                                   "umt5_fast's C++ extension (umt5_fast._C) is not built or does not import")
        engines += [UMT5FastEngine(backend, precision, missing)
                    for precision in ("fp32", "int8", "w8a8", "bf16", "bf16-model", "fp16-model")]
    transformers_missing = None if _importable("transformers") else "transformers is not installed"
    engines += [TransformersEngine(precision, transformers_missing) for precision in ("fp32", "bf16-model", "fp16-model")]
    ct2_missing = None if _importable("ctranslate2") else "ctranslate2 is not installed"
    engines += [CTranslate2Engine(precision, ct2_missing) for precision in ("fp32", "int8")]
    return engines


def engine_by_name(name: str) -> Engine:
    for engine in all_engines():
        if engine.name == name:
            return engine
    raise ValueError(f"unknown engine {name!r}")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
