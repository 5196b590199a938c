"""Every logits processor and warper generate supports, against transformers' own: exactly equal
scores on random inputs, then generate() with each option token-for-token against transformers'
generate (greedy, beam, and sampling from the same global RNG state)."""
import math

import pytest
import torch

import umt5_fast
from umt5_fast import generation
from umt5_fast.processors import Processors
from helpers import random_batch

VOCAB = 40


def our_processors(options, prompt_length=1, max_length=12, beam=False, rows_per_source=1, source_ids=None,
                   **extra):
    o = dict(generation.DEFAULTS, eos_token_id=[1, 3], pad_token_id=0, decoder_start_token_id=0)
    o.update(options)
    generation.check_options(o, VOCAB)
    return Processors(o, VOCAB, prompt_length, max_length, beam, rows_per_source, source_ids=source_ids, **extra)


def transformers_processors(options, prompt_length=1, max_length=12, source_ids=None, **extra):
    import transformers
    config = transformers.GenerationConfig(eos_token_id=[1, 3], pad_token_id=0, decoder_start_token_id=0,
                                           max_length=max_length, **options)
    config._eos_token_tensor = torch.tensor([1, 3])
    model = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(vocab_size=VOCAB, d_model=8, d_kv=4,
                                                                              d_ff=8, num_layers=1, num_heads=1))
    return model._get_logits_processor(config, input_ids_seq_length=prompt_length, encoder_input_ids=source_ids,
                                       device="cpu", **extra)


def random_step(seed, rows=6, length=7, with_specials=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, VOCAB, generator=g) * 3
    sequences = torch.randint(2, 9, (rows, length), generator=g)  # small range: repeated n-grams
    sequences[:, 0] = 0
    if with_specials:
        scores[0, 5], scores[1, 6], scores[2, 7] = math.inf, -math.inf, math.nan
    return sequences, scores


SOURCE = torch.tensor([[4, 5, 6, 4, 5, 7, 0, 0], [8, 2, 8, 2, 3, 6, 5, 4]])
OPTIONS = [
    dict(sequence_bias={(5,): 2.5, (4, 6): -1.5, (2, 3, 7): 4.0, (6, 6): -math.inf}),
    dict(sequence_bias=[[[7], 1.0], [[2, 5], -2.0]]),
    dict(bad_words_ids=[[5], [3], [4, 6], [2, 3, 8], [6, 1]]),
    dict(encoder_repetition_penalty=1.7),
    dict(encoder_repetition_penalty=0.6),
    dict(encoder_no_repeat_ngram_size=1),
    dict(encoder_no_repeat_ngram_size=2),
    dict(encoder_no_repeat_ngram_size=3),
    dict(forced_bos_token_id=9),
    dict(forced_eos_token_id=3),
    dict(forced_eos_token_id=[3, 5]),
    dict(remove_invalid_values=True),
    dict(exponential_decay_length_penalty=(2, 1.4)),
    dict(suppress_tokens=[2, 5, 39]),
    dict(begin_suppress_tokens=[4, 6]),
    dict(forced_bos_token_id=9, begin_suppress_tokens=[4, 6]),
    dict(renormalize_logits=True),
    dict(do_sample=True, min_p=0.2),
    dict(do_sample=True, typical_p=0.7),
    dict(do_sample=True, epsilon_cutoff=0.05),
    dict(do_sample=True, eta_cutoff=0.02),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.1, typical_p=0.9, epsilon_cutoff=3e-3,
         eta_cutoff=3e-3, renormalize_logits=True),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2, sequence_bias={(5,): 1.0}, bad_words_ids=[[6]],
         encoder_repetition_penalty=1.2, encoder_no_repeat_ngram_size=2, min_length=9, suppress_tokens=[8],
         exponential_decay_length_penalty=(1, 1.1), remove_invalid_values=True),
]


