"""GPU benchmark of kernels.rms_norm (plain and fused with the residual add) at d_model 4096,
against eager. Memory-bound: GB/s counts each tensor read or written once. Appends rows to
benchmarks/results/kernels.csv.

    python -m benchmarks.bench_rms_norm
"""
import torch

from benchmarks.bench_attention import append_rows, measure, result_row

D_MODEL = 4096


def main():
    if not torch.cuda.is_available():
        print("bench_rms_norm: no CUDA device, skipping")
        return
    from umt5_fast.kernels.rms_norm import add_rms_norm, rms_norm
    from umt5_fast.ops import eager

    device, dtype = "cuda", torch.bfloat16
    weight = torch.rand(D_MODEL, device=device, dtype=dtype)
    rows = []
    for tokens in (16, 512, 8192):
        x, residual = (torch.randn(tokens, D_MODEL, device=device, dtype=dtype) for _ in range(2))
        cases = {
            "rms_norm": (2, {"eager": lambda: eager.rms_norm(x, weight, 1e-6),
                             "triton": lambda: rms_norm(x, weight, 1e-6)}),
            # reads x and residual, writes the sum and the normalised sum
            "add+rms_norm": (4, {"eager": lambda: eager.rms_norm(x + residual, weight, 1e-6),
                                 "triton": lambda: add_rms_norm(x, residual, weight, 1e-6)}),
        }
        for op, (tensors_moved, implementations) in cases.items():
            case = f"{op} M={tokens} d_model={D_MODEL}"
            print(case)
            for name, fn in implementations.items():
                times = measure(fn)
                gbps = tensors_moved * x.numel() * x.element_size() / (times[1] * 1e-3) / 1e9
                print(f"  {name:8s} {times[1] * 1e3:8.1f} us  {gbps:7.1f} GB/s")
                rows.append(result_row("rms_norm", case, name, dtype, times, gbps=gbps))
    append_rows(rows)


if __name__ == "__main__":
    main()
