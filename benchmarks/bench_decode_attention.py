"""GPU benchmark of kernels.decode_attention (one decoder step against the static KV cache) at
umt5-xxl shapes, against the eager op. A step reads the visible K and V once: GB/s is that
traffic over the time. Appends rows to benchmarks/results/kernels.csv.

    python -m benchmarks.bench_decode_attention
"""
import torch

from benchmarks.bench_attention import HEAD_DIM, HEADS, MAX_DISTANCE, NUM_BUCKETS, append_rows, measure, result_row


def main():
    if not torch.cuda.is_available():
        print("bench_decode_attention: no CUDA device, skipping")
        return
    from umt5_fast.kernels.decode_attention import decode_attention, default_num_splits
    from umt5_fast.ops import eager

    device, dtype = "cuda", torch.bfloat16
    rows = []
    for batch, max_length, length in [(1, 1024, 512), (1, 4096, 4000), (16, 1024, 512), (16, 4096, 4000)]:
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(batch, HEADS, max_length, HEAD_DIM, device=device, dtype=dtype)
                            for _ in range(2))
        table = torch.randn(NUM_BUCKETS, HEADS, device=device, dtype=dtype)
        cache_length = torch.tensor(length, device=device)
        kwargs = dict(num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)
        splits = default_num_splits(batch * HEADS, max_length, q.device)
        implementations = {
            "eager": lambda: eager.decode_attention(q, k_cache, v_cache, length, table, **kwargs),
            f"triton-splits{splits}": lambda: decode_attention(q, k_cache, v_cache, cache_length, table, **kwargs),
            "triton-splits1": lambda: decode_attention(q, k_cache, v_cache, cache_length, table, num_splits=1,
                                                       **kwargs),
        }
        bytes_read = 2 * batch * HEADS * length * HEAD_DIM * k_cache.element_size()
        case = f"B={batch} S_max={max_length} L={length} H={HEADS} D={HEAD_DIM}"
        print(case)
        for name, fn in implementations.items():
            times = measure(fn)
            gbps = bytes_read / (times[1] * 1e-3) / 1e9
            print(f"  {name:16s} {times[1] * 1e3:8.1f} us  {gbps:7.1f} GB/s")
            rows.append(result_row("decode_attention", case, name, dtype, times, gbps=gbps))
    append_rows(rows)


if __name__ == "__main__":
    main()