@pytest.mark.parametrize("case", range(len(OPTIONS)))
@pytest.mark.parametrize("length", [1, 2, 3, 7, 11])
@pytest.mark.parametrize("beam", [False, True])
def test_processors_match_transformers(case, length, beam):
    options = OPTIONS[case]
    if beam:  # 2 sources x 3 beams: the encoder processors pick each row's source
        options = dict(options, num_beams=3)
    # inf / nan scores only where a processor is there to remove them (sampling warpers refuse nan, as
    # transformers' do)
    sequences, scores = random_step(case * 100 + length, length=length,
                                    with_specials=options.get("remove_invalid_values", False))
    source = SOURCE if beam else SOURCE.repeat(3, 1)
    ours = our_processors(options, max_length=12, beam=beam, rows_per_source=3 if beam else 1, source_ids=source)
    # transformers gives its encoder processors the unexpanded source; its repetition penalty then
    # gathers for the first `batch` rows only, with the wrong sources (not so in generate with
    # num_beams=1): its reference here reads one source row per beam
    theirs = transformers_processors(options, max_length=12,
                                     source_ids=source.repeat_interleave(3, dim=0) if beam else source)
    rows = torch.arange(scores.shape[0])
    got = ours(sequences, scores.clone(), rows)
    expected = theirs(sequences, scores.clone())
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()), options


def test_encoder_processors_pick_each_row_source_among_a_subset_of_rows():
    """Greedy decoding drops finished rows: the rows left must still read their own source."""
    options = dict(encoder_repetition_penalty=1.5, encoder_no_repeat_ngram_size=2)
    sequences, scores = random_step(3, rows=4)
    source = torch.randint(2, 30, (4, 9))
    ours = our_processors(options, source_ids=source)
    theirs = transformers_processors(options, source_ids=source)
    full = theirs(sequences, scores.clone())
    kept = torch.tensor([1, 3])
    assert torch.equal(ours(sequences[kept], scores[kept].clone(), kept), full[kept])


def test_prefix_allowed_tokens_fn_and_custom_processors_match_transformers():
    from transformers.generation import logits_process as lp
    allowed = lambda batch_id, ids: [int(ids[-1]) % 7 + batch_id, 30 + batch_id]  # noqa: E731
    custom = lp.RepetitionPenaltyLogitsProcessor(1.9)
    sequences, scores = random_step(5)
    ours = our_processors(dict(num_beams=3), beam=True, rows_per_source=3, prefix_allowed_tokens_fn=allowed,
                          logits_processor=[custom])
    theirs = transformers_processors(dict(num_beams=3), prefix_allowed_tokens_fn=allowed,
                                     logits_processor=lp.LogitsProcessorList([custom]))
    assert torch.equal(ours(sequences, scores.clone(), torch.arange(6)), theirs(sequences, scores.clone()))


@pytest.mark.parametrize("options,match", [
    (dict(sequence_bias={(5,): "high"}), "sequence_bias"),
    (dict(sequence_bias={}), "sequence_bias"),
    (dict(sequence_bias={(5, 40): 1.0}), r"sequence_bias.*\[0, 40\)"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[5]), "bad_words_ids"),
    (dict(bad_words_ids=[[-1]]), "bad_words_ids"),
    (dict(encoder_repetition_penalty=0.0), "encoder_repetition_penalty"),
    (dict(encoder_no_repeat_ngram_size=-1), "encoder_no_repeat_ngram_size"),
    (dict(encoder_no_repeat_ngram_size=1.5), "encoder_no_repeat_ngram_size"),
    (dict(forced_bos_token_id=40), "forced_bos_token_id"),
    (dict(forced_eos_token_id=[]), "forced_eos_token_id"),
    (dict(forced_eos_token_id="1"), "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(2, -1.0)), "exponential_decay_length_penalty"),
    (dict(suppress_tokens=[1, 40]), "suppress_tokens"),
    (dict(begin_suppress_tokens=3), "begin_suppress_tokens"),
    (dict(remove_invalid_values="yes"), "remove_invalid_values"),
    (dict(renormalize_logits=1), "renormalize_logits"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(eta_cutoff=-0.1), "eta_cutoff"),
    (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=None), "eos_token_id"),
])
def test_bad_processor_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        our_processors(options)


