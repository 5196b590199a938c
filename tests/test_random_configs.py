"""Random configs against transformers: each run draws fresh configs (heads, d_kv, widths, layers on
each side, buckets, max distance, activation, tying, epsilon), weights, inputs padded on both sides
and lengths up to past the max distance, then checks every model class's forward on both backends
(fp32, rel err <= 1e-5) and generate's ids (greedy, beam, sampled, a padded decoder prompt).

The run's seed is in every failure message; UMT5_FAST_TEST_SEED=<seed> replays it."""
import os
import random
import secrets

import pytest
import torch

import umt5_fast
from helpers import assert_close

transformers = pytest.importorskip("transformers")

SEED = int(os.environ.get("UMT5_FAST_TEST_SEED", secrets.randbits(31)))
CLASSES = ["UMT5ForConditionalGeneration", "UMT5EncoderModel", "UMT5Model", "UMT5ForSequenceClassification",
           "UMT5ForQuestionAnswering"]
OUTPUTS = ("logits", "last_hidden_state", "start_logits", "end_logits")


def random_case(rnd: random.Random, kind: str):
    layers, buckets = rnd.randint(1, 3), rnd.randint(4, 40)
    # mostly a max distance past where the log-scale buckets start; sometimes one below (refused)
    max_distance = rnd.randint(buckets, 128) if rnd.random() < 0.85 else rnd.randint(2, buckets)
    config = dict(vocab_size=rnd.randint(50, 400), d_model=rnd.randint(8, 96), d_kv=rnd.randint(3, 40),
                  num_heads=rnd.randint(1, 7), d_ff=rnd.randint(8, 200), num_layers=layers,
                  # (transformers' cached generate needs num_decoder_layers <= num_layers)
                  num_decoder_layers=layers if kind == "UMT5ForConditionalGeneration" else rnd.randint(1, 3),
                  relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance,
                  feed_forward_proj=rnd.choice(["gated-gelu", "relu", "gated-relu", "gelu", "gated-silu"]),
                  tie_word_embeddings=rnd.random() < 0.3, dropout_rate=0.0,
                  layer_norm_epsilon=rnd.choice([1e-6, 1e-3]), decoder_start_token_id=0, pad_token_id=0,
                  eos_token_id=1)
    if kind == "UMT5ForSequenceClassification":
        config["num_labels"] = rnd.randint(1, 5)
    return config


def padded_batch(rnd: random.Random, generator: torch.Generator, vocab: int, batch: int, length: int):
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        left, right = rnd.randint(0, length // 3), rnd.randint(0, length // 3)
        if left + right < length:
            mask[row, :left] = 0
            mask[row, length - right:] = 0
    return ids, mask


@pytest.mark.parametrize("case", range(12))
def test_a_random_config_matches_transformers(tmp_path, case):
    rnd = random.Random(SEED * 100 + case)
    generator = torch.Generator().manual_seed(SEED * 100 + case)
    kind = CLASSES[case % len(CLASSES)] if case < len(CLASSES) else rnd.choice(CLASSES)
    config = random_case(rnd, kind)
    where = f"seed {SEED} case {case}: {kind} {config}"
    hf = getattr(transformers, kind)(transformers.UMT5Config(**config)).eval()
    with torch.no_grad():  # real checkpoints' scales; at std 1 both sides drift ~1e-5 from fp64
        for name, parameter in hf.named_parameters():
            # the embedding / LM head at std 1: logits spread enough that greedy and beam choices
            # are no ties within fp32 rounding (at std 0.05 a tied head gave near-uniform logits,
            # whose beams a 5e-7 difference in scores reordered)
            std = 1.0 if name in ("shared.weight", "lm_head.weight") else rnd.choice([0.05, 0.3])
            parameter.normal_(0, std, generator=generator)
    hf.save_pretrained(tmp_path)
    batch, length = rnd.randint(1, 4), rnd.randint(1, 160)
    ids, mask = padded_batch(rnd, generator, config["vocab_size"], batch, length)
    if kind == "UMT5ForSequenceClassification":  # (it reads the last eos of each row)
        ids[:, -1], mask[:, -1] = 1, 1
    inputs = dict(input_ids=ids, attention_mask=mask)
    if kind in ("UMT5ForConditionalGeneration", "UMT5Model"):
        inputs.update(decoder_input_ids=torch.randint(0, config["vocab_size"], (batch, rnd.randint(1, 100)),
                                                      generator=generator), use_cache=False)
    try:
        with torch.no_grad():
            expected = hf(**inputs)
    except (IndexError, ZeroDivisionError, RuntimeError):
        # buckets undefined for some distances (transformers' formula fails): ours says so
        for backend in ("cpu", "eager"):
            with pytest.raises(ValueError, match="relative_attention"):
                getattr(umt5_fast, kind).from_pretrained(tmp_path, backend=backend)(**inputs)
        return
    for backend in ("cpu", "eager"):
        try:
            model = getattr(umt5_fast, kind).from_pretrained(tmp_path, backend=backend)
            got = model(**inputs)
        except ValueError as exc:  # the same bucket limit, reached by a sequence transformers still ran
            assert "log-scale buckets start" in str(exc), f"{where}: {exc}"
            continue
        for name in OUTPUTS:
            if name in expected and expected[name] is not None:
                assert_close(got[name], expected[name], 1e-5, f"{where} {backend} {name}")
    if kind != "UMT5ForConditionalGeneration":
        return
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path, backend="cpu")
    prompt_length = rnd.randint(1, 4)
    prompt = torch.randint(2, config["vocab_size"], (batch, prompt_length), generator=generator)
    prompt[:, 0] = 0
    prompt_mask = torch.ones(batch, prompt_length, dtype=torch.long)
    for row in range(batch):
        prompt_mask[row, :rnd.randint(0, prompt_length - 1)] = 0
    for options in (dict(max_new_tokens=rnd.randint(1, 12)),
                    dict(max_new_tokens=rnd.randint(1, 8), num_beams=rnd.randint(2, 4)),
                    dict(max_new_tokens=rnd.randint(1, 8), do_sample=True, top_k=rnd.choice([0, 5, 50]),
                         top_p=rnd.choice([1.0, 0.9]), temperature=rnd.choice([0.7, 1.5]),
                         num_return_sequences=rnd.randint(1, 3)),
                    dict(max_new_tokens=rnd.randint(1, 8), decoder_input_ids=prompt, decoder_attention_mask=prompt_mask,
                         num_beams=rnd.choice([1, 3]), repetition_penalty=rnd.choice([1.0, 1.3]))):
        try:
            torch.manual_seed(SEED + case)
            with torch.no_grad():
                their_ids = hf.generate(ids, attention_mask=mask, **options)
        except (IndexError, ZeroDivisionError, RuntimeError):
            continue  # (a generated length past the distances the buckets define: see above)
        torch.manual_seed(SEED + case)
        try:
            ours = model.generate(ids, attention_mask=mask, **options)
        except ValueError as exc:  # (as in forward)
            assert "log-scale buckets start" in str(exc), f"{where}: {exc}"
            continue
        shown = {k: v for k, v in options.items() if not torch.is_tensor(v)}
        assert torch.equal(ours, their_ids), f"{where} generate {shown}: {ours.tolist()} != {their_ids.tolist()}"
