"""Per-kernel CPU micro-benchmarks (pytest-benchmark): each C++ op beside its torch reference.

``pytest benchmarks/`` times every op of ``umt5_fast.ops.cpu`` (skipped when the extension does
not import) and the same call of ``umt5_fast.ops.eager`` (plain torch, the reference), on
umt5-small shapes. Results are grouped per op and shape, so each table row pair reads "kernel vs
torch". Each cpu benchmark first checks its result against the reference.

Useful options: ``--benchmark-columns=median,iqr,ops``, ``--benchmark-json=micro.json``,
``--benchmark-disable`` (run once, as a test), ``-k attention``.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from umt5_fast.ops import eager  # noqa: E402
from umt5_fast.quant import QuantizedWeight  # noqa: E402

try:
    from umt5_fast.ops import cpu as cpu_ops
    CPU_MISSING = None
except ImportError as exc:
    cpu_ops, CPU_MISSING = None, f"umt5_fast.ops.cpu does not import ({exc})"

# umt5-small
D_MODEL, HEADS, D_KV, D_FF = 512, 6, 64, 1024
NUM_BUCKETS, MAX_DISTANCE, EPS = 32, 128, 1e-6
LM_HEAD_ROWS = 32768  # a slice of the 256384-row LM head: 64 MB in fp32, far beyond the caches

OPS = [pytest.param(eager, id="eager"),
       pytest.param(cpu_ops, id="cpu", marks=pytest.mark.skipif(cpu_ops is None, reason=CPU_MISSING or ""))]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bench(benchmark, ops, group, fn, reference, tol):
    """Time ``fn(ops)`` in ``group``; for the kernel, first check it against ``reference(eager)``."""
    benchmark.group = group
    benchmark.extra_info["backend"] = ops.name
    if ops is not eager:
        out, ref = fn(ops).float(), reference(eager).float()
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= tol, f"{group}: {ops.name} differs from eager by {err:.3g} (> {tol:g})"
    benchmark(fn, ops)


@pytest.mark.parametrize("rows", [1, 512])
@pytest.mark.parametrize("ops", OPS)
def test_rms_norm(benchmark, ops, rows):
    x, weight = randn(rows, D_MODEL), randn(D_MODEL, seed=1).abs() + 0.5

    def call(o):
        return o.rms_norm(x, weight, EPS)
    bench(benchmark, ops, f"rms_norm rows={rows}", call, call, 1e-5)


# A half-precision model's attention against fp32 attention on the same values: within the output's
# rounding, and for bf16 products (AVX512-BF16) the probabilities' (tests/test_cpu_kernels.py).
HALF_ATTENTION_TOL = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("length", [128, 512, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ops", OPS)
def test_attention(benchmark, ops, dtype, length):
    """Encoder self-attention: bidirectional relative bias, all keys valid. bf16 / fp16: a
    half-precision model's q, k, v (the AVX512-BF16 kernel where the CPU has it, else the fp32 kernel
    reading the half-precision K/V; eager rounds its scores), checked against fp32 attention on the
    same values."""
    q, k, v = (randn(1, length, HEADS, D_KV, seed=s).to(dtype).transpose(1, 2) for s in (1, 2, 3))
    table = randn(NUM_BUCKETS, HEADS, seed=4)

    def call(o, q=q, k=k, v=v):
        return o.attention(q, k, v, table, bidirectional=True, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)

    def fp32_reference(o):
        return call(o, q.float(), k.float(), v.float())
    bench(benchmark, ops, f"attention {str(dtype)[6:]} L={length}", call, fp32_reference, HALF_ATTENTION_TOL[dtype])


@pytest.mark.skipif(cpu_ops is None or not cpu_ops._C.has_amx_attention(), reason="no AMX-BF16 here")
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("kernel", ["avx512-bf16", "amx"])
def test_bf16_attention_kernels(benchmark, kernel, length):
    """The two bf16 attention kernels on one CPU: vdpbf16ps pair products against AMX tiles."""
    q, k, v = (randn(1, length, HEADS, D_KV, seed=s).bfloat16().transpose(1, 2) for s in (1, 2, 3))
    table = randn(NUM_BUCKETS, HEADS, seed=4)
    default = cpu_ops._C.amx_attention_enabled()
    cpu_ops._C.enable_amx_attention(kernel == "amx")
    try:
        benchmark.group = f"bf16 attention kernels L={length}"
        benchmark(cpu_ops.attention, q, k, v, table, bidirectional=True, num_buckets=NUM_BUCKETS,
                  max_distance=MAX_DISTANCE)
    finally:
        cpu_ops._C.enable_amx_attention(default)


@pytest.mark.parametrize("rows", [1, 512])
@pytest.mark.parametrize("ops", OPS)
def test_gated_ffn(benchmark, ops, rows):
    """``gelu_new(x @ wi_0.T) * (x @ wi_1.T)``: the FFN's input half."""
    x = randn(rows, D_MODEL)
    w_gate, w_up = randn(D_FF, D_MODEL, seed=1, scale=0.05), randn(D_FF, D_MODEL, seed=2, scale=0.05)

    def call(o):
        return o.gated_ffn_in(x, w_gate, w_up, "gelu_new")
    bench(benchmark, ops, f"gated_ffn rows={rows}", call, call, 1e-4)


