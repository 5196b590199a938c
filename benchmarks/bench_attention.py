"""GPU benchmark of kernels.attention at umt5-xxl shapes (64 heads, d_kv 64) against its peers.

Peers: the eager op (materialises [B, H, L, L] scores), torch SDPA given the bias + mask as a
precomputed [B, H, L, L] tensor (its build is not timed: a lower bound for that approach), and
FlexAttention with a score_mod that computes the bucket per score. Prints p50 GPU time and TFLOP/s
and appends one row per (case, implementation) to benchmarks/results/kernels.csv.

    python -m benchmarks.bench_attention

``measure`` and ``append_rows`` are shared by the other ``bench_*`` kernel scripts.
"""
import csv
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "kernels.csv"
FIELDS = ["date", "device", "kernel", "case", "implementation", "dtype", "ms_p20", "ms_p50", "ms_p80", "tflops", "gbps"]
HEADS, HEAD_DIM, NUM_BUCKETS, MAX_DISTANCE = 64, 64, 32, 128


def measure(fn):
    """p20, p50, p80 of ``fn``'s GPU time in ms, replayed from a CUDA graph: at these sizes python
    launch overhead (tens of microseconds a launch) would otherwise hide the kernels, and the model
    replays its steps from graphs too. ``fn`` runs once uncaptured first (autotuning happens there)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, quantiles=[0.2, 0.5, 0.8])


def result_row(kernel, case, implementation, dtype, times_ms, tflops=None, gbps=None):
    p20, p50, p80 = times_ms
    return dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), kernel=kernel, case=case,
                implementation=implementation, dtype=str(dtype).removeprefix("torch."), ms_p20=f"{p20:.4f}",
                ms_p50=f"{p50:.4f}", ms_p80=f"{p80:.4f}", tflops="" if tflops is None else f"{tflops:.2f}",
                gbps="" if gbps is None else f"{gbps:.1f}")


def append_rows(rows):
    RESULTS.parent.mkdir(exist_ok=True)
    new_file = not RESULTS.exists()
    with RESULTS.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def flex_attention_fn(table, bidirectional, key_padding_mask, causal):
    from torch.nn.attention.flex_attention import flex_attention

    from umt5_fast.buckets import relative_position_bucket

    def score_mod(score, b, h, q_idx, kv_idx):
        bias = table[relative_position_bucket(kv_idx - q_idx, bidirectional, NUM_BUCKETS, MAX_DISTANCE), h]
        visible = key_padding_mask[b, kv_idx] & ((kv_idx <= q_idx) if causal else True)
        return torch.where(visible, score + bias, -1e30)

    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, scale=1.0)


def main():
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device, skipping")
        return
    from umt5_fast.buckets import position_bias
    from umt5_fast.kernels.attention import attention
    from umt5_fast.ops import eager

    device, dtype = "cuda", torch.bfloat16
    rows = []
    for batch, length, causal in [(1, 512, False), (8, 512, False), (8, 512, True), (1, 2048, False)]:
        q, k, v = (torch.randn(batch, length, HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
                   for _ in range(3))
        table = torch.randn(NUM_BUCKETS, HEADS, device=device, dtype=dtype)
        key_padding_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        key_padding_mask[:, length - length // 8:] = False  # some right padding, as in a batch
        kwargs = dict(bidirectional=not causal, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE,
                      key_padding_mask=key_padding_mask, causal=causal)
        bias = position_bias(table, torch.arange(length, device=device), length, not causal, NUM_BUCKETS,
                             MAX_DISTANCE)
        masked = ~key_padding_mask[:, None, None, :]
        if causal:
            masked = masked | torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        sdpa_bias = bias.masked_fill(masked, torch.finfo(dtype).min)
        implementations = {
            "eager": lambda: eager.attention(q, k, v, table, **kwargs),
            "sdpa+bias": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_bias,
                                                                                 scale=1.0),
            "triton-bucket": lambda: attention(q, k, v, table, bias_mode="bucket", **kwargs),
            "triton-distance": lambda: attention(q, k, v, table, bias_mode="distance", **kwargs),
        }
        try:
            flex = flex_attention_fn(table, not causal, key_padding_mask, causal)
            flex(q, k, v)
            implementations["flex"] = lambda: flex(q, k, v)
        except Exception as exc:  # a torch without a working FlexAttention compile
            print(f"  flex attention unavailable: {type(exc).__name__}: {exc}")
        flops = 4 * batch * HEADS * length * length * HEAD_DIM * (0.5 if causal else 1.0)
        case = f"B={batch} L={length} H={HEADS} D={HEAD_DIM} {'causal' if causal else 'bidirectional'}"
        print(case)
        for name, fn in implementations.items():
            try:
                times = measure(fn)
            except Exception as exc:  # e.g. a compiled peer that cannot be captured in a CUDA graph
                print(f"  {name:16s} failed: {type(exc).__name__}: {exc}")
                continue
            tflops = flops / (times[1] * 1e-3) / 1e12
            print(f"  {name:16s} {times[1]:8.3f} ms  {tflops:6.1f} TFLOP/s")
            rows.append(result_row("attention", case, name, dtype, times, tflops=tflops))
    append_rows(rows)


if __name__ == "__main__":
    main()
