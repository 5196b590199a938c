"""Workloads (what is timed), their inputs, and the cost model behind the floor column.

Every engine gets the same inputs (random ids ending in ``</s>``, no padding, seeded by the
workload) and, for generation, ``min_new_tokens == max_new_tokens`` so that every engine produces
exactly the same number of tokens whatever it predicts. Sampled workloads draw with top-k from
``SAMPLING_SEED`` (torch's global generator: umt5_fast and transformers draw the same ids;
CTranslate2 draws from its own generator).
"""
import fnmatch
from dataclasses import dataclass

ENCODER_GRID = ((1, 128), (1, 512), (1, 2048), (1, 4096), (8, 128), (8, 512), (32, 128))  # (batch, length)
THROUGHPUT_BATCHES = (1, 4, 16, 64)
LONG_SOURCE_LENGTH = 2048
SAMPLING_SEED = 2024


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "encoder" or "generate"
    batch: int
    source_length: int
    new_tokens: int = 0  # generate only
    num_beams: int = 1
    top_k: int = 0  # > 0: sampled with top-k (do_sample=True) from SAMPLING_SEED

    @property
    def group(self) -> str:
        """encoder, greedy, sample, beam or long: the family a ``--workloads`` filter may name."""
        if self.kind == "encoder":
            return "encoder"
        if self.num_beams > 1:
            return "beam"
        if self.top_k:
            return "sample"
        return "long" if self.name.startswith("long") else "greedy"

    @property
    def shape(self) -> str:
        text = f"{self.batch}x{self.source_length}"
        if self.kind == "generate":
            text += f"->{self.new_tokens}" + (f" beam{self.num_beams}" if self.num_beams > 1 else "")
            text += f" top-k {self.top_k}" if self.top_k else ""
        return text

    @property
    def output_tokens(self) -> int:
        """Tokens per run that tokens/s counts: generated tokens, or encoded tokens."""
        return self.batch * (self.new_tokens if self.kind == "generate" else self.source_length)

    @property
    def steps(self) -> int:
        """What ms/token divides by: decode steps, or encoded tokens."""
        return self.new_tokens if self.kind == "generate" else self.batch * self.source_length


def encoder_workload(batch: int, length: int) -> Workload:
    return Workload(f"enc-{batch}x{length}", "encoder", batch, length)


def catalog(source_length: int, new_tokens: int) -> list:
    """Every workload of the full sweep, for the given generation lengths."""
    workloads = [encoder_workload(batch, length) for batch, length in ENCODER_GRID]
    workloads += [Workload(f"greedy-b{batch}", "generate", batch, source_length, new_tokens)
                  for batch in THROUGHPUT_BATCHES]
    workloads += [Workload(f"sample-top50-b{batch}", "generate", batch, source_length, new_tokens, top_k=50)
                  for batch in (1, 16)]
    workloads.append(Workload("beam4-b1", "generate", 1, source_length, new_tokens, num_beams=4))
    workloads.append(Workload("beam4-b16", "generate", 16, source_length, new_tokens, num_beams=4))
    workloads.append(Workload(f"long-{LONG_SOURCE_LENGTH}", "generate", 1, LONG_SOURCE_LENGTH, new_tokens))
    return workloads


def select(workloads: list, patterns) -> list:
    """Workloads whose name or group matches one of the shell-style ``patterns``; all if None."""
    if not patterns:
        return list(workloads)
    chosen = [w for w in workloads if any(fnmatch.fnmatch(w.name, p) or w.group == p for p in patterns)]
    if not chosen:
        names = ", ".join(w.name for w in workloads)
        raise ValueError(f"no workload matches {','.join(patterns)}; workloads: {names} "
                         "(or a group: encoder, greedy, sample, beam, long)")
    return chosen


def make_inputs(workload: Workload, vocab_size: int, eos_id: int, seed: int = 1234):
    """``(input_ids, attention_mask)``: int64 ids in ``[3, vocab)`` ending in ``</s>``; no padding."""
    import torch
    generator = torch.Generator().manual_seed(seed + 7919 * workload.batch + workload.source_length)
    ids = torch.randint(3, vocab_size, (workload.batch, workload.source_length), generator=generator)
    ids[:, -1] = eos_id
    return ids, torch.ones_like(ids)


# ---------------------------------------------------------------------------------------------
# Cost model: the floor is the time this machine needs to read the bytes or do the FLOPs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    d_model: int
    inner: int  # num_heads * d_kv
    d_ff: int
    ffn_matrices: int  # 3 for gated FFNs (wi_0, wi_1, wo), else 2
    encoder_layers: int
    decoder_layers: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        return cls(vocab_size=config["vocab_size"], d_model=config["d_model"],
                   inner=config["num_heads"] * config["d_kv"], d_ff=config["d_ff"],
                   ffn_matrices=3 if str(config.get("feed_forward_proj", "")).startswith("gated") else 2,
                   encoder_layers=config["num_layers"],
                   decoder_layers=config.get("num_decoder_layers") or config["num_layers"])

    @property
    def ffn_params(self) -> int:
        return self.ffn_matrices * self.d_model * self.d_ff

    @property
    def encoder_params(self) -> int:
        """Weights of the encoder's matrices (q, k, v, o and FFN per layer)."""
        return self.encoder_layers * (4 * self.d_model * self.inner + self.ffn_params)

    @property
    def cross_kv_params(self) -> int:
        """Cross-attention K/V projections: applied once to the encoder output, not per step."""
        return self.decoder_layers * 2 * self.d_model * self.inner

    @property
    def decode_step_params(self) -> int:
        """Weights one decode step reads: decoder layers without cross K/V, plus the LM head."""
        per_layer = 4 * self.d_model * self.inner + 2 * self.d_model * self.inner + self.ffn_params
        return self.decoder_layers * per_layer + self.vocab_size * self.d_model


@dataclass(frozen=True)
class Rates:
    """What the machine sustains (measured by ``machine``): bytes/s read, FLOP/s of GEMMs."""
    read_bytes_per_s: float
    gemm_flops_per_s: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.gemm_flops_per_s, nbytes / self.read_bytes_per_s)


def floor_seconds(shape: ModelShape, workload: Workload, rates: Rates, weight_bytes: float,
                  activation_bytes: float) -> float:
    """Lower bound on a workload's time: each phase is bound by its FLOPs or its bytes read.

    Encoder: linear FLOPs plus the two attention matmuls, weights read once. Decode step: the
    weights of ``decode_step_params`` (``weight_bytes`` each) plus the K/V cache rows the step's
    attention reads (self-attention at its mean length, cross-attention over the source).
    """
    b, length = workload.batch, workload.source_length
    tokens = b * length
    attention_flops = shape.encoder_layers * 4 * b * length * length * shape.inner
    total = rates.seconds(2 * tokens * shape.encoder_params + attention_flops,
                          shape.encoder_params * weight_bytes)
    if workload.kind == "encoder":
        return total
    rows = b * workload.num_beams
    total += rates.seconds(2 * tokens * shape.cross_kv_params, shape.cross_kv_params * weight_bytes)
    mean_self_length = (workload.new_tokens + 1) / 2
    kv_rows = b * length + rows * mean_self_length  # beams of one source share its cross K/V
    kv_bytes = 2 * shape.inner * shape.decoder_layers * kv_rows * activation_bytes
    step = rates.seconds(2 * rows * shape.decode_step_params, shape.decode_step_params * weight_bytes + kv_bytes)
    return total + workload.new_tokens * step
