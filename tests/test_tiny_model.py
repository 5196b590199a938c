"""The shipped tiny trained model (numbers to words in four languages) through umt5_fast."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import umt5_fast
from umt5_fast.ops import available_backends

TINY = Path(umt5_fast.__file__).parent / "assets" / "tiny-umt5"


def heldout():
    return [json.loads(line) for line in (TINY / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("backend", available_backends())
def test_greedy_exact_match_on_heldout_inputs(backend):
    from umt5_fast.tokenizer import UMT5Tokenizer
    tokenizer = UMT5Tokenizer.from_pretrained(TINY)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(TINY, backend=backend)
    examples = heldout()
    assert len(examples) >= 200
    correct = 0
    for start in range(0, len(examples), 50):
        chunk = examples[start:start + 50]
        batch = tokenizer([e["input"] for e in chunk], padding=True, return_tensors="pt")
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=40)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        correct += sum(text.strip() == e["target"] for text, e in zip(texts, chunk))
    accuracy = correct / len(examples)
    print(f"{backend}: held-out exact match {accuracy:.3f}")
    assert accuracy >= 0.95


def test_cli_generate_and_encode():
    example = heldout()[0]
    result = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", example["input"]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == example["target"]
    streamed = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", "--stream"], input=example["input"],
                              capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout.strip() == example["target"], streamed.stderr
    encoded = subprocess.run([sys.executable, "-m", "umt5_fast", "encode", "en: 12", "de: 12"],
                             capture_output=True, text=True, timeout=120)
    assert encoded.returncode == 0 and encoded.stdout.count("dim=") == 2, encoded.stderr
    single_file = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", "--model",
                                  str(TINY / "model.safetensors"), example["input"]],
                                 capture_output=True, text=True, timeout=120)  # tokenizer from its directory
    assert single_file.returncode == 0 and single_file.stdout.strip() == example["target"], single_file.stderr
    elsewhere = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", "--model", str(TINY / "model.safetensors"),
                                "--tokenizer", "/nonexistent-tokenizer", example["input"]],
                               capture_output=True, text=True, timeout=120)  # --tokenizer wins over the file's directory
    assert elsewhere.returncode != 0 and "/nonexistent-tokenizer" in elsewhere.stderr, elsewhere.stderr
    missing = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", "--model", "/nonexistent", "x"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nonexistent" in missing.stderr


def test_cli_passes_other_generate_options():
    """--option NAME=VALUE reaches generate (JSON values): the same ids as the Python call."""
    from umt5_fast.tokenizer import UMT5Tokenizer
    tokenizer = UMT5Tokenizer.from_pretrained(TINY)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(TINY)
    example = heldout()[1]
    batch = tokenizer([example["input"]], return_tensors="pt")
    plain = model.generate(**batch, max_new_tokens=64)[0, 1:]
    banned = [[int(plain[1])], [int(plain[3])]]
    kwargs = dict(bad_words_ids=banned, num_beams=2, num_return_sequences=2, max_new_tokens=64)
    expected = tokenizer.batch_decode(model.generate(**batch, **kwargs), skip_special_tokens=True)
    result = subprocess.run([sys.executable, "-m", "umt5_fast", "generate", "--num-beams", "2", "--option",
                             f"bad_words_ids={json.dumps(banned)}", "--option", "num_return_sequences=2",
                             example["input"]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected and expected[0] != example["target"]


def test_quantized_weights_agree_with_fp32_on_the_tiny_model():
    """Top-1 agreement of the reduced-precision modes with fp32 on real (trained) weights."""
    from umt5_fast.tokenizer import UMT5Tokenizer
    tokenizer = UMT5Tokenizer.from_pretrained(TINY)
    examples = heldout()[:100]
    batch = tokenizer([e["input"] for e in examples], padding=True, return_tensors="pt")
    labels = tokenizer([e["target"] for e in examples], padding=True, return_tensors="pt")["input_ids"]
    reference = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(TINY)
    expected = reference(**batch, labels=labels).logits.argmax(-1)
    for mode in ("int8", "w8a8", "bf16"):
        model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(TINY, quantize=mode)
        got = model(**batch, labels=labels).logits.argmax(-1)
        agreement = (got == expected)[labels != 0].float().mean().item()
        print(f"{mode}: top-1 agreement with fp32 on the tiny model {agreement:.4f}")
        assert agreement >= 0.98


@pytest.mark.parametrize("args,message", [
    (["generate", "--batch-size", "0", "x"], "--batch-size: must be a positive integer"),
    (["encode", "--batch-size", "-1", "x"], "--batch-size: must be a positive integer"),
    (["generate", "--device", "foo", "x"], "'foo' is not a torch device"),
    (["generate", "--model", "/nonexistent", "x"], "--model: no checkpoint directory or file at /nonexistent"),
    (["encode", "--output", "/nonexistent/dir/e.pt", "x"], "cannot write --output /nonexistent/dir/e.pt"),
    (["bench", "--threads", "0"], "--threads: must be >= 1"),
    (["bench", "--new-tokens", "x"], "invalid int value: 'x'"),
    (["generate", "--top-p", "0.5", "--seed", "3", "x"], "--seed, --top-p only act with --do-sample"),
    (["generate", "--stream", "--num-beams", "2", "x"], "--stream prints one greedy or sampled sequence"),
    (["generate", "--stream", "a", "b"], "--stream prints one sequence, got 2 inputs"),
    (["generate", "--max-new-tokens", "0", "x"], "max_new_tokens must be an integer >= 1"),
    (["generate", "--option", "x", "y"], "--option: expected NAME=VALUE"),
    (["generate", "--option", "num_beams=2", "y"], "--option num_beams: use its own flag (--num-beams)"),
    (["generate", "--option", "no_such_option=2", "y"], "unexpected argument 'no_such_option'"),
    (["generate", "--option", "bad_words_ids=5", "y"], "bad_words_ids must be a non-empty list"),
    (["generate", "--option", "streamer=1", "y"], "--option streamer: use its own flag (--stream)"),
    (["generate", "--option", "return_dict_in_generate=true", "y"], "use generate() from Python"),
])
def test_cli_bad_arguments_get_one_line_errors(args, message):
    result = subprocess.run([sys.executable, "-m", "umt5_fast", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_text_streamers_stream_exactly_the_decoded_results():
    """Per row, the streamed pieces join to the decoded result: batches, several sampled sequences
    per input, special tokens and prompt kept, a streamer reused across calls, and the iterator
    streamer fed from another thread."""
    import threading
    from umt5_fast.streamers import TextIteratorStreamer, TextStreamer
    from umt5_fast.tokenizer import UMT5Tokenizer
    tokenizer = UMT5Tokenizer.from_pretrained(TINY)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(TINY)
    batch = tokenizer([e["input"] for e in heldout()[:3]], padding=True, return_tensors="pt")

    def streamed(streamer_kwargs, **generate_kwargs):
        pieces = {}
        streamer = TextStreamer(tokenizer, on_text=lambda row, text: pieces.setdefault(row, []).append(text),
                                **streamer_kwargs)
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], streamer=streamer,
                             max_new_tokens=20, **generate_kwargs)
        return ["".join(pieces.get(row, [])) for row in range(out.shape[0])], out, streamer

    for streamer_kwargs, generate_kwargs in [({}, {}), ({}, dict(do_sample=True, seed=3, num_return_sequences=3)),
                                             (dict(skip_prompt=False, skip_special_tokens=False), {})]:
        texts, out, streamer = streamed(streamer_kwargs, **generate_kwargs)
        keep_special = not streamer_kwargs.get("skip_special_tokens", True)
        ids = out if streamer_kwargs.get("skip_prompt") is False else out[:, 1:]
        assert texts == [tokenizer.decode(row, skip_special_tokens=not keep_special) for row in ids]
    reused = TextStreamer(tokenizer, on_text=lambda row, text: None)
    for _ in range(2):  # the second call streams its own result only
        pieces = {}
        reused.on_text = lambda row, text: pieces.setdefault(row, []).append(text)
        out = model.generate(batch["input_ids"][:1], streamer=reused, max_new_tokens=20)
        assert "".join(pieces[0]) == tokenizer.decode(out[0, 1:], skip_special_tokens=True)
    iterator = TextIteratorStreamer(tokenizer, timeout=60)
    worker = threading.Thread(target=model.generate, args=(batch["input_ids"][:1],),
                              kwargs=dict(streamer=iterator, max_new_tokens=20))
    worker.start()
    text = "".join(piece for row, piece in iterator if row == 0)
    worker.join()
    assert text == tokenizer.decode(model.generate(batch["input_ids"][:1], max_new_tokens=20)[0, 1:],
                                    skip_special_tokens=True)
