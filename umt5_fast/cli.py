"""``umt5-fast`` / ``python -m umt5_fast``: generate, encode and bench from the command line."""
import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-umt5"


def read_texts(args) -> list:
    if args.text:
        return list(args.text)
    source = open(args.file, encoding="utf-8") if args.file else sys.stdin
    with source:
        texts = [line.rstrip("\n") for line in source if line.strip()]
    if not texts:
        raise SystemExit("umt5-fast: no input text (pass TEXT arguments, --file, or lines on stdin)")
    return texts


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_device(device: str):
    import torch
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise SystemExit(f"umt5-fast: error: --device {device!r} is not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"umt5-fast: error: --device {device!r}: this torch has no usable CUDA device")


def add_common(parser):
    parser.add_argument("text", nargs="*", help="input texts (default: --file, else stdin, one per line)")
    parser.add_argument("--file", help="read one input per line from this file")
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="checkpoint directory or single file (default: shipped tiny model)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model's directory)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpu", "eager", "triton"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=positive_int, default=16)


def load(cls, args, **kwargs):
    import torch
    from umt5_fast.tokenizer import UMT5Tokenizer
    check_device(args.device)
    model_path = Path(args.model)
    if not model_path.exists():
        raise FileNotFoundError(f"--model: no checkpoint directory or file at {model_path}")
    tokenizer = UMT5Tokenizer.from_pretrained(args.tokenizer or (model_path.parent if model_path.is_file()
                                                                 else model_path))
    model = cls.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                backend=args.backend, **kwargs)
    return tokenizer, model


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


SAMPLING_DEFAULTS = dict(seed=0, temperature=1.0, top_k=50, top_p=1.0)
DEFAULT_MAX_NEW_TOKENS = 64


def sampling_options(args) -> dict:
    return {name: getattr(args, name) for name in SAMPLING_DEFAULTS}


# generate options with a flag of their own, and ones the command cannot take (it prints text)
FLAGGED_OPTIONS = {"max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams", "do_sample": "--do-sample",
                   "streamer": "--stream", **{name: f"--{name.replace('_', '-')}" for name in SAMPLING_DEFAULTS}}
PYTHON_ONLY_OPTIONS = {"return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                       "output_hidden_states", "tokenizer", "logits_processor", "stopping_criteria",
                       "prefix_allowed_tokens_fn", "generator"}


def generate_option(text: str):
    """``--option NAME=VALUE``: VALUE read as JSON (numbers, lists, true / false, null), else as text."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. no_repeat_ngram_size=3), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def check_generate_args(parser, args):
    for name, _ in args.option:
        if name in FLAGGED_OPTIONS:
            parser.error(f"--option {name}: use its own flag ({FLAGGED_OPTIONS[name]})")
        if name in PYTHON_ONLY_OPTIONS:
            parser.error(f"--option {name}: the command prints text; use generate() from Python for it")
    given = [f"--{name.replace('_', '-')}" for name, value in sampling_options(args).items() if value is not None]
    if given and not args.do_sample:
        parser.error(f"{', '.join(given)} only act with --do-sample")
    if args.stream and args.num_beams > 1:
        parser.error("--stream prints one greedy or sampled sequence: it does not work with --num-beams > 1")


def cmd_generate(args):
    from umt5_fast import UMT5ForConditionalGeneration
    from umt5_fast.streamers import TextStreamer
    texts = read_texts(args)
    if args.stream and len(texts) > 1:
        raise SystemExit(f"umt5-fast: error: --stream prints one sequence, got {len(texts)} inputs")
    tokenizer, model = load(UMT5ForConditionalGeneration, args, quantize=args.quantize)
    options = dict(num_beams=args.num_beams, do_sample=args.do_sample)
    if args.max_new_tokens is not None or "max_length" not in dict(args.option):
        options["max_new_tokens"] = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if args.do_sample:
        options.update({name: value if value is not None else SAMPLING_DEFAULTS[name]
                        for name, value in sampling_options(args).items()})
    options.update(args.option, tokenizer=tokenizer)  # (stop_strings reads the tokens' text through it)
    for chunk in batches(texts, args.batch_size):
        enc = tokenizer(chunk, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
        if args.stream:
            model.generate(ids, attention_mask=mask, streamer=TextStreamer(tokenizer), **options)
            continue
        out = model.generate(ids, attention_mask=mask, **options)
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            print(text, flush=True)


def cmd_encode(args):
    import torch
    from umt5_fast import UMT5EncoderModel
    texts = read_texts(args)
    tokenizer, model = load(UMT5EncoderModel, args)
    pooled = []
    for chunk in batches(texts, args.batch_size):
        enc = tokenizer(chunk, padding=True, return_tensors="pt")
        mask = enc["attention_mask"].to(args.device)
        hidden = model(enc["input_ids"].to(args.device), attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        pooled.append((hidden * weights).sum(1) / weights.sum(1))  # mean over real tokens
    embeddings = torch.cat(pooled).cpu()
    if args.output:
        try:
            torch.save(embeddings, args.output)
        except (OSError, RuntimeError) as exc:
            raise SystemExit(f"umt5-fast: error: cannot write --output {args.output}: {exc}") from None
        print(f"wrote {tuple(embeddings.shape)} mean-pooled embeddings to {args.output}")
    else:
        for text, vector in zip(texts, embeddings):
            head = ", ".join(f"{v:.4f}" for v in vector[:6].tolist())
            print(f"{text!r}: dim={vector.numel()} norm={vector.norm():.4f} [{head}, ...]")


def cmd_bench(argv):
    from umt5_fast.benchmarks.__main__ import main as bench_main
    return bench_main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="umt5-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="seq2seq generation (greedy, beam or sampled)")
    add_common(gen)
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help=f"default {DEFAULT_MAX_NEW_TOKENS}, unless --option max_length=N is given")
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--do-sample", action="store_true")
    for name, kind in (("seed", int), ("temperature", float), ("top_k", int), ("top_p", float)):
        gen.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                         help=f"with --do-sample (default {SAMPLING_DEFAULTS[name]})")
    gen.add_argument("--option", type=generate_option, action="append", default=[], metavar="NAME=VALUE",
                     help="any other option of generate, VALUE as JSON (repeatable), e.g. --option "
                          "no_repeat_ngram_size=3 --option 'bad_words_ids=[[5]]' --option num_return_sequences=2")
    gen.add_argument("--quantize", choices=["int8", "w8a8", "bf16"], default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (one input)")
    enc = sub.add_parser("encode", help="encoder embeddings (mean-pooled over real tokens)")
    add_common(enc)
    enc.add_argument("--output", help="save the [N, d_model] embeddings here (torch.save)")
    sub.add_parser("bench", help="benchmark suite (see `umt5-fast bench --help`)", add_help=False)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
        check_generate_args(gen, args)
    try:
        return {"generate": cmd_generate, "encode": cmd_encode}[args.command](args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        # bad input (an unknown --option: TypeError), a missing file, out of memory
        raise SystemExit(f"umt5-fast: error: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
