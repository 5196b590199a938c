"""generate() against transformers' generate: token-for-token in fp32 (greedy and beam)."""
import math
import types

import pytest
import torch

import umt5_fast
from umt5_fast import generation, processors
from helpers import assert_close, random_batch

CONFIGS = {
    # more decoder than encoder layers: transformers' cached generate crashes there, so its
    # use_cache=False path is the reference
    "odd": dict(),
    "tied-shallow-decoder": dict(tie_word_embeddings=True, num_layers=3, num_decoder_layers=1, num_heads=4,
                                 d_kv=12, feed_forward_proj="gated-silu"),
}


def pair(checkpoint_factory, name):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS[name])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    return ours, hf


def reference(hf, ids, mask, **kwargs):
    use_cache = hf.config.num_decoder_layers <= hf.config.num_layers
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, use_cache=use_cache, **kwargs)


def frequent_token(ours, ids, mask):
    """A token greedy decoding emits often: used as eos so that rows finish at different steps."""
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    counts = torch.bincount(out[:, 1:].flatten(), minlength=ours.config.vocab_size)
    counts[0] = 0
    return int(counts.argmax())


CASES = [
    dict(max_new_tokens=17),
    dict(max_length=13),
    dict(max_new_tokens=15, num_beams=4),
    dict(max_new_tokens=14, num_beams=3, num_return_sequences=2, length_penalty=0.6),
    dict(max_new_tokens=12, num_beams=2, early_stopping=True, length_penalty=1.5),
    dict(max_new_tokens=12, num_beams=3, early_stopping="never"),
    dict(max_new_tokens=16, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=4),
    dict(max_new_tokens=10, num_beams=2, no_repeat_ngram_size=3, min_length=6),
]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_transformers_generate(checkpoint_factory, config_name, case):
    ours, hf = pair(checkpoint_factory, config_name)
    ids, mask = random_batch(ours.config.vocab_size, 4, 45, seed=case)  # right, left and no padding
    eos = frequent_token(ours, ids, mask)
    kwargs = dict(CASES[case], eos_token_id=[eos, 1] if case % 2 else eos)
    expected = reference(hf, ids, mask, **kwargs)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected), f"\n{got}\n!=\n{expected}"


def test_scores_and_sequence_scores_match_transformers(checkpoint_factory):
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 2, 20, seed=3)
    for kwargs in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)):
        ref = reference(hf, ids, mask, return_dict_in_generate=True, output_scores=True, **kwargs)
        out = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs)
        assert torch.equal(out.sequences, ref.sequences)
        assert len(out.scores) == len(ref.scores)
        for a, b in zip(out.scores, ref.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if "num_beams" in kwargs:
            torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)


def test_decoder_prompt_is_prefilled(checkpoint_factory):
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 3, 30, seed=5)
    prompt = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(2, 100, (3, 4))], dim=1)
    expected = reference(hf, ids, mask, decoder_input_ids=prompt, max_new_tokens=8)
    assert torch.equal(ours.generate(ids, attention_mask=mask, decoder_input_ids=prompt, max_new_tokens=8),
                       expected)


def test_decoder_prompt_without_the_start_token_gets_it_prepended(checkpoint_factory):
    """transformers prepends decoder_start_token_id unless some row's prompt begins with it."""
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 3, 30, seed=9)
    prompt = torch.randint(2, 100, (3, 3), generator=torch.Generator().manual_seed(9))
    expected = reference(hf, ids, mask, decoder_input_ids=prompt, max_new_tokens=6)
    got = ours.generate(ids, attention_mask=mask, decoder_input_ids=prompt, max_new_tokens=6)
    assert got.shape == (3, 1 + 3 + 6) and torch.equal(got, expected)
    prompt[1, 0] = ours.config.decoder_start_token_id  # one row starts with it: all are used as given
    expected = reference(hf, ids, mask, decoder_input_ids=prompt, max_new_tokens=6)
    got = ours.generate(ids, attention_mask=mask, decoder_input_ids=prompt, max_new_tokens=6)
    assert got.shape == (3, 3 + 6) and torch.equal(got, expected)


def test_a_missing_mask_is_inferred_from_pad_tokens_as_transformers_does(checkpoint_factory):
    """Without attention_mask, transformers masks the pad tokens of the input unless pad is an
    eos token; padded inputs then decode as with their explicit mask."""
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 4, 30, seed=10)
    pad = ours.config.pad_token_id
    for kwargs in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        expected = reference(hf, ids, None, **kwargs)
        assert torch.equal(expected, reference(hf, ids, mask, **kwargs))
        assert not torch.equal(expected, reference(hf, ids, torch.ones_like(mask), **kwargs))
        assert torch.equal(ours.generate(ids, **kwargs), expected)
    # pad is an eos token: no mask is inferred
    expected = reference(hf, ids, None, max_new_tokens=8, eos_token_id=[pad, 1])
    assert torch.equal(expected, reference(hf, ids, torch.ones_like(mask), max_new_tokens=8, eos_token_id=[pad, 1]))
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=[pad, 1]), expected)