def test_bad_custom_processors_are_named():
    with pytest.raises(TypeError, match="logits_processor"):
        our_processors({}, logits_processor=[3])
    with pytest.raises(TypeError, match="prefix_allowed_tokens_fn"):
        our_processors({}, prefix_allowed_tokens_fn=[1, 2])
    sequences, scores = random_step(0)
    with pytest.raises(ValueError, match="must return scores of shape"):
        our_processors({}, logits_processor=[lambda ids, s: s[:, :3]])(sequences, scores, torch.arange(6))
    with pytest.raises(ValueError, match="returned no token"):
        our_processors({}, prefix_allowed_tokens_fn=lambda b, ids: [])(sequences, scores, torch.arange(6))


# ---------------------------------------------------------------------------------------------
# generate() with each option against transformers' generate
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(checkpoint_factory):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", num_layers=3, num_decoder_layers=2)
    return {backend: umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
            for backend in ("eager", "cpu")}, hf


# c: the tokens greedy decoding emits most, most first (c[0] serves as an eos): so that banning or
# biasing them changes the result
GENERATE_CASES = [
    lambda c: dict(sequence_bias={(c[1],): -3.0, (c[2], c[2]): -5.0, (c[3],): 2.0}),
    lambda c: dict(bad_words_ids=[[c[1]], [c[2], c[3]]]),
    lambda c: dict(encoder_repetition_penalty=2.0),
    lambda c: dict(encoder_no_repeat_ngram_size=2),
    lambda c: dict(forced_bos_token_id=5, forced_eos_token_id=1),
    lambda c: dict(exponential_decay_length_penalty=(2, 1.5)),
    lambda c: dict(suppress_tokens=[c[1], 2, 3], begin_suppress_tokens=[c[2]]),
    lambda c: dict(remove_invalid_values=True, renormalize_logits=True),
]


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("case", range(len(GENERATE_CASES)))
def test_generate_with_each_processor_matches_transformers(models, backend, num_beams, case):
    ours, hf = models[0][backend], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 3, 23, seed=case)
    emitted = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)[:, 1:]
    common = (torch.bincount(emitted.flatten(), minlength=ours.config.vocab_size)[2:].argsort(descending=True)
              + 2).tolist()
    eos = common[0]  # an eos the model emits often: rows end at different steps
    kwargs = dict(GENERATE_CASES[case](common), max_new_tokens=12, num_beams=num_beams, eos_token_id=[eos, 1],
                  return_dict_in_generate=True, output_scores=True)
    if num_beams > 1:
        kwargs.update(num_return_sequences=2)
    reference_kwargs = dict(kwargs)
    if num_beams > 1 and "encoder_repetition_penalty" in kwargs:
        # transformers' own gives the unexpanded source to the beams (see above); its processor with
        # one source row per beam replaces it
        from transformers.generation import logits_process as lp
        reference_kwargs["logits_processor"] = lp.LogitsProcessorList([lp.EncoderRepetitionPenaltyLogitsProcessor(
            kwargs["encoder_repetition_penalty"], ids.repeat_interleave(num_beams, dim=0))])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **reference_kwargs)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # without scores to return, greedy steps may take the LM head screen's argmax: not with a processor
    plain = {k: v for k, v in kwargs.items() if k not in ("return_dict_in_generate", "output_scores")}
    assert torch.equal(ours.generate(ids, attention_mask=mask, **plain), expected.sequences)
    assert len(got.scores) == len(expected.scores)
    for step, (a, b) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("options", [dict(min_p=0.1), dict(typical_p=0.8), dict(epsilon_cutoff=0.01),
                                     dict(eta_cutoff=0.01), dict(top_k=0, min_p=0.05, typical_p=0.95)])
def test_sampling_warpers_draw_what_transformers_draws(models, options):
    ours, hf = models[0]["eager"], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 2, 19, seed=4)
    kwargs = dict(options, do_sample=True, max_new_tokens=10, num_return_sequences=2)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(11)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)


def test_custom_processor_and_prefix_fn_in_generate(models):
    from transformers.generation import logits_process as lp
    ours, hf = models[0]["cpu"], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 3, 17, seed=6)
    allowed = lambda batch_id, sent: list(range(2, 40, 2 + batch_id))  # noqa: E731
    for num_beams in (1, 2):
        kwargs = dict(max_new_tokens=9, num_beams=num_beams, prefix_allowed_tokens_fn=allowed,
                      logits_processor=lp.LogitsProcessorList([lp.NoRepeatNGramLogitsProcessor(2)]))
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, **kwargs)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(got, expected)
        assert all((int(t) - 2) % (2 + b) == 0 for b in range(3) for t in got[b, 1:])