@pytest.mark.parametrize("rows", [256, 1024])
@pytest.mark.parametrize("ops", OPS)
def test_fp32_linear(benchmark, ops, rows):
    """An encoder-sized fp32 GEMM (umt5-small's wi_0): torch's F.linear (MKL; eager) against the cpu
    backend, which takes oneDNN on AMD AVX-512 CPUs (ops.cpu.WIDE_GEMMS_IN_ONEDNN; MKL elsewhere)."""
    x, weight = randn(rows, D_MODEL), randn(D_FF, D_MODEL, seed=1, scale=0.05)

    def call(o):
        return o.linear(x, weight)
    bench(benchmark, ops, f"fp32 linear {rows}x{D_MODEL} @ {D_FF}x{D_MODEL}", call, call, 1e-5)


@pytest.mark.parametrize("cache_length", [64, 512])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ops", OPS)
def test_decode_step_attention(benchmark, ops, dtype, cache_length):
    """One decode step's self-attention for 16 rows against a static cache of 1024 slots, in the
    model's dtype (a half-precision cache is read as it is, without an fp32 copy)."""
    batch, slots = 16, 1024
    q = randn(batch, HEADS, 1, D_KV).to(dtype)
    k_cache, v_cache = (randn(batch, HEADS, slots, D_KV, seed=s).to(dtype) for s in (1, 2))
    table = randn(NUM_BUCKETS, HEADS, seed=3)

    def call(o, q=q, k_cache=k_cache, v_cache=v_cache):
        return o.decode_attention(q, k_cache, v_cache, cache_length, table, num_buckets=NUM_BUCKETS,
                                  max_distance=MAX_DISTANCE)

    def fp32_reference(o):
        return call(o, q.float(), k_cache.float(), v_cache.float())
    bench(benchmark, ops, f"decode_attention {str(dtype)[6:]} b16 cache={cache_length}", call, fp32_reference,
          HALF_ATTENTION_TOL[dtype])


def lm_head_weight(kind):
    weight = randn(LM_HEAD_ROWS, D_MODEL, seed=5, scale=0.05)
    if kind == "int8":
        return QuantizedWeight.quantize(weight)
    return weight.to(torch.bfloat16) if kind == "bf16" else weight