def test_sampling_is_reproducible_and_follows_transformers(checkpoint_factory):
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 2, 25, seed=8)
    kwargs = dict(do_sample=True, max_new_tokens=12, top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=3)
    a = ours.generate(ids, attention_mask=mask, seed=123, **kwargs)
    b = ours.generate(ids, attention_mask=mask, seed=123, **kwargs)
    c = ours.generate(ids, attention_mask=mask, seed=124, **kwargs)
    assert torch.equal(a, b) and a.shape == (6, 13) and not torch.equal(a, c)
    # with the same global RNG state, the eager backend draws exactly what transformers draws
    torch.manual_seed(7)
    expected = reference(hf, ids, mask, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize("draws", ["c++ twister", "random_"])
def test_multinomial_draw_is_torch_multinomial(draws, monkeypatch):
    """The same ids as torch.multinomial(probs, 1) from the same generator state, which it leaves
    where torch does: filtered and full distributions, ties, a single token, underflowing ratios
    (torch's draw), the default generator, and torch's errors for invalid probabilities; with the
    64-bit draws from the C++ twister and from torch's random_."""
    if draws == "c++ twister":
        pytest.importorskip("umt5_fast.ops.cpu")
        assert generation._twister_reproduces_torch()
    else:
        monkeypatch.setitem(generation._TWISTER_CHECKED, "ok", False)
    g = torch.Generator().manual_seed(0)

    def same(probs, seed, default=False):
        if default:
            torch.manual_seed(seed)
            expected, after = torch.multinomial(probs, 1), torch.get_rng_state()
            torch.manual_seed(seed)
            assert torch.equal(generation.multinomial_draw(probs), expected)
            assert torch.equal(torch.get_rng_state(), after)
            return
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(generation.multinomial_draw(probs, ours), torch.multinomial(probs, 1, generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())

    for seed in range(12):
        scores = torch.randn(5, 3001, generator=g) * 3
        kept = scores.topk(1 + seed).values[:, -1:]
        same(scores.masked_fill(scores < kept, -math.inf).softmax(-1), seed, default=seed % 3 == 0)
        same(scores.softmax(-1), seed)  # every entry possible (torch draws)
        single = torch.zeros(3, 100)
        single[:, seed] = 1.0
        same(single, seed)
        ties = torch.zeros(2, 640)
        ties[:, ::80] = 0.125
        same(ties, seed)
        tiny = torch.zeros(2, 500)
        tiny[:, 7] = 1e-45  # its ratio underflows to 0 against most draws: torch's argmax over zeros
        tiny[1, 3] = 1.0
        same(tiny, seed)
    for bad in (torch.tensor([[0.5, math.nan]]), torch.tensor([[0.5, -0.1]]), torch.zeros(1, 40)):
        with pytest.raises(RuntimeError) as ours:
            generation.multinomial_draw(bad, torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError) as theirs:
            torch.multinomial(bad, 1, generator=torch.Generator().manual_seed(0))
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("draws", ["c++ twister", "random_"])
def test_draw_from_candidates_is_the_full_rows_draw(draws, monkeypatch):
    """Rows of scores that are -inf but at a few ascending ids (the LM head screen's top-k
    candidates): draw_from_candidates gives the ids torch.multinomial draws from the softmax of the
    processed full rows (temperature, top-k, top-p) and leaves the generator where it does; odd
    vocabularies (every tail of a vector), candidates at the last ids, narrowly spread scores (whose
    sums depend on their order), more top_k than candidates, the default generator, equal scores;
    where top-p keeps some and drops others of equal scores, the full rows decide (None)."""
    if draws == "c++ twister":
        pytest.importorskip("umt5_fast.ops.cpu")
    else:
        monkeypatch.setitem(generation._TWISTER_CHECKED, "ok", False)
    assert generation.softmax_lanes() is not None
    g = torch.Generator().manual_seed(11)
    drawn = 0
    for trial in range(40):
        vocab = [997, 4099, 30011, 256384, 65536][trial % 5]
        rows = 1 + trial % 4
        n = int(torch.randint(8, min(3000, vocab // 2), (1,), generator=g))
        ids = torch.randperm(vocab, generator=g)[:n].sort().values
        if trial % 3 == 0:
            ids[-1] = vocab - 1
        spread = [8.0, 0.01, 1.0][trial % 3]
        logits = torch.randn(rows, n, generator=g) * spread
        sampling = [dict(top_k=50), dict(top_k=7, top_p=0.9), dict(top_k=n + 5, top_p=0.5, temperature=0.7),
                    dict(top_k=1, temperature=1.3), dict(top_k=200, top_p=0.95, temperature=1.1)][trial % 5]
        tied = trial % 7 == 6
        if tied:  # (at the largest: kept by top-k; top-p cuts between them or not)
            logits[:, 1] = logits.max(dim=1).values
        split = trial % 9 == 8  # equal scores on both sides of top-p's cut: the full sort decides
        if split:
            logits[0] = 1.5
            sampling = dict(top_k=n, top_p=0.5)
        o = dict(generation.DEFAULTS, eos_token_id=[1], pad_token_id=0, decoder_start_token_id=0, do_sample=True)
        o.update(sampling)
        generation.check_options(o, vocab)
        rules = generation.Processors(o, vocab, 1, 10, False, 1)
        assert rules.samples_from_top_k
        full = torch.full((rows, vocab), -math.inf)
        full[:, ids] = logits
        processed = rules(torch.zeros(rows, 1, dtype=torch.long), full, torch.arange(rows))
        expected_probs = processed.softmax(-1)
        # the probabilities themselves, bit for bit (a draw rarely shows a last-bit change)
        lanes = generation.softmax_lanes()
        assert torch.equal(generation.lane_softmax(ids, processed[:, ids], lanes), expected_probs[:, ids])
        # and top-p's sums on rows of narrow_width (their last n: the sorted finite scores)
        narrow = full.new_full((rows, processors.narrow_width(n, vocab, o["top_k"])), -math.inf)
        narrow[:, :n] = logits
        assert torch.equal(processors.ascending_cumulative_probabilities(narrow)[0][:, -n:],
                           processors.ascending_cumulative_probabilities(full)[0][:, -n:])
        seed = 100 + trial
        default = trial % 4 == 3
        ours = None if default else torch.Generator().manual_seed(seed)
        theirs = None if default else torch.Generator().manual_seed(seed)
        if default:
            torch.manual_seed(seed)
        before = torch.get_rng_state() if default else ours.get_state()
        picked = generation.draw_from_candidates(ids, logits, vocab, rules, ours)
        after = torch.get_rng_state() if default else ours.get_state()
        if split:
            assert picked is None and torch.equal(after, before)
            continue
        if default:
            torch.manual_seed(seed)
        expected = torch.multinomial(expected_probs, 1, generator=theirs).squeeze(1)
        assert torch.equal(picked, expected)
        assert torch.equal(after, torch.get_rng_state() if default else theirs.get_state())
        drawn += 1
    assert drawn >= 34


def test_the_cpp_twister_draws_what_torch_draws():
    """csrc/mt19937.cpp on get_state()'s bytes: the low 53 bits of random_'s int64 draws at the asked
    positions and the state after, from states mid-block and across many regenerations of the words;
    positions that do not ascend within the draws are refused, the state untouched."""
    _C = pytest.importorskip("umt5_fast.ops.cpu")._C
    for seed, offset, entries in [(0, 0, 1), (1, 311, 623), (2, 1, 5000), (3, 623, 2 * 4096 + 7)]:
        generator = torch.Generator().manual_seed(seed)
        torch.empty(offset, dtype=torch.long).random_(generator=generator)
        state = generator.get_state()
        positions = torch.unique(torch.randint(0, entries, (max(1, entries // 7),), generator=generator.clone_state()))
        low = torch.empty(len(positions), dtype=torch.long)
        drew_zero = _C.mt19937_low53_draws(state=state.data_ptr(), entries=entries, positions=positions.data_ptr(),
                                           count=len(positions), out=low.data_ptr())
        expected = torch.empty(entries, dtype=torch.long).random_(generator=generator) & ((1 << 53) - 1)
        assert torch.equal(low, expected[positions]) and torch.equal(state, generator.get_state())
        assert drew_zero == bool((expected == 0).any())
    state = torch.Generator().manual_seed(4).get_state()
    for bad in ([3, 2], [0, 10]):
        positions = torch.tensor(bad)
        with pytest.raises(ValueError, match="positions must ascend"):
            _C.mt19937_low53_draws(state=state.data_ptr(), entries=10, positions=positions.data_ptr(), count=2,
                                   out=torch.empty(2, dtype=torch.long).data_ptr())
    assert torch.equal(state, torch.Generator().manual_seed(4).get_state())


def test_the_cpp_twister_reports_a_draw_whose_low_53_bits_are_0():
    """A state whose next words give a draw with its low 53 bits 0 (an exponential draw of 0, where
    multinomial_draw leaves the choice to torch): reported, as torch's random_ draws it, and only then."""
    import numpy as np
    _C = pytest.importorskip("umt5_fast.ops.cpu")._C

    def temper(y):
        y = y ^ (y >> 11)
        y = y ^ ((y << 7) & 0x9d2c5680)
        y = y ^ ((y << 15) & 0xefc60000)
        return y ^ (y >> 18)

    candidates = np.random.default_rng(0).integers(0, 2 ** 32, 1 << 23, dtype=np.uint64)
    high = int(candidates[(temper(candidates) & 0x1FFFFF) == 0][0])  # its output's low 21 bits are 0
    for low, expect_zero in ((0, True), (1, False)):
        state = torch.Generator().manual_seed(5).get_state()
        words = state[24:24 + 8 * 624].view(torch.int64)
        words[3], words[4] = high, low  # entry 1 of the draws: (output of word 3) << 32 | output of word 4
        state[8:12].view(torch.int32)[0] = 625 - 1  # left: 623 outputs before a regeneration
        state[16:24].view(torch.int64)[0] = 1  # next: the outputs start at word 1
        generator = torch.Generator()
        generator.set_state(state.clone())
        expected = torch.empty(5, dtype=torch.long).random_(generator=generator) & ((1 << 53) - 1)
        assert bool((expected == 0).any()) == expect_zero
        low53 = torch.empty(5, dtype=torch.long)
        positions = torch.arange(5)
        assert _C.mt19937_low53_draws(state=state.data_ptr(), entries=5, positions=positions.data_ptr(), count=5,
                                      out=low53.data_ptr()) == expect_zero
        assert torch.equal(low53, expected) and torch.equal(state, generator.get_state())


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_sampled_steps_with_few_candidates_draw_what_transformers_draws(checkpoint_factory, monkeypatch, backend):
    """top_k / top_p leaving a few tokens: multinomial_draw picks them without torch.multinomial,
    and the ids are transformers' from the same global seed."""
    if backend == "cpu":
        pytest.importorskip("umt5_fast.ops.cpu")
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids, mask = random_batch(ours.config.vocab_size, 3, 17, seed=4)
    for kwargs in (dict(top_k=4), dict(top_k=3, top_p=0.6, temperature=0.7, num_return_sequences=2)):
        kwargs = dict(kwargs, do_sample=True, max_new_tokens=10)
        torch.manual_seed(21)
        expected = reference(hf, ids, mask, **kwargs)
        draws = []
        monkeypatch.setattr(torch, "multinomial", lambda *a, **k: draws.append(1) or pytest.fail("torch drew"))
        torch.manual_seed(21)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)
        monkeypatch.undo()


@pytest.mark.parametrize("seed", range(3))
def test_logits_processors_match_transformers(seed):
    from transformers.generation import logits_process as lp
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 5, 50
    scores = torch.randn(rows, vocab, generator=g) * 3
    sequences = torch.randint(0, 8, (rows, 9), generator=g)  # small range: repeated n-grams
    pairs = [
        (lambda s: processors.repetition_penalty(sequences, s, 1.7), lp.RepetitionPenaltyLogitsProcessor(1.7)),
        (lambda s: processors.no_repeat_ngram(sequences, s, 2), lp.NoRepeatNGramLogitsProcessor(2)),
        (lambda s: processors.no_repeat_ngram(sequences, s, 3), lp.NoRepeatNGramLogitsProcessor(3)),
        (lambda s: processors.top_k_filter(s, 7), lp.TopKLogitsWarper(7)),
        (lambda s: processors.top_k_filter(s, 1, 3), lp.TopKLogitsWarper(1, min_tokens_to_keep=3)),
        (lambda s: processors.top_p_filter(s, 0.6), lp.TopPLogitsWarper(0.6)),
        (lambda s: processors.top_p_filter(s, 0.05, 2), lp.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
        (lambda s: processors.forbid_eos(s, [1, 4]), lp.MinLengthLogitsProcessor(20, [1, 4])),
        (lambda s: s / 0.7, lp.TemperatureLogitsWarper(0.7)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours(scores.clone()), theirs(sequences, scores.clone())), theirs


def test_streaming_yields_each_step(checkpoint_factory):
    ours, _ = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 3, 20, seed=2)
    eos = frequent_token(ours, ids, mask)
    full = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    recorder = Recorder()
    ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, streamer=recorder)
    assert recorder.ended and torch.equal(recorder.puts[0], full[:, :1])
    assert torch.equal(torch.stack(recorder.puts[1:], dim=1), full[:, 1:])
    steps = list(generation.generate_stream(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos))
    assert torch.equal(torch.stack(steps, dim=1), full[:, 1:])


def test_generation_config_sources(checkpoint_factory):
    from transformers import GenerationConfig
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 2, 15, seed=4)
    config = GenerationConfig(max_new_tokens=7, num_beams=2, decoder_start_token_id=0, pad_token_id=0,
                              eos_token_id=1)
    expected = reference(hf, ids, mask, generation_config=config)
    assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=config), expected)
    ours.generation_config = {"max_new_tokens": 5, "num_beams": 2}
    try:
        assert ours.generate(ids, attention_mask=mask).shape[1] <= 6
        ours.generation_config = {"num_beam_groups": 2, "diversity_penalty": 0.5}
        with pytest.raises(ValueError, match="diversity_penalty|num_beam_groups"):
            ours.generate(ids, attention_mask=mask)
    finally:
        ours.generation_config = None


def test_static_cache_is_allocated_once_and_decode_reads_it(checkpoint_factory, monkeypatch):
    ours, _ = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 2, 20, seed=6)
    calls = []
    eager_ops = ours.runtime.ops
    recording = types.SimpleNamespace(**{k: getattr(eager_ops, k) for k in dir(eager_ops) if not k.startswith("__")})

    def decode_attention(q, k_cache, v_cache, cache_length, *args, **kwargs):
        calls.append((q.shape, k_cache.data_ptr(), k_cache.shape, int(cache_length)))
        return eager_ops.decode_attention(q, k_cache, v_cache, cache_length, *args, **kwargs)

    recording.decode_attention = decode_attention
    monkeypatch.setattr(ours.runtime, "ops", recording)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    layers = ours.config.num_decoder_layers
    assert len(calls) == layers * 9  # every step (the start token's too), every layer
    assert all(shape[2] == 1 for shape, *_ in calls)  # one query row per sequence
    assert {c[2][2] for c in calls} == {10}  # the preallocated [B, H, max_length, D] buffers
    assert [c[3] for c in calls[::layers]] == list(range(1, 10))
    assert len({c[1] for c in calls}) == layers  # the same buffer every step: no reallocation
    assert out.shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, top_p=1.5), "top_p"), (dict(do_sample=True, top_p=-0.1), "top_p"),
    (dict(do_sample=True, num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"), (dict(pad_token_id=-1, eos_token_id=None), "pad_token_id"),
    (dict(decoder_start_token_id=torch.tensor([0, 0, 0])), "decoder_start_token_id"),
    (dict(eos_token_id=torch.tensor([1.0])), "integers"), (dict(pad_token_id=True), "pad_token_id"),
    (dict(num_beams=2, length_penalty="x"), "length_penalty"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(do_sample="yes"), "do_sample"), (dict(output_logits="yes"), "output_logits"),
    (dict(use_cache="no"), "use_cache"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(eos_token_id=10**6), "eos_token_id"),
    (dict(max_length=1), "max_length"), (dict(top_k=-1), "top_k")])
def test_bad_generation_arguments(checkpoint_factory, kwargs, match):
    ours, _ = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 2, 10, seed=1)
    with pytest.raises(ValueError, match=match):
        ours.generate(ids, attention_mask=mask, **kwargs)


def test_cuda_graphs_need_a_cuda_model(checkpoint_factory):
    ours, _ = pair(checkpoint_factory, "odd")
    with pytest.raises(ValueError, match="use_cuda_graph=True needs the model on a CUDA device"):
        ours.generate(torch.tensor([[5, 1]]), max_new_tokens=2, use_cuda_graph=True)


def test_unknown_generation_argument(checkpoint_factory):
    ours, _ = pair(checkpoint_factory, "odd")
    with pytest.raises(TypeError, match="num_beam_groupz"):
        ours.generate(torch.tensor([[5, 1]]), num_beam_groupz=2)


def test_finished_rows_stop_costing_work_in_greedy_decoding(checkpoint_factory, monkeypatch):
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 4, 30, seed=11)
    eos = frequent_token(ours, ids, mask)
    rows_per_step = []
    original = generation.Decoder.step_hidden

    def counting_step(self, tokens):
        rows_per_step.append(tokens.shape[0])
        return original(self, tokens)

    monkeypatch.setattr(generation.Decoder, "step_hidden", counting_step)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(got, reference(hf, ids, mask, max_new_tokens=20, eos_token_id=eos))
    finished_early = (got[:, 1:-1] == eos).any(dim=1).sum()
    assert finished_early >= 1, "the test needs a row that ends before the others"
    assert min(rows_per_step) < 4 and rows_per_step == sorted(rows_per_step, reverse=True)


