"""The LM head screen (umt5_fast/lm_head_screen.py): its argmax is the float kernel's argmax over
every logit, index for index, on random and adversarial heads (exact ties, near-duplicate rows,
outlier inputs, forbidden ids); its bound holds; it engages in greedy generation, where the ids
equal the unscreened path's and transformers'."""
import math

import pytest
import torch

import umt5_fast
from umt5_fast import generation, lm_head_screen
from umt5_fast.quant import QuantizedWeight
from helpers import random_batch

pytest.importorskip("umt5_fast._C")
from umt5_fast.ops import cpu as cpu_ops  # noqa: E402


def full_argmax(x, weight, forbidden=None):
    logits = cpu_ops.linear(x, weight).float()
    if forbidden:
        logits[:, forbidden] = -float("inf")
    return cpu_ops.argmax(logits)


def random_head(vocab, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(vocab, 1, generator=g) * 2 + 0.1  # rows of different sizes, as trained heads
    return (torch.randn(vocab, dim, generator=g) * scales * 0.05).to(dtype)


def make_head(kind, vocab, dim, seed):
    """A random LM head: an fp32 / bf16 / fp16 tensor, or int8 weights (``QuantizedWeight``)."""
    if kind == "int8":
        return QuantizedWeight.quantize(random_head(vocab, dim, torch.float32, seed))
    return random_head(vocab, dim, kind, seed)


# (LM head weight, activations): fp32 model, bf16 / fp16 weights with fp32 activations, bf16 / fp16
# model, int8 weights with fp32 activations and in a bf16 / fp16 model
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float16, torch.float16),
          ("int8", torch.float32), ("int8", torch.bfloat16), ("int8", torch.float16)]


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype,x_dtype", DTYPES)
@pytest.mark.parametrize("vocab,dim", [(997, 37), (4099, 64), (1500, 129)])
def test_argmax_equals_the_float_kernels_on_random_inputs(vocab, dim, dtype, x_dtype):
    weight = make_head(dtype, vocab, dim, seed=vocab + dim)
    screen = lm_head_screen.LMHeadScreen(weight)
    g = torch.Generator().manual_seed(dim)
    decided = 0
    for trial in range(30):
        rows = 1 + trial % 5
        x = torch.randn(rows, dim, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,), generator=g))
        if trial % 3 == 0:  # outlier features, as trained T5 hidden states have
            x[:, int(torch.randint(0, dim, (1,), generator=g))] *= 100
        forbidden = [1, int(torch.randint(0, vocab, (1,), generator=g))] if trial % 2 else None
        x = x.to(x_dtype)
        got = screen.argmax(x, forbidden)
        if got is not None:
            decided += 1
            assert torch.equal(got, full_argmax(x, weight, forbidden)), f"trial {trial}"
    assert decided >= 25  # the screen decides, rather than falling back


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype,x_dtype", DTYPES)
def test_a_vocabulary_split_between_threads(dtype, x_dtype):
    """Past 2^14 columns the thresholding splits its chunks of columns between threads (both passes)."""
    weight = make_head(dtype, 70001, 24, seed=9)
    screen = lm_head_screen.LMHeadScreen(weight)
    g = torch.Generator().manual_seed(2)
    for rows in (1, 3, 16):
        x = torch.randn(rows, 24, generator=g).to(x_dtype)
        got = screen.argmax(x, forbidden=[0, 69999])
        assert got is not None and torch.equal(got, full_argmax(x, weight, [0, 69999]))


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "int8"], ids=str)
def test_argmax_at_panel_gemm_rows_equals_the_float_kernels(dtype):
    """From 33 rows the panel GEMM computes the logits, in another order of summation than the GEMV;
    the candidates' logits come from the same kernel, so the picks stay the unscreened argmax, also
    among near-duplicate head rows (several candidates per input row)."""
    base = random_head(2999, 45, torch.float32, seed=4)
    base[1000:1040] = base[1000] + 1e-4 * torch.randn(40, 45, generator=torch.Generator().manual_seed(3))
    weight = QuantizedWeight.quantize(base) if dtype == "int8" else base.to(dtype)  # near duplicates
    screen = lm_head_screen.LMHeadScreen(weight)
    g = torch.Generator().manual_seed(5)
    for rows in (33, 40, 70):
        x = torch.randn(rows, 45, generator=g)
        x[::3] = base[1000] * 50 + torch.randn(45, generator=g) * 1e-3  # aimed at the duplicates
        got = screen.argmax(x, forbidden=[7])
        kernel = (cpu_ops.int8_kernel_computes(x.dtype, rows) if dtype == "int8"
                  else cpu_ops.float_kernel_computes(x.dtype, dtype, rows))
        assert (got is not None) == kernel  # (the portable build's fp32 GEMV stops at 32 rows)
        if got is not None:
            assert torch.equal(got, full_argmax(x, weight, [7]))


