"""GPU benchmark of kernels.gated_ffn at umt5-xxl shapes (d_model 4096, d_ff 10240): the fused
gated-GELU input projection and the output projection with its residual add, against eager.
Appends rows to benchmarks/results/kernels.csv.

    python -m benchmarks.bench_gated_ffn
"""
import torch

from benchmarks.bench_attention import append_rows, measure, result_row

D_MODEL, D_FF = 4096, 10240


def main():
    if not torch.cuda.is_available():
        print("bench_gated_ffn: no CUDA device, skipping")
        return
    from umt5_fast.kernels.gated_ffn import gated_ffn_in, linear
    from umt5_fast.ops import eager

    device, dtype = "cuda", torch.bfloat16
    w_gate, w_up = (torch.randn(D_FF, D_MODEL, device=device, dtype=dtype) / D_MODEL ** 0.5 for _ in range(2))
    w_out = torch.randn(D_MODEL, D_FF, device=device, dtype=dtype) / D_FF ** 0.5
    rows = []
    for tokens in (16, 512, 4096):  # a decode step at B=16, then B=1 and B=8 at L=512
        x = torch.randn(tokens, D_MODEL, device=device, dtype=dtype)
        hidden = torch.randn(tokens, D_FF, device=device, dtype=dtype)
        residual = torch.randn(tokens, D_MODEL, device=device, dtype=dtype)
        cases = {
            "gated_ffn_in": (2 * 2 * tokens * D_MODEL * D_FF, 2 * D_FF * D_MODEL + tokens * (D_MODEL + D_FF), {
                "eager": lambda: eager.gated_ffn_in(x, w_gate, w_up, "gelu_new"),
                "triton": lambda: gated_ffn_in(x, w_gate, w_up, "gelu_new"),
            }),
            "linear+residual": (2 * tokens * D_FF * D_MODEL, D_FF * D_MODEL + tokens * (D_FF + 2 * D_MODEL), {
                "eager": lambda: eager.linear(hidden, w_out, residual),
                "triton": lambda: linear(hidden, w_out, residual),
            }),
        }
        for op, (flops, elements, implementations) in cases.items():
            case = f"{op} M={tokens} d_model={D_MODEL} d_ff={D_FF}"
            print(case)
            for name, fn in implementations.items():
                times = measure(fn)
                seconds = times[1] * 1e-3
                tflops, gbps = flops / seconds / 1e12, elements * x.element_size() / seconds / 1e9
                print(f"  {name:8s} {times[1]:8.3f} ms  {tflops:6.1f} TFLOP/s  {gbps:7.1f} GB/s")
                rows.append(result_row("gated_ffn", case, name, dtype, times, tflops=tflops, gbps=gbps))
    append_rows(rows)


if __name__ == "__main__":
    main()