@pytest.mark.parametrize("weight_kind", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("ops", OPS)
def test_decode_step_linear(benchmark, ops, weight_kind):
    """The decode step's bound: one row times an LM-head-sized weight (bandwidth, not FLOPs)."""
    x, weight = randn(1, D_MODEL), lm_head_weight(weight_kind)

    def call(o):
        return o.linear(x, weight)
    tol = 1e-4 if weight_kind == "fp32" else 1e-3
    bench(benchmark, ops, f"linear 1x{D_MODEL} @ {LM_HEAD_ROWS}x{D_MODEL} {weight_kind}", call, call, tol)


@pytest.mark.parametrize("rows", [48, 64, 128])
@pytest.mark.parametrize("weight_kind", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("ops", OPS)
def test_beam_rows_linear(benchmark, ops, weight_kind, rows):
    """Beams and larger batches (16 x 4 beams = 64 rows) times an LM-head-sized weight: FLOP-bound,
    the panel GEMM (cpu) against torch's GEMM on the weight (eager: expanded to fp32 first)."""
    x, weight = randn(rows, D_MODEL), lm_head_weight(weight_kind)

    def call(o):
        return o.linear(x, weight)
    tol = 1e-4 if weight_kind == "fp32" else 1e-3
    bench(benchmark, ops, f"linear {rows}x{D_MODEL} @ {LM_HEAD_ROWS}x{D_MODEL} {weight_kind}", call, call, tol)


@pytest.mark.skipif(cpu_ops is None, reason=CPU_MISSING or "")
@pytest.mark.parametrize("isa", cpu_ops._C.supported_cpu_isas() if cpu_ops else ["none"])
@pytest.mark.parametrize("rows,out_features", [(1, LM_HEAD_ROWS), (16, LM_HEAD_ROWS), (1024, D_FF)])
@pytest.mark.parametrize("layout", ["blocks", "rows"])
def test_w8a8_linear(benchmark, isa, rows, out_features, layout):
    """The integer GEMM on each instruction set's kernel (portable, AVX2 sign trick, AVX512-VNNI
    under avx512 where the CPU has it), in each weight layout (quant.w8a8_format picks one per
    instruction set), against the torch reference (exact sums in fp64)."""
    from umt5_fast.quant import W8A8RowWeight, W8A8Weight
    fmt = W8A8Weight if layout == "blocks" else W8A8RowWeight
    x, weight = randn(rows, D_MODEL), fmt.quantize(randn(out_features, D_MODEL, seed=2))
    default = cpu_ops._C.cpu_isa()
    cpu_ops._C.set_cpu_isa(isa)
    try:
        bench(benchmark, cpu_ops, f"w8a8 linear {rows}x{D_MODEL} @ {out_features}x{D_MODEL} {layout}",
              lambda o: o.linear(x, weight), lambda o: o.linear(x, weight), 0.0)
    finally:
        cpu_ops._C.set_cpu_isa(default)
    benchmark.extra_info["isa"] = isa


@pytest.mark.skipif(cpu_ops is None, reason=CPU_MISSING or "")
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("head", ["fp32", "int8"])
@pytest.mark.parametrize("path", ["all logits", "screened"])
def test_lm_head_argmax(benchmark, path, head, rows):
    """Greedy's pick from a whole umt5-small LM head (fp32, or weight-only int8): every logit +
    argmax, against the screen's integer product + the candidates' exact logits
    (umt5_fast/lm_head_screen.py); both give the same ids."""
    from umt5_fast.lm_head_screen import LMHeadScreen
    from umt5_fast.quant import QuantizedWeight
    weight = randn(256384, D_MODEL, seed=3, scale=0.05)
    if head == "int8":
        weight = QuantizedWeight.quantize(weight)
    x = randn(rows, D_MODEL, seed=4)
    screen = LMHeadScreen(weight)

    def all_logits():
        return cpu_ops.argmax(cpu_ops.linear(x, weight))
    expected = all_logits()
    call = all_logits if path == "all logits" else lambda: screen.argmax(x)
    assert torch.equal(call(), expected)
    benchmark.group = f"lm head argmax {rows}x{D_MODEL} @ {head} 256384x{D_MODEL}"
    benchmark.extra_info["candidates"] = screen.last_candidates
    benchmark(call)


@pytest.fixture(scope="module")
def small_decoder_model():
    """umt5-small's decoder (vocab cut to 32128: the LM head has its own benchmark above), random weights."""
    import umt5_fast
    config = umt5_fast.UMT5Config(vocab_size=32128, d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=1,
                                  num_decoder_layers=8, num_heads=HEADS, feed_forward_proj="gated-gelu",
                                  tie_word_embeddings=False)
    model = umt5_fast.UMT5ForConditionalGeneration(config, backend="cpu" if cpu_ops else "eager")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(randn(*p.shape, seed=100 + i, scale=0.05))
    return model


@pytest.mark.skipif(cpu_ops is None, reason=CPU_MISSING or "")
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("path", ["python", "cpu_step"])
def test_decode_step(benchmark, small_decoder_model, path, rows):
    """One single-token step of the whole decoder stack (8 layers, cache at position 32): the C++
    step (umt5_fast/decode_step.py) against the Python path it replaces; same logits, bit for bit."""
    from umt5_fast import decode_step, generation
    states = randn(rows, 64, D_MODEL, seed=7)
    decoders = {name: generation.Decoder(small_decoder_model, states, None, max_length=64)
                for name in ("python", "cpu_step")}
    decoders["python"].cpu_step = None
    assert decoders["cpu_step"].cpu_step is not None
    tokens = torch.arange(rows).view(rows, 1) + 5

    def step(decoder):
        decoder.cache.length = 32
        return decoder.step(tokens)
    with torch.inference_mode():
        for decoder in decoders.values():
            decoder.step(torch.zeros(rows, 1, dtype=torch.long))  # projects the cross-attention K/V
        if path == "cpu_step":
            assert torch.equal(step(decoders["cpu_step"]), step(decoders["python"]))
        benchmark.group = f"decoder step rows={rows}"
        benchmark.extra_info["path"] = path
        benchmark(step, decoders[path])
    assert decode_step.build(small_decoder_model) is not None