def test_encoder_processors_without_input_ids_warn_and_are_skipped(models):
    ours = models[0]["eager"]
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, seed=2)
    embeds = ours.get_input_embeddings()(ids)
    plain = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6)
    with pytest.warns(UserWarning, match="encoder_repetition_penalty"):
        got = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                            encoder_repetition_penalty=3.0)
    assert torch.equal(got, plain)


class StopAfterToken:
    """A caller's stopping criterion: a row ends once it emitted ``token`` twice, row r after 4 + 2r
    tokens at the latest (rows end at different steps, and all end early)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        latest = 5 + 2 * torch.arange(input_ids.shape[0]) % 6
        return ((input_ids == self.token).sum(dim=1) >= 2) | (input_ids.shape[1] >= latest)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("with_eos", [True, False])
def test_stopping_criteria_match_transformers(models, backend, num_beams, with_eos):
    from transformers.generation.stopping_criteria import StoppingCriteriaList
    ours, hf = models[0][backend], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 3, 21, seed=9)
    emitted = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[:, 1:]
    token = int(torch.bincount(emitted.flatten())[2:].argmax()) + 2
    kwargs = dict(max_new_tokens=14, num_beams=num_beams, stopping_criteria=StoppingCriteriaList([StopAfterToken(token)]))
    if not with_eos:
        kwargs.update(eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)
    assert got.shape[1] < 15, "the criterion should end the rows early"


def test_max_time(models):
    ours = models[0]["cpu"]
    ids, mask = random_batch(ours.config.vocab_size, 2, 9, seed=1)
    for num_beams in (1, 2):
        assert ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, num_beams=num_beams,
                             max_time=0.0).shape == (2, 2)  # the first step already took longer than 0 s
        untimed = ours.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=num_beams)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=num_beams,
                                         max_time=600.0), untimed)
    with pytest.raises(ValueError, match="max_time"):
        ours.generate(ids, attention_mask=mask, max_time=-1.0)
    with pytest.raises(ValueError, match="must return a bool tensor"):
        ours.generate(ids, attention_mask=mask, stopping_criteria=[lambda ids, scores: torch.ones(5)])
    with pytest.raises(TypeError, match="stopping_criteria"):
        ours.generate(ids, attention_mask=mask, stopping_criteria=[None])


def test_sequence_bias_as_transformers_saves_it(models, tmp_path):
    """transformers' GenerationConfig.save_pretrained writes sequence_bias's tuple keys as text
    ("(5,)"), which transformers itself then refuses to read: read here as the tuples they were."""
    import transformers
    ours, hf = models[0]["cpu"], models[1]
    settings = dict(sequence_bias={(5,): 2.0, (6, 7): -3.0}, max_new_tokens=7, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)
    transformers.GenerationConfig(**settings).save_pretrained(tmp_path)
    saved = transformers.GenerationConfig.from_pretrained(tmp_path).to_diff_dict()
    assert "(6, 7)" in saved["sequence_bias"]
    ids, mask = random_batch(ours.config.vocab_size, 3, 14, seed=5)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=saved), expected)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **dict(settings, sequence_bias={"5": 2.0, "[6, 7]": -3.0})),
                       expected)
    with pytest.raises(ValueError, match="sequence_bias"):
        ours.generate(ids, attention_mask=mask, sequence_bias={"(5, x)": 1.0})


def tiny_model_and_tokenizers():
    """The shipped tiny model, and (tokenizer generate gets, tokenizer transformers' criterion gets)
    pairs: ours mirrors transformers' slow T5Tokenizer (whose token texts drop a trailing space the
    fast one keeps), and transformers' fast tokenizer given to both."""
    import transformers
    from umt5_fast.tokenizer import UMT5Tokenizer
    tiny = umt5_fast.__path__[0] + "/assets/tiny-umt5"
    fast = transformers.AutoTokenizer.from_pretrained(tiny)
    pairs = [(UMT5Tokenizer.from_pretrained(tiny), transformers.T5Tokenizer.from_pretrained(tiny)), (fast, fast)]
    return tiny, umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tiny), pairs