def test_arguments_transformers_accepts_as_off_or_none_act_as_in_transformers(checkpoint_factory):
    """transformers' generate takes the "off" value of a feature we do not implement (num_beam_groups=1,
    assistant_model=None...) and None for an option, which turns the option off (top_k=None: no top-k,
    which is not our default of 50); ids equal transformers'; other values of those features are refused."""
    import transformers
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 2, 9, seed=6)
    for kwargs in (dict(num_beam_groups=1, diversity_penalty=0.0, penalty_alpha=None, low_memory=None),
                   dict(synced_gpus=False, assistant_model=None, guidance_scale=None, cache_implementation="static",
                        return_legacy_cache=True),
                   dict(min_length=None, repetition_penalty=None, length_penalty=None, output_scores=None),
                   dict(min_length=None, no_repeat_ngram_size=None, num_beams=2),
                   dict(do_sample=True, top_k=None, top_p=None, typical_p=None, temperature=None),
                   dict(do_sample=True, top_k=None, temperature=1.4)):
        kwargs = dict(kwargs, max_new_tokens=5)
        torch.manual_seed(4)
        expected = reference(hf, ids, mask, **kwargs)
        torch.manual_seed(4)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected), kwargs
    # top_k=None in a generation config turns top-k off too (not "unset": 50 would keep 50 ids)
    config = transformers.GenerationConfig(do_sample=True, top_k=None, max_new_tokens=5, decoder_start_token_id=0,
                                           pad_token_id=0, eos_token_id=1)
    torch.manual_seed(5)
    expected = reference(hf, ids, mask, generation_config=config)
    torch.manual_seed(5)
    assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=config), expected)
    for bad, match in ((dict(synced_gpus=True), "synced_gpus=True"), (dict(assistant_model=hf), "assistant_model"),
                       (dict(num_beam_groups=2), "num_beam_groups=2")):
        with pytest.raises(ValueError, match=match):
            ours.generate(ids, attention_mask=mask, max_new_tokens=2, **bad)
    with pytest.raises(TypeError, match="unexpected argument 'no_such_option'"):
        ours.generate(ids, attention_mask=mask, no_such_option=1)