def input_quantisation_error(x):
    """||x - scale q|| per row for the int8 q and scale of W8A8Weight's reference quantiser."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    q = torch.round(x * (torch.full_like(amax, 127.0) / amax)).clamp(-127, 127).nan_to_num(0.0)  # zero rows: 0
    return (x.double() - (amax / 127).double() * q.double()).norm(dim=1)


@pytest.mark.usefixtures("every_cpu_isa")
def test_the_input_quantisation_error_is_the_kernels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 131, generator=g) * torch.logspace(-20, 20, 7)[:, None]
    x[2, 5] = 300.0
    x[4] = 0
    got = torch.empty(7, dtype=torch.float64)
    cpu_ops._C.w8a8_quantisation_error(x=x.data_ptr(), rows=7, in_features=131, out=got.data_ptr(), num_threads=2)
    torch.testing.assert_close(got, input_quantisation_error(x), rtol=1e-12, atol=0)
    assert float(got[4]) == 0 and bool((got[:4] > 0).all())


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("head", ["float32", "bfloat16", "float16", "int8"])
def test_bound_holds_for_every_row(head):
    weight = make_head(head if head == "int8" else getattr(torch, head), 3001, 71, seed=3)
    screen = lm_head_screen.LMHeadScreen(weight)
    x = torch.randn(4, 71) * 3
    x[0, 5] = 400.0
    approx = cpu_ops.kernel_linear(x, screen.screen)
    exact = cpu_ops.linear(x, weight)
    bound = (x.double().norm(dim=1, keepdim=True) * screen.bound.double()
             + input_quantisation_error(x)[:, None] * screen.input_error_bound.double())
    error = (approx.double() - exact.double()).abs()
    assert bool((error <= bound).all())
    # and not vacuous: per input row, within 10x of the largest error over the head (~3-6x seen)
    assert bool((bound.max(dim=1).values < 10 * error.max(dim=1).values).all())


@pytest.mark.parametrize("head", ["float32", "bfloat16", "float16", "int8"])
def test_row_norms_of_the_build_match_torch_in_fp64(head):
    weight = random_head(301, 77, torch.float32 if head == "int8" else getattr(torch, head), seed=5)
    weight[3] = 0  # a zero row quantises to zeros
    screen = lm_head_screen.LMHeadScreen(weight)
    qweight, scale = screen.screen.qweight, screen.screen.scale
    assert torch.equal(qweight, QuantizedWeight.quantize(weight).qweight)
    norms = torch.empty(301, 3, dtype=torch.float64)
    weight_kind = {"float32": 0, "bfloat16": 1, "float16": 3, "int8": 0}[head]
    cpu_ops._C.screen_row_norms(weight=0 if head == "int8" else weight.data_ptr(), weight_kind=weight_kind,
                                qweight=qweight.data_ptr(), scale=scale.data_ptr(),
                                rows=301, cols=77, out=norms.data_ptr(), num_threads=2)
    screened = qweight.double() * scale.double()[:, None]
    exact = screened if head == "int8" else weight.double()  # (an int8 head: w = s q)
    expected = torch.stack([(exact - screened).norm(dim=1), screened.norm(dim=1), exact.norm(dim=1)], dim=1)
    torch.testing.assert_close(norms, expected, rtol=1e-12, atol=0)


@pytest.mark.usefixtures("every_cpu_isa")
def test_exact_ties_and_near_duplicates_pick_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 48, generator=g) * 0.05
    weight = base.clone()
    weight[400] = weight[17]  # exact duplicates: equal logits, the first index wins
    weight[250] = weight[17]
    weight[300] = weight[17] * (1 + 1e-7)  # closer than any bound can separate
    screen = lm_head_screen.LMHeadScreen(weight)
    x = weight[17:18] * 40  # row 17 (and its copies) score highest
    got = screen.argmax(x)
    assert got is not None and int(got) == int(full_argmax(x, weight)) and int(got) in (17, 300)
    assert screen.last_candidates >= 4  # every copy was computed exactly
    assert int(screen.argmax(x, forbidden=[17])) == int(full_argmax(x, weight, [17]))


@pytest.mark.parametrize("target", [-4.01, -3.99, -4.0, 3.99, 4.02, 0.001, -0.001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logits_that_round_equal_pick_the_first(target, dtype):
    """A bf16 / fp16 model's logits are fp32 sums rounded to its dtype: rows whose sums differ below
    its spacing tie after rounding, and the first of them is the pick, also where the largest logit
    sits next to a power of two (where rounding down and up have different spacings)."""
    heads_with_ties = 0
    for seed in range(4):  # (in fp16, finer, some draws leave the largest logit alone)
        logits, got = screen_tied_logits(target, dtype, seed)
        heads_with_ties += int((logits == logits.max()).sum()) > 1
        assert got is not None and torch.equal(got, cpu_ops.argmax(logits.float()))
    assert heads_with_ties >= 1, "the test needs rows that tie after rounding"


def screen_tied_logits(target, dtype, seed):
    """A head of near-equal rows and an input whose largest logit sits at ``target``: its logits in
    ``dtype`` and the screen's pick."""
    g = torch.Generator().manual_seed(int(target * 1000) % 97 + 1000 * seed)
    # Integer rows with 127 as their largest entry quantise to int8 exactly, and so does an input of
    # integers with 127 among them times a power of two: the bound is only the rounding terms, far
    # below a bf16 / fp16 spacing, so ties after rounding are the screen's to resolve.
    base = torch.randint(-100, 101, (64,), generator=g).float()
    base[0] = 127
    # sums ~0.1% apart: many share a rounded value (at most _MAX_CANDIDATES rows: the screen decides)
    nudges = torch.randint(-1, 2, (1000, 64), generator=g).float() * (torch.rand(1000, 64, generator=g) < 0.05)
    nudges[:, 0] = 0
    # x = v 2^-j with v . base ~ |target| 2^j: v keeps 127 first and scales the rest of base down
    # (2^-j base . base lies in [|target|, 2 |target|)), then +-1 steps close the gap. fp16 holds
    # v 2^-a exactly down to a = 24 (subnormals): the rest of 2^-j scales the weight.
    j = math.floor(math.log2(float(base @ base) / abs(target)))
    x_exponent = j if dtype == torch.bfloat16 else min(j, 24)
    weight = ((base + nudges) * 2.0 ** (x_exponent - j)).to(dtype)
    assert torch.equal(weight.double() * 2.0 ** (j - x_exponent), (base + nudges).double())
    screen = lm_head_screen.LMHeadScreen(weight)
    assert float(screen.bound.max()) < 1e-3 * float(base.norm()) * 2.0 ** (x_exponent - j)
    wanted = abs(target) * 2.0 ** j
    v = torch.cat([base[:1], torch.round(base[1:] * (wanted - 127 ** 2) / float(base[1:] @ base[1:]))])
    for i in base[1:].abs().argsort(descending=True)[:40] + 1:  # (entries of base that are not 0)
        gap = wanted - float(v @ base)
        step = max(-1.0, min(1.0, round(gap / float(base[i]))))
        v[i] = (v[i] + step).clamp(-126, 126)
    x = (math.copysign(1.0, target) * v * 2.0 ** -x_exponent).to(dtype)[None, :]
    assert float(input_quantisation_error(x)) == 0.0
    logits = cpu_ops.linear(x, weight)
    assert logits.dtype == dtype and abs(float(logits.max()) / target - 1) < 3e-3  # the largest logit at the target
    return logits, screen.argmax(x)