def test_stop_strings_match_transformers_criterion():
    """Our stop_strings check against transformers' StopStringCriteria on random id sequences (its
    tensor algorithm: a stop string in the text reaching into the last token, overhangs at both ends)."""
    from transformers.generation.stopping_criteria import StopStringCriteria
    from umt5_fast.processors import StopStrings
    _, _, pairs = tiny_model_and_tokenizers()
    ours_tokenizer = pairs[0][0]
    g = torch.Generator().manual_seed(0)
    vocab = ours_tokenizer.vocab_size
    sequences = torch.randint(0, vocab, (400, 6), generator=g)
    # stop strings cut from the texts of random tokens, so that they occur
    pieces = [ours_tokenizer.convert_tokens_to_string(["a", t]) for t in
              ours_tokenizer.convert_ids_to_tokens(torch.randint(3, vocab, (40,), generator=g).tolist())]
    strings = sorted({p[1 + i: 1 + i + n] for p in pieces for i in range(2) for n in (1, 2, 4) if len(p) > i + n})
    hits = 0
    for start in range(0, len(strings), 3):
        stops = strings[start:start + 3]
        for tokenizer, reference in pairs:
            expected = StopStringCriteria(reference, stops)(sequences, None)
            assert torch.equal(StopStrings(stops, tokenizer)(sequences, None), expected), (stops, type(tokenizer))
            hits += int(expected.sum())
    assert 0 < hits < len(sequences) * len(range(0, len(strings), 3)) * len(pairs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_in_generate_match_transformers(num_beams):
    """transformers 4.57's generate(stop_strings=...) passes its tokenizer on to UMT5's forward and
    fails: its StopStringCriteria, passed as a criterion, is the reference."""
    import json
    import transformers
    from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList
    tiny, model, pairs = tiny_model_and_tokenizers()
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(tiny)
    lines = open(tiny + "/heldout.jsonl", encoding="utf-8").read().splitlines()[:12]
    batch = pairs[0][0]([json.loads(line)["input"] for line in lines], padding=True, return_tensors="pt")
    for stops in ["und", "ty", ["-", "zig"], " t"]:
        for tokenizer, reference in pairs:
            criteria = StoppingCriteriaList([StopStringCriteria(reference, stops)])
            with torch.no_grad():
                expected = hf.generate(**batch, max_new_tokens=30, num_beams=num_beams, stopping_criteria=criteria)
            got = model.generate(**batch, max_new_tokens=30, num_beams=num_beams, stop_strings=stops,
                                 tokenizer=tokenizer)
            assert torch.equal(got, expected), stops
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**batch, stop_strings="und")
    with pytest.raises(ValueError, match="stop_strings"):
        model.generate(**batch, stop_strings=["", "x"], tokenizer=pairs[0][0])


def test_encoder_processors_read_input_ids_given_with_encoder_outputs(models):
    ours, hf = models[0]["cpu"], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 3, 15, seed=12)
    encoder_outputs = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    kwargs = dict(max_new_tokens=8, encoder_repetition_penalty=3.0, encoder_no_repeat_ngram_size=2)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.generate(ids, attention_mask=mask, encoder_outputs=encoder_outputs, **kwargs), expected)