def test_generation_options_set_on_the_model_config_steer_generate_as_in_transformers(checkpoint_factory):
    """transformers' legacy rule: while the generation config derived from the model config (no
    generation_config.json, or one marked _from_model_config) is unchanged, options set on
    model.config steer generate (with a warning); a changed generation config wins. None for
    num_beams / num_return_sequences, and no max_length nor max_new_tokens, are clear errors."""
    import copy
    import os
    ours, hf = pair(checkpoint_factory, "odd")
    hf = copy.deepcopy(hf)  # (the factory's model is shared with other tests)
    ids, mask = random_batch(ours.config.vocab_size, 2, 9, seed=4)
    for model in (ours, hf):
        model.config.num_beams, model.config.max_length = 3, 6
    with pytest.warns(UserWarning, match="model.config"):
        expected = reference(hf, ids, mask)
    with pytest.warns(UserWarning, match="model.config steer generate"):
        assert torch.equal(ours.generate(ids, attention_mask=mask), expected)
    ours.generation_config.num_beams = hf.generation_config.num_beams = 1  # changed: it wins, as in transformers
    assert torch.equal(ours.generate(ids, attention_mask=mask), reference(hf, ids, mask))
    path = os.path.join(os.path.dirname(ours.config.name_or_path), os.path.basename(ours.config.name_or_path))
    fresh = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    fresh.config.num_beams = 2  # a generation_config.json that transformers marked _from_model_config
    with pytest.warns(UserWarning, match="model.config steer generate"):
        beams = fresh.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(beams, fresh.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2))
    for bad in (dict(num_beams=None), dict(num_return_sequences=None), dict(max_length=None)):
        with pytest.raises(ValueError, match="must be an integer"):
            fresh.generate(ids, attention_mask=mask, **bad)


def test_decoding_starts_from_bos_without_a_decoder_start_token(checkpoint_factory):
    """decoder_start_token_id None: transformers starts from bos_token_id (the config's or one passed);
    neither set is a clear error."""
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", decoder_start_token_id=None, bos_token_id=7)
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu")
    ids, mask = random_batch(ours.config.vocab_size, 2, 8, seed=2)
    for kwargs in (dict(), dict(bos_token_id=9)):
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, **kwargs)
        assert torch.equal(out, reference(hf, ids, mask, max_new_tokens=4, **kwargs))
        assert bool((out[:, 0] == kwargs.get("bos_token_id", 7)).all())
    with pytest.raises(ValueError, match="decoder_start_token_id .*bos_token_id"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=4, bos_token_id=None)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("config", ["odd", "tied-shallow-decoder"])