def test_undecidable_inputs_fall_back():
    weight = random_head(300, 16, torch.float32, seed=1)
    screen = lm_head_screen.LMHeadScreen(weight)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 16)
        x[1, 3] = bad
        assert screen.argmax(x) is None
    assert screen.argmax(torch.randn(1, 16) * 1e30) is None  # logits near fp32 overflow
    many_rows = torch.randn(cpu_ops.fp32_kernel_max_rows() + 1, 16)
    assert screen.argmax(many_rows) is None  # torch's GEMM computes those logits
    bf16_screen = lm_head_screen.LMHeadScreen(weight.bfloat16())
    assert bf16_screen.argmax(torch.randn(cpu_ops.half_kernel_max_rows(torch.bfloat16) + 1, 16).bfloat16()) is None
    assert screen.argmax(torch.randn(1, 16).half()) is None  # fp16 x with an fp32 head: eager's GEMM
    for seed in range(40):  # logits in fp32's subnormal range, where relative rounding bounds fail
        g = torch.Generator().manual_seed(seed)
        small_head = torch.randn(64, 16, generator=g) * 1e-11
        tiny_x = torch.randn(1, 16, generator=g) * 3e-34
        got = lm_head_screen.LMHeadScreen(small_head).argmax(tiny_x)  # (without the underflow rule: 6 wrong)
        assert got is None or torch.equal(got, full_argmax(tiny_x, small_head))
    assert screen.argmax(torch.zeros(1, 16)) is None
    assert screen.argmax(torch.randn(0, 16)) is None
    same = lm_head_screen.LMHeadScreen(torch.ones(3000, 8))  # every logit equal: all candidates
    assert same.argmax(torch.randn(1, 8)) is None
    for bad in (torch.randn(1, 17), torch.randn(16), torch.randn(1, 1, 16)):
        with pytest.raises(ValueError, match=r"x \[rows, 16\]"):
            screen.argmax(bad)
    limit = lm_head_screen._MAX_CANDIDATES  # up to it the candidates are computed exactly
    at_limit = lm_head_screen.LMHeadScreen(torch.ones(limit, 8))
    assert int(at_limit.argmax(torch.ones(1, 8))) == 0 and at_limit.last_candidates == limit
    assert int(at_limit.argmax(torch.ones(1, 8), forbidden=[0, 5])) == 1
    assert lm_head_screen.LMHeadScreen(torch.ones(limit + 1, 8)).argmax(torch.ones(1, 8)) is None
    assert lm_head_screen.LMHeadScreen(torch.ones(3, 8)).argmax(torch.ones(1, 8), forbidden=[0, 1, 2]) is None


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_logits_past_its_range_take_the_float_path(x_dtype):
    """fp16 logits past 65504 round to inf, where every row that does ties with the largest and
    the first of them is the pick, candidate or not: the screen leaves those steps to the float
    path (fp32 logits of an fp16 head do not round, and the screen decides them)."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(2000, 32, generator=g) * 8).half()
    screen = lm_head_screen.LMHeadScreen(weight)
    x = torch.randn(3, 32, generator=g)
    largest = cpu_ops.linear(x, weight.float()).amax(1, keepdim=True)  # (positive for random rows)
    for scale, overflows in ((4 * 65504, True), (30000, False)):  # largest logits 4x past fp16's range, or within
        scaled = (x * scale / largest).to(x_dtype)
        assert scaled.isfinite().all()
        logits = cpu_ops.linear(scaled, weight)
        got = screen.argmax(scaled)
        if overflows and x_dtype == torch.float16:
            assert logits.isinf().any(1).all() and got is None
        else:
            assert logits.isfinite().all() and got is not None and torch.equal(got, full_argmax(scaled, weight))


def load(checkpoint_factory, **overrides):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **overrides)
    return umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu"), hf


@pytest.mark.parametrize("overrides", [dict(vocab_size=3001), dict(vocab_size=2003, tie_word_embeddings=True),
                                       dict(vocab_size=1009, feed_forward_proj="relu")])
@pytest.mark.parametrize("dtype,quantize", [(None, None), (None, "bf16"), (torch.bfloat16, None), (None, "int8"),
                                           (torch.bfloat16, "int8"), (torch.float16, None), (torch.float16, "int8")])
def test_greedy_generation_uses_the_screen_and_keeps_the_ids(checkpoint_factory, overrides, dtype, quantize):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **overrides)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu", dtype=dtype,
                                                                   quantize=quantize)
    ids, mask = random_batch(model.config.vocab_size, 5, 47, seed=4)  # right, left and no padding
    kwargs = dict(attention_mask=mask, max_new_tokens=45, min_new_tokens=30)  # past max_distance 40
    screened = model.generate(ids, **kwargs)
    screen = model._lm_head_screen[1]
    assert screen is not None and screen.last_candidates is not None
    model.screen_lm_head = False
    assert torch.equal(screened, model.generate(ids, **kwargs))
    if quantize is None and dtype is None:
        use_cache = hf.config.num_decoder_layers <= hf.config.num_layers  # (transformers' cache needs it)
        with torch.no_grad():
            assert torch.equal(screened, hf.generate(ids, use_cache=use_cache, **kwargs))


@pytest.mark.parametrize("edit", ["new parameter", "in place through .data", "in place"])
def test_the_screen_follows_a_new_lm_head(checkpoint_factory, edit):
    model, _ = load(checkpoint_factory, vocab_size=777)
    ids, mask = random_batch(777, 2, 9, seed=1)
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    first = model._lm_head_screen[1]
    with torch.no_grad():
        if edit == "new parameter":
            model.lm_head.weight = torch.nn.Parameter(torch.roll(model.lm_head.weight, 1, dims=0),
                                                      requires_grad=False)
        elif edit == "in place through .data":  # leaves _version as it was
            model.lm_head.weight.data.mul_(-1)
        else:
            model.lm_head.weight.mul_(-1)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert model._lm_head_screen[1] is not first
    model.screen_lm_head = False
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=6))
    assert "_lm_head_screen" not in model.__dict__  # a model that stops qualifying drops it


@pytest.mark.parametrize("edit", ["in place through .data", "new buffers"])
def test_an_int8_head_is_its_own_screen_and_followed(checkpoint_factory, edit):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", vocab_size=907)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu", quantize="int8")
    ids, mask = random_batch(907, 3, 10, seed=6)
    model.generate(ids, attention_mask=mask, max_new_tokens=4)
    first = model._lm_head_screen[1]
    # the head's own int8 values, not a copy
    assert first.screen.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    with torch.no_grad():
        if edit == "new buffers":
            model.lm_head.qweight = torch.roll(model.lm_head.qweight, 1, dims=0)
        else:
            model.lm_head.qweight.data.mul_(-1)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=7)
    assert model._lm_head_screen[1] is not first
    model.screen_lm_head = False
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=7))


def test_w8a8_heads_and_many_bf16_rows_at_int8_heads_are_not_screened(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", vocab_size=601)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu", quantize="w8a8")
    assert lm_head_screen.screen_for(model) is None  # its logits are the integer kernel's already
    screen = lm_head_screen.LMHeadScreen(make_head("int8", 300, 16, seed=2))
    many_bf16_rows = torch.randn(cpu_ops.half_kernel_max_rows(torch.bfloat16) + 1, 16).bfloat16()
    assert screen.argmax(many_bf16_rows) is None  # eager's bf16 GEMM (or the fp32 one) computes those logits
    assert screen.argmax(many_bf16_rows[:-1]) is not None
    many_fp16_rows = torch.randn(cpu_ops.half_kernel_max_rows(torch.float16) + 1, 16).half()
    assert screen.argmax(many_fp16_rows) is None  # likewise fp16 rows
    assert screen.argmax(many_fp16_rows[:-1]) is not None
    fp16_rows = torch.randn(2, 16).half()
    assert torch.equal(screen.argmax(fp16_rows), full_argmax(fp16_rows, screen.weight))
    assert screen.argmax(torch.randn(2, 16)) is not None
    many_rows = torch.randn(cpu_ops.WIDE_GEMM_MIN_ROWS, 16)  # a wide GEMM would compute this head's logits
    assert (screen.argmax(many_rows) is None) == cpu_ops.WIDE_GEMMS


@pytest.mark.parametrize("dtype", ["int8", torch.bfloat16, torch.float32])
def test_many_rows_with_a_head_too_big_for_a_wide_gemm(dtype, monkeypatch):
    """From WIDE_GEMM_MIN_ROWS rows on, a head above WIDE_GEMM_MAX_WEIGHT (a real LM head) still takes the
    C++ kernel unscreened, so the screen decides (fp32 heads: torch's GEMM, so it declines); its
    candidates' logits come from that kernel too, not from a wide GEMM, which takes a few rows."""
    weight = make_head(dtype, 2003, 40, seed=4)
    monkeypatch.setattr(cpu_ops, "WIDE_GEMM_MAX_WEIGHT", 2003 * 40 - 1)
    screen = lm_head_screen.LMHeadScreen(weight)
    x = torch.randn(cpu_ops.WIDE_GEMM_MIN_ROWS + 3, 40, generator=torch.Generator().manual_seed(1))
    got = screen.argmax(x)
    if dtype == torch.float32:
        assert got is None
    else:
        assert got is not None and torch.equal(got, full_argmax(x, weight))


def test_a_head_wider_than_the_int32_sums_is_refused():
    with pytest.raises(ValueError, match="65536 products"):
        lm_head_screen.LMHeadScreen(torch.zeros(3, 65537))


def test_an_int8_head_with_non_finite_scales_is_not_screened():
    head = make_head("int8", 300, 16, seed=2)
    head.scale[5] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        lm_head_screen.LMHeadScreen(head)


@pytest.mark.parametrize("processor", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
                                       dict(output_scores=True, return_dict_in_generate=True),
                                       dict(do_sample=True, top_k=5)])
