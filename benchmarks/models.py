"""Benchmark models: shapes, random-weight checkpoints made on first use, CTranslate2 conversions.

A preset is a transformers ``UMT5Config`` with random weights (speed does not depend on the
values; the correctness column compares every engine with transformers on the same weights).
Checkpoints are written once under ``<cache>/<name>/`` with a tiny sentencepiece tokenizer, which
CTranslate2's converter needs (its UMT5 loader pads the vocabulary up to ``config.vocab_size``
with ``<unused_N>`` placeholders, so a 32-piece tokenizer serves a 256384-row embedding; token ids
and the converted vocabulary's strings then map one to one by position).
"""
import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

UMT5_COMMON = dict(d_kv=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
PRESET_CONFIGS = {
    "tiny": dict(UMT5_COMMON, vocab_size=1000, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                 num_decoder_layers=2),
    "umt5-small": dict(UMT5_COMMON, vocab_size=256384, d_model=512, num_heads=6, d_ff=1024, num_layers=8,
                       num_decoder_layers=8),
    "umt5-base": dict(UMT5_COMMON, vocab_size=256384, d_model=768, num_heads=12, d_ff=2048, num_layers=12,
                      num_decoder_layers=12),
}
COMPLETE_MARKER = ".bench-complete"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
TOKENIZER_PIECES = 32


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "umt5_fast" / "bench-models"


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: a generated preset (``preset_config``) or a user checkpoint (``user_dir``)."""
    name: str
    preset_config: Optional[dict] = field(default=None, hash=False, compare=False)
    user_dir: Optional[str] = None

    def checkpoint_dir(self, cache_dir: Path) -> Path:
        return Path(self.user_dir) if self.user_dir else Path(cache_dir) / self.name

    def ctranslate2_dir(self, cache_dir: Path) -> Path:
        if not self.user_dir:
            return Path(cache_dir) / self.name / "ctranslate2"
        key = hashlib.sha1(str(Path(self.user_dir).resolve()).encode()).hexdigest()[:10]
        return Path(cache_dir) / "user-checkpoints" / f"{self.name}-{key}" / "ctranslate2"


def preset_model(name: str) -> BenchModel:
    if name not in PRESET_CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESET_CONFIGS)} "
                         "or pass a checkpoint directory with --model DIR")
    return BenchModel(name=name, preset_config=PRESET_CONFIGS[name])


def user_model(directory: str) -> BenchModel:
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {directory}: no config.json there (expected a transformers UMT5 checkpoint)")
    return BenchModel(name=path.resolve().name, user_dir=str(path))


def read_config(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Random checkpoints (run in a subprocess by the suite: they need a few GB for umt5-base)
# ---------------------------------------------------------------------------------------------
def checkpoint_ready(model: BenchModel, cache_dir: Path) -> bool:
    return bool(model.user_dir) or (model.checkpoint_dir(cache_dir) / COMPLETE_MARKER).is_file()


def ensure_checkpoint(model: BenchModel, cache_dir: Path) -> Path:
    """The checkpoint directory of ``model``, generating a preset's random weights on first use."""
    target = model.checkpoint_dir(cache_dir)
    if checkpoint_ready(model, cache_dir):
        return target
    import torch
    import transformers
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    config = transformers.UMT5Config(**model.preset_config)
    hf_model = transformers.UMT5ForConditionalGeneration(config).eval()
    hf_model.save_pretrained(staging, safe_serialization=True)
    del hf_model
    write_tiny_tokenizer(staging, config.pad_token_id, config.eos_token_id)
    (staging / COMPLETE_MARKER).write_text("random weights, seed 0\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def write_tiny_tokenizer(directory: Path, pad_id: int, eos_id: int):
    """Train a 32-piece sentencepiece model on made-up text and save it as a T5 tokenizer."""
    import sentencepiece
    import transformers
    words = ["umt5", "fast", "bench", "token", "speed", "model", "encoder", "decoder", "beam", "greedy"]
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    unk_id = min({0, 1, 2} - {pad_id, eos_id})
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=TOKENIZER_PIECES,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=pad_id, eos_id=eos_id,
        unk_id=unk_id, bos_id=-1, minloglevel=2)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(buffer.getvalue())
    transformers.T5Tokenizer(str(directory / "spiece.model"), extra_ids=0, legacy=False).save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# CTranslate2 conversion (float32 on disk; the int8 engine quantizes when it loads)
# ---------------------------------------------------------------------------------------------
def ctranslate2_ready(model: BenchModel, cache_dir: Path) -> bool:
    """A finished conversion newer than every weight file of the checkpoint."""
    checkpoint = model.checkpoint_dir(cache_dir)
    marker = model.ctranslate2_dir(cache_dir) / COMPLETE_MARKER
    if not (checkpoint.is_dir() and marker.is_file()):
        return False
    weights = [p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin")]
    return marker.stat().st_mtime >= max((p.stat().st_mtime for p in weights), default=0.0)


def ensure_ctranslate2_model(model: BenchModel, cache_dir: Path) -> Path:
    """The CTranslate2 conversion of ``model``'s checkpoint, converting it when missing or stale."""
    checkpoint = model.checkpoint_dir(cache_dir)
    target = model.ctranslate2_dir(cache_dir)
    if ctranslate2_ready(model, cache_dir):
        return target
    import ctranslate2
    source = checkpoint
    staging_source = None
    if not has_tokenizer(checkpoint):  # a user checkpoint without tokenizer files: lend it ours
        staging_source = target.parent / f"source.tmp-{os.getpid()}"
        shutil.rmtree(staging_source, ignore_errors=True)
        staging_source.mkdir(parents=True)
        for item in checkpoint.iterdir():
            (staging_source / item.name).symlink_to(item.resolve())
        config = read_config(checkpoint)
        write_tiny_tokenizer(staging_source, config.get("pad_token_id", 0), config.get("eos_token_id", 1))
        source = staging_source
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        ctranslate2.converters.TransformersConverter(str(source)).convert(str(staging), force=True)
        (staging / COMPLETE_MARKER).write_text("converted from " + str(checkpoint.resolve()) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if staging_source is not None:
            shutil.rmtree(staging_source, ignore_errors=True)
    return target


def ctranslate2_vocabulary(ct2_dir: Path) -> list:
    """The converted model's token strings, in id order."""
    ct2_dir = Path(ct2_dir)
    if (ct2_dir / "shared_vocabulary.json").is_file():
        return json.loads((ct2_dir / "shared_vocabulary.json").read_text(encoding="utf-8"))
    return (ct2_dir / "shared_vocabulary.txt").read_text(encoding="utf-8").splitlines()