def test_a_padded_decoder_prompt_decodes_as_transformers(checkpoint_factory, backend, config):
    """generate(decoder_input_ids, decoder_attention_mask with 0s): the masked prompt positions are
    masked keys in every step, as in transformers: greedy, sampled (several sequences per source) and
    beam search, left / right / inner padding, a prompt without the start token (generate prepends
    it, and a 1 to the mask), the returned scores, attentions and cache; all ones decodes as without
    a mask; a mask of the wrong shape, or without decoder_input_ids, is a clear error."""
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS[config])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    vocab = ours.config.vocab_size
    ids, mask = random_batch(vocab, 3, 9, seed=8)
    cached = hf.config.num_decoder_layers <= hf.config.num_layers  # (see CONFIGS)
    g = torch.Generator().manual_seed(5)
    prompt = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(2, vocab, (3, 5), generator=g)], dim=1)
    padded = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]])
    eos = frequent_token(ours, ids, mask)
    mask_matters = []
    for options in (dict(), dict(do_sample=True, top_k=6, num_return_sequences=2),
                    dict(num_beams=3, num_return_sequences=2), dict(num_beams=2, do_sample=True)):
        for decoder_input_ids in (prompt, prompt[:, 1:]):  # (the second without the start token)
            kwargs = dict(options, max_new_tokens=6, eos_token_id=eos, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=padded[:, -decoder_input_ids.shape[1]:])
            torch.manual_seed(2)
            expected = reference(hf, ids, mask, **kwargs)
            torch.manual_seed(2)
            got = ours.generate(ids, attention_mask=mask, **kwargs)
            assert torch.equal(got, expected), (options, decoder_input_ids.shape)
            torch.manual_seed(2)
            unmasked = reference(hf, ids, mask, **{k: v for k, v in kwargs.items() if k != "decoder_attention_mask"})
            mask_matters.append(not torch.equal(unmasked, expected))
    assert sum(mask_matters) >= 4  # (the mask changes most of these generations' ids)
    kwargs = dict(max_new_tokens=5, decoder_input_ids=prompt, decoder_attention_mask=padded,
                  return_dict_in_generate=True, output_scores=True, output_attentions=True, output_hidden_states=True)
    # (uncached, transformers returns each step's attentions over every position: cached configs only)
    for beams in (1, 2) if cached else ():
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, num_beams=beams, **kwargs)
        got = ours.generate(ids, attention_mask=mask, num_beams=beams, **kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        close = dict(rtol=1e-5, atol=1e-5)
        for name in ("scores", "decoder_attentions", "cross_attentions", "decoder_hidden_states"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), **close,
                                       msg=lambda m: f"{name}, {beams} beam(s): {m}")
        for ours_layer, their_layer in zip(got.past_key_values.to_legacy_cache(),
                                           expected.past_key_values.to_legacy_cache()):
            torch.testing.assert_close(ours_layer, their_layer, **close)
    expected = reference(hf, ids, mask, max_new_tokens=5, decoder_input_ids=prompt, decoder_attention_mask=padded)
    streamed = torch.stack(list(generation.generate_stream(ours, ids, attention_mask=mask, max_new_tokens=5,
                                                           decoder_input_ids=prompt, decoder_attention_mask=padded)),
                           dim=1)
    assert torch.equal(streamed, expected[:, prompt.shape[1]:])

    ones = torch.ones_like(prompt)
    assert torch.equal(ours.generate(ids, attention_mask=mask, decoder_input_ids=prompt, decoder_attention_mask=ones,
                                     max_new_tokens=4),
                       reference(hf, ids, mask, decoder_input_ids=prompt, max_new_tokens=4))
    with pytest.raises(ValueError, match="decoder_attention_mask must have shape"):
        ours.generate(ids, attention_mask=mask, decoder_input_ids=prompt, decoder_attention_mask=padded[:, :2])
    with pytest.raises(ValueError, match="pass decoder_input_ids"):
        ours.generate(ids, attention_mask=mask, decoder_attention_mask=padded)


def test_generation_settings_we_do_not_implement_are_refused_not_ignored(checkpoint_factory):
    """Settings we do not implement are refused, never silently dropped (a token id 0 included)."""
    import transformers
    ours, _ = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 2, 10, seed=1)
    for setting in (dict(forced_decoder_ids=[[1, 0]]), dict(dola_layers="low"), dict(guidance_scale=1.5)):
        with pytest.raises(ValueError, match=next(iter(setting))):
            ours.generate(ids, attention_mask=mask, generation_config=transformers.GenerationConfig(**setting))
    ours.generation_config = transformers.GenerationConfig(max_new_tokens=3)  # as transformers users assign it
    assert ours.generate(ids, attention_mask=mask).shape == (2, 4)
    ours.generation_config = generation.GenerationSettings()
    assert ours.generation_config.max_new_tokens is None  # unset: generate's default
    ours.generation_config.max_new_tokens = 2  # attribute access, as on transformers' GenerationConfig
    assert ours.generate(ids, attention_mask=mask).shape == (2, 3)
    _, hf = pair(checkpoint_factory, "odd")
    hf.generation_config.max_new_tokens = 5
    try:  # the transformers model is shared by other tests
        converted = umt5_fast.UMT5ForConditionalGeneration.from_hf(hf)
    finally:
        hf.generation_config.max_new_tokens = None
    assert converted.generation_config.max_new_tokens == 5
    assert converted.generate(ids, attention_mask=mask).shape == (2, 6)


def test_generate_output_follows_transformers(checkpoint_factory):
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 2, 12, seed=2)
    kwargs = dict(max_new_tokens=4, num_beams=2, return_dict_in_generate=True, output_scores=True)
    out, ref = ours.generate(ids, attention_mask=mask, **kwargs), reference(hf, ids, mask, **kwargs)
    assert torch.equal(out[0], ref[0]) and torch.allclose(out[1], ref[1], atol=1e-5)  # sequences_scores second
    assert "scores" in out and list(out.keys())[:3] == ["sequences", "sequences_scores", "scores"]
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
    assert greedy.to_tuple() == (greedy.sequences, greedy.past_key_values)
    assert torch.equal(ours.generate(inputs=ids, attention_mask=mask, max_new_tokens=4, use_cache=False),
                       greedy.sequences)


def test_beam_sampling_temperature_too_small_for_beam_scores_is_refused(checkpoint_factory):
    """Scaled scores below beam search's -1e9 placeholder would lose to empty hypotheses (transformers
    then returns the prompt alone): a clear error instead of an empty generation; -inf scores from
    processors are not refused (transformers' ids)."""
    ours, hf = pair(checkpoint_factory, "odd")
    ids = torch.tensor([[57]])
    with torch.no_grad():
        torch.manual_seed(1)
        assert hf.generate(ids, max_new_tokens=1, num_beams=2, do_sample=True, temperature=1e-10,
                           use_cache=False).shape == (1, 1)
    with pytest.raises(ValueError, match="temperature=1e-10 scales the beam scores below"):
        ours.generate(ids, max_new_tokens=1, num_beams=2, do_sample=True, temperature=1e-10, seed=1)
    assert ours.generate(ids, max_new_tokens=1, num_beams=2, do_sample=True, temperature=1e-3, seed=1).shape == (1, 2)
    # scores a processor sets to -inf (fewer finite scores than beams) are no reason to refuse
    ids, mask = random_batch(ours.config.vocab_size, 2, 7, seed=3)
    for options in (dict(forced_bos_token_id=5), dict(forced_eos_token_id=6, top_k=4),
                    dict(prefix_allowed_tokens_fn=lambda batch_id, sequence: [7, 8])):
        kwargs = dict(max_new_tokens=4, num_beams=3, do_sample=True, temperature=0.7, **options)
        torch.manual_seed(2)
        expected = reference(hf, ids, mask, **kwargs)
        torch.manual_seed(2)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, top_k=4, num_return_sequences=2),
                                    dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=0.5)])