def test_other_processors_take_the_float_path(checkpoint_factory, monkeypatch, processor):
    model, hf = load(checkpoint_factory, vocab_size=555)
    ids, mask = random_batch(555, 3, 12, seed=2)
    calls = []
    monkeypatch.setattr(lm_head_screen.LMHeadScreen, "argmax", lambda self, *a: calls.append(1))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, **processor)
    got = model.generate(ids, **kwargs)
    assert not calls
    if not processor.get("do_sample"):
        with torch.no_grad():
            expected = hf.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(getattr(got, "sequences", got), getattr(expected, "sequences", expected))


def test_a_screen_that_cannot_decide_is_dropped_for_the_call(checkpoint_factory, monkeypatch):
    model, _ = load(checkpoint_factory, vocab_size=555)
    ids, mask = random_batch(555, 3, 12, seed=2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    calls = []
    monkeypatch.setattr(lm_head_screen.LMHeadScreen, "argmax", lambda self, *a: calls.append(1))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(got, expected) and len(calls) == 3


def test_a_non_finite_head_takes_the_float_path(checkpoint_factory):
    model, _ = load(checkpoint_factory, vocab_size=555)
    ids, mask = random_batch(555, 3, 12, seed=2)
    with torch.no_grad():
        model.lm_head.weight[7, 3] = float("inf")
    assert lm_head_screen.screen_for(model) is None
    model.generate(ids, attention_mask=mask, max_new_tokens=3)  # still decodes, every logit computed


def test_a_batch_past_the_float_kernels_rows_keeps_the_ids(checkpoint_factory):
    """Rows past fp32_kernel_max_rows(): torch's GEMM computes those logits, so the screen declines (and
    is dropped for the call after three steps); ids stay the unscreened path's and transformers'."""
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", vocab_size=1201, d_model=36, num_heads=3, d_kv=12,
                                  num_layers=3)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu")
    ids, mask = random_batch(1201, cpu_ops.fp32_kernel_max_rows() + 2, 21, seed=8)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    with torch.no_grad():
        assert torch.equal(got, hf.generate(ids, attention_mask=mask, max_new_tokens=12))
    model.screen_lm_head = False
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=12))