def test_a_callers_processor_of_a_built_in_class_takes_its_place(models):
    """transformers' _merge_criteria_processor_list: a caller's RepetitionPenaltyLogitsProcessor
    replaces repetition_penalty's (at its position); warpers are not replaced (both run)."""
    from transformers.generation import logits_process as lp
    ours, hf = models[0]["eager"], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 2, 13, seed=13)
    cases = [dict(repetition_penalty=0.05, no_repeat_ngram_size=3,
                  logits_processor=lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(5.0)])),
             dict(min_new_tokens=4, logits_processor=lp.LogitsProcessorList([lp.MinLengthLogitsProcessor(6, [1])])),
             dict(do_sample=True, top_k=7, logits_processor=lp.LogitsProcessorList([lp.TopKLogitsWarper(3)]))]
    for kwargs in cases:
        kwargs = dict(kwargs, max_new_tokens=10, return_dict_in_generate=True, output_scores=True)
        torch.manual_seed(5)
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, **kwargs)
        torch.manual_seed(5)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(got.sequences, expected.sequences), kwargs
        for a, b in zip(got.scores, expected.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_criteria_of_built_in_classes(models):
    from transformers.generation import stopping_criteria as sc
    ours = models[0]["cpu"]
    ids, mask = random_batch(ours.config.vocab_size, 2, 9, seed=1)
    with pytest.raises(ValueError, match="MaxLengthCriteria"):
        ours.generate(ids, attention_mask=mask, stopping_criteria=sc.StoppingCriteriaList([sc.MaxLengthCriteria(30)]))
    with pytest.raises(ValueError, match="EosTokenCriteria"):
        ours.generate(ids, attention_mask=mask, stopping_criteria=[sc.EosTokenCriteria(5)])
    # a caller's MaxTimeCriteria replaces max_time's
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, max_time=0.0,
                        stopping_criteria=[sc.MaxTimeCriteria(600.0)])
    assert out.shape == (2, 7)


def test_beam_search_gives_callers_processors_scores_they_may_keep(models):
    """A processor that keeps the scores it sees (stateful processors do) sees transformers' values."""
    ours, hf = models[0]["cpu"], models[1]
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, seed=3)

    class Keep:
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(scores)
            return scores

    keep_ours, keep_theirs = Keep(), Keep()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, logits_processor=[keep_theirs])
    ours.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, logits_processor=[keep_ours])
    assert len(keep_ours.seen) == len(keep_theirs.seen)
    for a, b in zip(keep_ours.seen, keep_theirs.seen):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("vocab", [5000, 3001, 32128, 256384, 7 * 256 + 5])
def test_top_p_over_the_last_window_of_the_sort_equals_the_full_sort(vocab, monkeypatch):
    """After top-k, top-p sorts only the window of the row that holds its finite scores: the same
    cumulative probabilities, bit for bit, as the whole sort's over that window (softmax sums each
    value in the same vector lane; the window is never shorter than a vector: 7 * 256 + 5 ids and
    top_k=5 would otherwise leave 5), and the same filtered scores; with tied finite scores, NaN or
    +inf it sorts the whole row."""
    from umt5_fast import processors
    g = torch.Generator().manual_seed(vocab)
    cases = []
    for k, top_p, keep, scale, rows in [(5, 0.9, 1, 1.0, 3), (50, 0.5, 1, 4.0, 3), (125, 0.99, 3, 0.3, 3),
                                        (1, 0.1, 1, 1.0, 3), (5, 0.9, 1, 0.01, 64)]:
        scores = processors.top_k_filter(torch.randn(rows, vocab, generator=g) * scale, k)
        scores[2, : vocab // 2] = -math.inf
        cases.append((scores, top_p, keep))
    whole_sort = []
    for scores, top_p, keep in cases:
        cumulative, indices = processors.ascending_cumulative_probabilities(scores, keep)
        width = cumulative.shape[1]
        assert width < vocab // 4  # the window, not the row
        full_cumulative, full_indices = torch.sort(scores)[0].softmax(-1).cumsum(-1), torch.sort(scores)[1]
        assert torch.equal(cumulative.view(torch.int32), full_cumulative[:, -width:].view(torch.int32))
        finite = torch.isfinite(scores.gather(1, indices))
        assert torch.equal(indices[finite], full_indices[:, -width:][finite])
        whole_sort.append(processors.top_p_filter(scores.clone(), top_p, keep))
    tied = processors.top_k_filter(torch.randn(2, vocab, generator=g).round(decimals=1), 40)
    odd = processors.top_k_filter(torch.randn(2, vocab, generator=g), 30)
    odd[0, 5], odd[1, 9] = math.nan, math.inf
    for scores in (tied, odd):
        assert processors.ascending_cumulative_probabilities(scores)[0].shape[1] == vocab
    monkeypatch.setattr(processors, "_SOFTMAX_WINDOW", vocab)  # every window: the whole row
    for (scores, top_p, keep), got in zip(cases, whole_sort):
        expected = processors.top_p_filter(scores.clone(), top_p, keep)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