def test_generate_returns_the_cache_as_transformers(checkpoint_factory, kwargs):
    """return_dict_in_generate: greedy / sampled decoding returns the decoder cache (every position
    but the last token's, also for rows that ended early), beam search its running beams' cache (in
    the order of its last step's reorder), with transformers' K/V, and forward goes on from it as
    transformers' model goes on from its own; use_cache=False, passed or in a generation config,
    returns none."""
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu")
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, seed=6)
    eos = frequent_token(ours, ids, mask)
    options = dict(kwargs, max_new_tokens=7, eos_token_id=eos, return_dict_in_generate=True)
    torch.manual_seed(3)
    out = ours.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **options)
    assert torch.equal(out.sequences, expected.sequences)
    beam = kwargs.get("num_beams", 1) > 1
    steps = out.past_key_values.get_seq_length()  # (beam search runs past its best hypotheses' ends)
    assert steps == expected.past_key_values.get_seq_length() and (steps >= out.sequences.shape[1] - 1 if beam
                                                                   else steps == out.sequences.shape[1] - 1)
    for ours_layer, their_layer in zip(out.past_key_values.to_legacy_cache(),
                                       expected.past_key_values.to_legacy_cache()):
        for a, b in zip(ours_layer, their_layer):
            assert a.shape == b.shape
            assert_close(a, b, 1e-5, "cache")
    assert list(out.keys())[-1] == "past_key_values" and len(out.to_tuple()) == len(expected.to_tuple())
    rows = out.past_key_values.to_legacy_cache()[0][0].shape[0]  # beam search: batch * num_beams
    next_tokens = torch.randint(2, ours.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(4))
    source = dict(attention_mask=mask.repeat_interleave(rows // 2, dim=0),
                  input_ids=ids.repeat_interleave(rows // 2, dim=0),
                  decoder_input_ids=next_tokens if beam else out.sequences[:, -1:])
    with torch.no_grad():
        their_next = hf(past_key_values=expected.past_key_values, **source).logits
    assert_close(ours(past_key_values=out.past_key_values, **source).logits, their_next, 1e-5, "next step")
    assert ours.generate(ids, attention_mask=mask, use_cache=False, **options).past_key_values is None
    import transformers
    no_cache = transformers.GenerationConfig(use_cache=False, **options)
    with torch.no_grad():
        assert hf.generate(ids, attention_mask=mask, generation_config=no_cache).past_key_values is None
    assert ours.generate(ids, attention_mask=mask, generation_config=no_cache).past_key_values is None


def test_a_config_with_use_cache_off_returns_no_cache_as_transformers(checkpoint_factory, tmp_path):
    """config.use_cache=False reaches the generation config transformers derives from it (written to
    generation_config.json, or derived at load without one): generate's dict has no past_key_values."""
    import shutil
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"], use_cache=False)
    ids, mask = random_batch(hf.config.vocab_size, 2, 7, seed=9)
    options = dict(max_new_tokens=3, return_dict_in_generate=True)
    with torch.no_grad():
        assert hf.generate(ids, attention_mask=mask, **options).past_key_values is None
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu")
    assert ours.generate(ids, attention_mask=mask, **options).past_key_values is None
    without = shutil.copytree(path, tmp_path / "without-generation-config")  # (the factory's is shared)
    (without / "generation_config.json").unlink()
    derived = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(without, backend="cpu")
    out = derived.generate(ids, attention_mask=mask, **options)
    assert out.past_key_values is None and torch.equal(out.sequences, hf.generate(ids, attention_mask=mask,
                                                                                  max_new_tokens=3))


def test_length_defaults_follow_transformers(checkpoint_factory):
    """max_length left at its default means 20 new tokens after the decoder prompt (set explicitly,
    20 in all); min_new_tokens takes min_length's place when both are set."""
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 3, 18, seed=12)
    prompt = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(2, 100, (3, 2))], dim=1)
    for kwargs, length in ((dict(), 21), (dict(decoder_input_ids=prompt), 23), (dict(num_beams=2), 21),
                           (dict(max_length=20), 20), (dict(max_length=20, decoder_input_ids=prompt), 20)):
        got = ours.generate(ids, attention_mask=mask, eos_token_id=None, **kwargs)
        assert got.shape == (3, length) and torch.equal(got, reference(hf, ids, mask, eos_token_id=None, **kwargs))
    eos = int(reference(hf, ids, mask, max_new_tokens=2, eos_token_id=None)[0, 2])  # row 0 ends at step 2
    for kwargs in (dict(min_length=9, min_new_tokens=1), dict(min_length=1, min_new_tokens=3),
                   dict(min_length=6, min_new_tokens=2, decoder_input_ids=prompt),
                   dict(min_length=4, min_new_tokens=0, num_beams=2)):
        expected = reference(hf, ids, mask, max_new_tokens=10, eos_token_id=eos, **kwargs)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, **kwargs),
                           expected), kwargs
    assert not torch.equal(reference(hf, ids, mask, max_new_tokens=10, eos_token_id=eos, min_length=9),
                           reference(hf, ids, mask, max_new_tokens=10, eos_token_id=eos, min_length=9,
                                     min_new_tokens=1))


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2),
                                    dict(do_sample=True, top_k=5), dict(min_new_tokens=5),
                                    dict(num_beams=2, min_new_tokens=5)])
def test_raw_logits_and_beam_indices_follow_transformers(checkpoint_factory, kwargs):
    """output_logits returns each step's raw logits; beam search returns beam_indices, with which
    transformers' compute_transition_scores reads our scores as it reads its own."""
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 2, 14, seed=7)
    eos = frequent_token(ours, ids, mask)
    options = dict(kwargs, max_new_tokens=7, eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    torch.manual_seed(5)
    ref = reference(hf, ids, mask, **options)
    torch.manual_seed(5)
    out = ours.generate(ids, attention_mask=mask, **options)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == len(out.scores)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if "num_beams" in kwargs:
        assert torch.equal(out.beam_indices, ref.beam_indices)
        assert list(out.keys()) == ["sequences", "sequences_scores", "scores", "logits", "beam_indices",
                                     "past_key_values"]
    else:
        assert out.beam_indices is None and list(out.keys()) == ["sequences", "scores", "logits", "past_key_values"]
    torch.testing.assert_close(hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices),
                               hf.compute_transition_scores(ref.sequences, ref.scores, getattr(ref, "beam_indices", None)),
                               rtol=1e-5, atol=1e-5)
    for steps in ("scores", "logits"):  # our own compute_transition_scores, as transformers' on the same input
        for normalize in (False, True):
            expected = hf.compute_transition_scores(out.sequences, getattr(out, steps), out.beam_indices, normalize)
            got = ours.compute_transition_scores(out.sequences, getattr(out, steps), out.beam_indices, normalize)
            # (transformers' log_softmax runs along a strided axis: last-bit differences)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 if normalize else 0.0)
    with pytest.raises(ValueError, match="per-step scores"):
        ours.compute_transition_scores(out.sequences, None)
    with pytest.raises(ValueError, match="per-step scores"):  # steps of different shapes
        ours.compute_transition_scores(out.sequences, (out.scores[0], out.scores[0][:1]))
    with pytest.raises(ValueError, match="sequences must be"):
        ours.compute_transition_scores(out.sequences.tolist(), out.scores, out.beam_indices)
    with pytest.raises(ValueError, match="beam_indices"):
        ours.compute_transition_scores(out.sequences, out.scores, [[0]])
    if "num_beams" in kwargs:
        with pytest.raises(ValueError, match="beam_indices"):  # beam search's scores need them
            ours.compute_transition_scores(out.sequences, out.scores)
    only_logits = ours.generate(ids, attention_mask=mask, **dict(options, output_scores=False))
    assert only_logits.scores is None and len(only_logits.logits) == len(out.logits)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "beam"])