def test_threads_sharing_a_screen_get_their_own_picks():
    """The screen keeps one product buffer: calls from threads that share a model take turns on it,
    each with its own rows and row counts."""
    import threading
    weight = make_head("int8", 20000, 40, seed=11)
    screen = lm_head_screen.LMHeadScreen(weight)
    inputs = [torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows)) for rows in (1, 3, 7, 16)]
    expected = [full_argmax(x, weight) for x in inputs]
    failures = []

    def run(x, want):
        for _ in range(15):
            got = screen.argmax(x)
            if got is None or not torch.equal(got, want):
                failures.append(x.shape[0])

    threads = [threading.Thread(target=run, args=pair) for pair in zip(inputs, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype,x_dtype", DTYPES)
def test_top_candidates_hold_the_float_kernels_logits_at_every_top_k_id(dtype, x_dtype):
    """top_candidates keeps, bit for bit, the float kernel's logit of every id among a row's k
    largest (ties at the k-th included), in ascending ids, and leaves out the forbidden ids; what else
    it keeps is exact too."""
    vocab, dim = 30011, 48
    weight = make_head(dtype, vocab, dim, seed=5)
    screen = lm_head_screen.LMHeadScreen(weight)
    g = torch.Generator().manual_seed(6)
    decided = 0
    for trial in range(12):
        k = [1, 5, 50, 17][trial % 4]
        x = (torch.randn(1 + trial % 4, dim, generator=g) * 3).to(x_dtype)
        forbidden = [1, 7] if trial % 2 else None
        candidates = screen.top_candidates(x, k, forbidden)
        if candidates is None:
            continue
        decided += 1
        ids, logits = candidates
        assert bool((ids[1:] > ids[:-1]).all()) and logits.shape == (x.shape[0], len(ids))
        full = cpu_ops.linear(x, weight).float()
        assert torch.equal(logits, full[:, ids])
        if forbidden:
            full[:, forbidden] = -math.inf
        top = (full >= full.topk(k).values[:, -1:]).any(0).nonzero().squeeze(1)
        assert bool(torch.isin(top, ids).all()) and not bool(torch.isin(torch.tensor(forbidden or []), ids).any())
    assert decided >= 10
    assert screen.top_candidates(torch.randn(2, dim).to(x_dtype), vocab // 512 + 2) is None  # more than a chunk each


@pytest.mark.parametrize("dtype,quantize", [(None, None), (torch.bfloat16, None), (None, "int8")])
def test_top_k_sampling_uses_the_screen_and_draws_the_same_ids(checkpoint_factory, monkeypatch, dtype, quantize):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", vocab_size=6007)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu", dtype=dtype,
                                                                   quantize=quantize)
    ids, mask = random_batch(model.config.vocab_size, 3, 21, seed=9)
    for sampling in (dict(top_k=5), dict(top_k=8, top_p=0.7, temperature=0.6, min_new_tokens=6)):
        kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, **sampling)
        decided, drawn = [], []
        top_candidates, draw_from_candidates = lm_head_screen.LMHeadScreen.top_candidates, generation.draw_from_candidates
        def counted(self, *args):
            candidates = top_candidates(self, *args)
            decided.append(candidates is not None)
            return candidates
        def counted_draw(*args):
            picked = draw_from_candidates(*args)
            drawn.append(picked is not None)
            return picked
        monkeypatch.setattr(lm_head_screen.LMHeadScreen, "top_candidates", counted)
        monkeypatch.setattr(generation, "draw_from_candidates", counted_draw)
        torch.manual_seed(3)
        screened = model.generate(ids, **kwargs)
        # every step from the screen's candidates, drawn on their rows alone (a bf16 model's logits
        # are often equal: where top-p cuts between equal ones, the full rows draw)
        assert len(decided) == 12 and all(decided) and len(drawn) == 12
        assert sum(drawn) >= (6 if dtype == torch.bfloat16 and "top_p" in sampling else 12)
        monkeypatch.undo()
        model.screen_lm_head = False
        torch.manual_seed(3)
        assert torch.equal(screened, model.generate(ids, **kwargs))
        model.screen_lm_head = True
        if dtype is None and quantize is None:
            use_cache = hf.config.num_decoder_layers <= hf.config.num_layers
            torch.manual_seed(3)
            with torch.no_grad():
                assert torch.equal(screened, hf.generate(ids, use_cache=use_cache, **kwargs))
    calls = []  # rows x top_k past TOP_CANDIDATES_MAX_IDS: every logit from the first step
    monkeypatch.setattr(lm_head_screen.LMHeadScreen, "top_candidates", lambda self, *a: calls.append(1))
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                   top_k=lm_head_screen.TOP_CANDIDATES_MAX_IDS // 3 + 1)
    assert not calls