def test_attentions_and_hidden_states_match_transformers(checkpoint_factory, backend, mode):
    """Per step and layer, as transformers' generate returns them (rows end at different steps;
    beam search: the step's running beams)."""
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids, mask = random_batch(ours.config.vocab_size, 3, 23, seed=5)
    kwargs = dict(max_new_tokens=9, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True,
                  output_scores=True, eos_token_id=frequent_token(ours, ids, mask),
                  decoder_input_ids=torch.tensor([[0, 7], [0, 8], [0, 9]]))
    if mode == "sampled":
        kwargs.update(do_sample=True, num_return_sequences=2, top_k=4)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(3)
    out = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    beam_fields = ["sequences_scores", "scores", "beam_indices"] if mode == "beam" else ["scores"]
    assert list(out.keys()) == ["sequences", *beam_fields, "encoder_attentions", "encoder_hidden_states",
                                "decoder_attentions", "cross_attentions", "decoder_hidden_states",
                                "past_key_values"]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores, ref.scores, **close)
    torch.testing.assert_close(out.encoder_attentions, ref.encoder_attentions, **close)
    torch.testing.assert_close(out.encoder_hidden_states, ref.encoder_hidden_states, **close)
    for name in ("decoder_attentions", "cross_attentions", "decoder_hidden_states"):
        ours_steps, ref_steps = getattr(out, name), getattr(ref, name)
        # (beam search runs until no beam can improve: steps after the best hypotheses ended count)
        assert len(ours_steps) == len(ref_steps) == len(ref.scores) >= out.sequences.shape[1] - 2, name
        for step, (a, b) in enumerate(zip(ours_steps, ref_steps)):
            torch.testing.assert_close(a, b, **close, msg=lambda m: f"{name} step {step}: {m}")
    torch.manual_seed(3)  # without return_dict_in_generate: the ids alone, as transformers returns them
    ids_only = ours.generate(ids, attention_mask=mask, **dict(kwargs, return_dict_in_generate=False))
    assert isinstance(ids_only, torch.Tensor) and torch.equal(ids_only, ref.sequences)


def test_a_full_generation_config_json_is_read(checkpoint_factory, tmp_path):
    """A generation_config.json written with every field (use_diff=False: assisted decoding's
    defaults included) loads and decodes as in transformers."""
    import shutil
    from transformers import GenerationConfig
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["odd"])
    full = tmp_path / "full"
    shutil.copytree(path, full)
    GenerationConfig(max_new_tokens=6, num_beams=2, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1).to_json_file(full / "generation_config.json", use_diff=False)
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(full, backend="eager")
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, seed=3)
    expected = reference(hf, ids, mask, generation_config=GenerationConfig.from_pretrained(full))
    assert torch.equal(ours.generate(ids, attention_mask=mask), expected)


def test_special_token_arguments_in_transformers_forms(checkpoint_factory):
    """A decoder start id per row (a tensor), eos ids as a tensor, and no pad id (transformers
    pads with the first eos id then; with no eos either no row ends and nothing is padded, nor is
    a mask inferred) decode as in transformers."""
    ours, hf = pair(checkpoint_factory, "odd")
    ids, mask = random_batch(ours.config.vocab_size, 3, 16, seed=13)
    eos = frequent_token(ours, ids, mask)
    for kwargs in (dict(decoder_start_token_id=torch.tensor([[0], [7], [9]])),
                   dict(decoder_start_token_id=torch.tensor([3, 0, 5]), num_beams=2),
                   dict(eos_token_id=torch.tensor([eos, 1])), dict(pad_token_id=None, eos_token_id=[eos, 1]),
                   dict(pad_token_id=None, eos_token_id=None), dict(pad_token_id=None, eos_token_id=None, num_beams=2)):
        options = dict(dict(eos_token_id=eos), max_new_tokens=8, **kwargs)
        expected = reference(hf, ids, mask, **options)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **options), expected), kwargs
    unpadded = dict(pad_token_id=None, eos_token_id=None, max_new_tokens=6)
    assert torch.equal(ours.generate(ids, **unpadded), reference(hf, ids, None, **unpadded))


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_generation_buffers_grow_with_the_sequences(checkpoint_factory, backend):
    """The KV cache and sequence buffers start short and double: past their first size, greedy and
    beam results still equal transformers', and a huge max_new_tokens costs only what is reached."""
    if backend not in umt5_fast.ops.available_backends():
        pytest.skip(f"backend {backend} not built")
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids, mask = random_batch(ours.config.vocab_size, 2, 9, seed=14)
    new_tokens = generation._INITIAL_CACHE_LENGTH + 40
    for kwargs in (dict(), dict(num_beams=2)):
        expected = reference(hf, ids, mask, max_new_tokens=new_tokens, eos_token_id=None, **kwargs)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None, **kwargs)
        assert got.shape == (2, 1 + new_tokens) and torch.equal(got, expected), kwargs
    every_token_ends = list(range(ours.config.vocab_size))
    for kwargs in (dict(), dict(num_beams=3)):  # ~10**14 bytes if allocated for max_length
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=10**9, eos_token_id=every_token_ends, **kwargs)
        assert out.shape == (2, 2)


def test_the_source_may_be_embeddings_or_encoder_outputs(checkpoint_factory):
    """As in transformers: inputs_embeds, or encoder_outputs computed beforehand (the encoder is
    skipped), decode to the ids of input_ids."""
    ours, hf = pair(checkpoint_factory, "tied-shallow-decoder")
    ids, mask = random_batch(ours.config.vocab_size, 3, 17, seed=15)
    embeds = ours.shared(ids)
    encoded = ours.encoder(input_ids=ids, attention_mask=mask)
    for kwargs in (dict(max_new_tokens=7), dict(max_new_tokens=7, num_beams=2)):
        expected = reference(hf, ids, mask, **kwargs)
        with torch.no_grad():
            assert torch.equal(hf.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs), expected)
        assert torch.equal(ours.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs), expected)
        assert torch.equal(ours.generate(encoder_outputs=encoded, attention_mask=mask, **kwargs), expected)
        assert torch.equal(ours.generate(encoder_outputs=(encoded.last_hidden_state,), attention_mask=mask,
                                         **kwargs), expected)
        assert torch.equal(ours.generate(encoder_outputs=encoded.last_hidden_state, attention_mask=mask, **kwargs),
                           expected)  # the bare tensor, as forward takes it
    with pytest.raises(ValueError, match="one of input_ids and inputs_embeds"):
        ours.generate(ids, inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours.generate(encoder_outputs=encoded, attention_mask=mask[:, :5], max_new_tokens=2)
    with pytest.raises(ValueError, match="encoder_outputs"):
        ours.generate(encoder_outputs=(encoded.last_hidden_state[..., :-1],), max_new_tokens=2)
    with pytest.raises(TypeError, match="encoder_outputs must be"):
        ours.generate(encoder_outputs="states", max_new_tokens=2)


def test_generation_options_in_config_json_apply_without_generation_config_json(checkpoint_factory, tmp_path):
    """Saves from before generation_config.json kept generation options in config.json: transformers
    derives its generation config from them (GenerationConfig.from_model_config), so do we."""
    import json
    import shutil
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    config = json.loads((path / "config.json").read_text())
    config.update(num_beams=3, no_repeat_ngram_size=2, max_length=9, bad_words_ids=[[7]], length_penalty=0.5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(path / "model.safetensors", tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.generation_config.num_beams == 3 and ours.generation_config.max_length == 9
    ids, mask = random_batch(ours.config.vocab_size, 3, 15, seed=4)
    got = ours.generate(ids, attention_mask=mask)
    assert got.shape[1] == 9 and torch.equal(got, reference(hf, ids, mask))
    assert torch.equal(ours.generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=4),
                       reference(hf, ids, mask, num_beams=1, max_new_tokens=4))
    config["forced_decoder_ids"] = [[1, 5]]  # an option we do not implement: named, not ignored
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="forced_decoder_ids"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path).generate(ids, attention_mask=mask)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_top_candidates_equal_torch_topk_over_all_beams(seed, backend):
    """Beam search takes each beam's own best first (the backend's top_k: the cpu one may keep
    another of equal values): the result is torch.topk's over the flattened beams, ties included
    (there it falls back on torch.topk)."""
    import importlib
    ops = importlib.import_module(f"umt5_fast.ops.{backend}") if backend == "eager" else \
        pytest.importorskip("umt5_fast.ops.cpu")
    g = torch.Generator().manual_seed(seed)
    batch, num_beams, vocab, k = 3, 4, 1000, 8
    scores = torch.randn(batch, num_beams * vocab, generator=g)
    cases = [scores, scores.round(decimals=1)]  # distinct scores; many ties
    banned = scores.clone()
    banned[0, : num_beams * vocab - 5] = -math.inf  # fewer than k finite candidates in row 0
    cases.append(banned)
    first_step = scores.view(batch, num_beams, vocab).clone()
    first_step[:, 1:] += -1.0e9  # beam search's first step: beams 1.. hold placeholder scores
    cases.append(first_step.view(batch, -1))
    for case in cases:
        got_values, got_indices = generation.top_candidates(case, k, num_beams, ops)
        values, indices = torch.topk(case, k)
        assert torch.equal(got_values, values) and torch.equal(got_indices, indices)
    assert generation.top_candidates(scores[:, :12], 8, 4, ops)[1].shape == (3, 8)  # k + 1 > vocab: torch.topk


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("kwargs", [dict(num_beams=4),
                                    dict(num_beams=3, min_new_tokens=7, num_return_sequences=2),
                                    dict(num_beams=2, min_length=6, length_penalty=0.5, early_stopping=True)])
def test_beam_steps_that_ban_at_most_eos_select_from_the_logits(checkpoint_factory, monkeypatch, backend, kwargs):
    """Steps whose processors ban nothing but eos (min_length) take each beam's best straight from
    its logits (ops.log_softmax_top_k: no log-probabilities written): the ids of transformers and of
    the full path (log_softmax, processors, top k over every score), with eos banned for a while."""
    if backend == "cpu":
        pytest.importorskip("umt5_fast.ops.cpu")
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["odd"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids, mask = random_batch(ours.config.vocab_size, 3, 30, seed=11)
    eos = frequent_token(ours, ids, mask)
    kwargs = dict(kwargs, max_new_tokens=12, eos_token_id=[eos, 1])
    ops = ours.runtime.ops
    calls = []
    fused = ops.log_softmax_top_k

    def counted(logits, k, banned=()):
        calls.append(tuple(banned))
        return fused(logits, k, banned)
    monkeypatch.setattr(ops, "log_softmax_top_k", counted)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert calls and (any(calls) == ("min_new_tokens" in kwargs or "min_length" in kwargs))
    assert torch.equal(got, reference(hf, ids, mask, **kwargs))
    init = processors.Processors.__init__

    def full_path(self, *args, **kw):
        init(self, *args, **kw)
        self.bans_eos_only = False
    monkeypatch.setattr(processors.Processors, "__init__", full_path)
    calls.clear()
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), got) and not calls


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_rows_of_one_source_share_its_cross_attention_projections(checkpoint_factory, backend):
    """Beams (and returned sequences) of a source hold the cross-attention K/V projected once from
    its encoder output: those of each row's own copy of that output, without projecting it per row."""
    if backend == "cpu":
        pytest.importorskip("umt5_fast.ops.cpu")
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids, mask = random_batch(ours.config.vocab_size, 3, 11, seed=5)
    states = ours.get_encoder()(ids, attention_mask=mask).last_hidden_state
    decoder = generation.make_decoder(ours, states, mask, 4, 20)
    rows = states.repeat_interleave(4, dim=0)
    assert torch.equal(decoder.encoder_states, rows) and torch.equal(decoder.encoder_mask, mask.repeat_interleave(4, 0))
    for layer, block in enumerate(ours.decoder.block):
        attention = block.layer[1].EncDecAttention
        for cached, projection in zip(decoder.cache.cross_kv[layer], (attention.k, attention.v)):
            assert cached.is_contiguous() and cached.shape == (12, attention.num_heads, 11, attention.d_kv)
            torch.testing.assert_close(cached, attention.heads(projection(rows)), rtol=1e-6, atol=1e-6)
            assert torch.equal(cached, cached[::4].repeat_interleave(4, dim=0))  # one projection per source


def test_output_flags_in_config_json_ask_for_the_output_dict(checkpoint_factory, tmp_path):
    """transformers' GenerationConfig.from_model_config: an output flag of config.json (or the
    config's output_attentions / output_hidden_states) sets return_dict_in_generate."""
    import json
    import shutil
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["tied-shallow-decoder"])
    shutil.copy(path / "model.safetensors", tmp_path)
    ids, mask = random_batch(131, 2, 9, seed=2)
    for flags in (dict(output_scores=True), dict(output_attentions=True)):
        config = json.loads((path / "config.json").read_text())
        config.update(flags)
        (tmp_path / "config.json").write_text(json.dumps(config))
        hf = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
        ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=4)
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert list(out.keys()) == list(ref.keys())[:len(out.keys())] and torch.equal(out.sequences, ref.sequences)
