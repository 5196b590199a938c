"""Train the tiny UMT5 shipped in umt5_fast/assets/tiny-umt5/.

The task is spelling out whole numbers 0..9999 in words, in four languages: the input
"de: 4721" maps to "viertausendsiebenhunderteinundzwanzig". Every answer can be checked
exactly, so the model gives end-to-end tests a real, trained checkpoint whose greedy outputs
are known to be right, without downloading anything.

Fifty numbers, in all four languages (200 examples), are never trained on; they are written to
heldout.jsonl and the script reports greedy exact match on them.

Everything is seeded and the step count is fixed (not a time budget), so a rerun on the same
machine and thread count gives the same weights. Needs torch, transformers and sentencepiece;
`umt5_fast` itself is not used.

    python scripts/train_tiny.py [--out umt5_fast/assets/tiny-umt5] [--steps N]
"""
import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import T5Tokenizer, UMT5Config, UMT5ForConditionalGeneration

SEED = 1234
LANGUAGES = ("en", "de", "fr", "es")
NUMBER_RANGE = range(10000)
HELDOUT_NUMBER_COUNT = 50  # x 4 languages = 200 held-out examples
SENTENCEPIECE_VOCAB_SIZE = 800  # incl. 256 byte pieces; the task text supports at most ~830
EXTRA_IDS = 100  # the <extra_id_N> sentinels T5Tokenizer appends, as for real UMT5
REQUIRED_EXACT_MATCH = 0.97  # on the held-out examples, or the checkpoint is not saved
MAX_NEW_TOKENS = 48  # generous: the longest answer (French 9999) is 12 pieces with </s>

# --- number to words ------------------------------------------------------------------------

EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def english_words(n):
    """American style without "and": 4721 -> "four thousand seven hundred twenty-one"."""
    if n < 20:
        return EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return EN_TENS[tens] + ("-" + EN_ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return EN_ONES[hundreds] + " hundred" + (" " + english_words(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    return english_words(thousands) + " thousand" + (" " + english_words(rest) if rest else "")


DE_ONES = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
           "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn",
           "achtzehn", "neunzehn"]
DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig",
           "neunzig"]


def german_words(n):
    """One compound word, units before tens: 4721 -> "viertausendsiebenhunderteinundzwanzig".

    "eins" is "ein" inside compounds (einundzwanzig); hundreds and thousands always spell out
    their "ein" (einhunderteins, eintausend).
    """
    if n == 0:
        return DE_ONES[0]
    words = ""
    thousands, n = divmod(n, 1000)
    if thousands:
        words += ("ein" if thousands == 1 else DE_ONES[thousands]) + "tausend"
    hundreds, n = divmod(n, 100)
    if hundreds:
        words += ("ein" if hundreds == 1 else DE_ONES[hundreds]) + "hundert"
    if n >= 20:
        tens, ones = divmod(n, 10)
        if ones:
            words += ("ein" if ones == 1 else DE_ONES[ones]) + "und"
        words += DE_TENS[tens]
    elif n:
        words += DE_ONES[n]
    return words


FR_ONES = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix",
           "onze", "douze", "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit",
           "dix-neuf"]
FR_TENS = ["", "", "vingt", "trente", "quarante", "cinquante", "soixante"]


def french_below_100(n, is_final):
    """0 < n < 100. `is_final`: nothing follows, so 80 takes its plural s (quatre-vingts)."""
    if n < 20:
        return FR_ONES[n]
    if n < 70:
        tens, ones = divmod(n, 10)
        if ones == 0:
            return FR_TENS[tens]
        return FR_TENS[tens] + (" et un" if ones == 1 else "-" + FR_ONES[ones])
    if n < 80:  # 70..79 are sixty-ten .. sixty-nineteen
        return "soixante" + (" et " if n == 71 else "-") + FR_ONES[n - 60]
    if n == 80:
        return "quatre-vingts" if is_final else "quatre-vingt"
    return "quatre-vingt-" + FR_ONES[n - 80]


def french_words(n):
    """Traditional (pre-1990) spelling: 4721 -> "quatre mille sept cent vingt et un"."""
    if n == 0:
        return FR_ONES[0]
    words = []
    thousands, n = divmod(n, 1000)
    if thousands:
        words.append("mille" if thousands == 1 else FR_ONES[thousands] + " mille")
    hundreds, n = divmod(n, 100)
    if hundreds:
        if hundreds == 1:
            words.append("cent")
        else:  # "cents" only when nothing follows: deux cents, deux cent un
            words.append(FR_ONES[hundreds] + (" cent" if n else " cents"))
    if n:
        words.append(french_below_100(n, is_final=True))
    return " ".join(words)


ES_ONES = ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve",
           "diez", "once", "doce", "trece", "catorce", "quince", "dieciséis", "diecisiete",
           "dieciocho", "diecinueve", "veinte", "veintiuno", "veintidós", "veintitrés",
           "veinticuatro", "veinticinco", "veintiséis", "veintisiete", "veintiocho",
           "veintinueve"]
ES_TENS = ["", "", "", "treinta", "cuarenta", "cincuenta", "sesenta", "setenta", "ochenta",
           "noventa"]
ES_HUNDREDS = ["", "ciento", "doscientos", "trescientos", "cuatrocientos", "quinientos",
               "seiscientos", "setecientos", "ochocientos", "novecientos"]


def spanish_words(n):
    """4721 -> "cuatro mil setecientos veintiuno"; 100 alone is "cien", 101 "ciento uno"."""
    if n < 30:
        return ES_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ES_TENS[tens] + (" y " + ES_ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        if rest == 0:
            return "cien" if hundreds == 1 else ES_HUNDREDS[hundreds]
        return ES_HUNDREDS[hundreds] + " " + spanish_words(rest)
    thousands, rest = divmod(n, 1000)
    words = "mil" if thousands == 1 else ES_ONES[thousands] + " mil"
    return words + (" " + spanish_words(rest) if rest else "")


NUMBER_TO_WORDS = {"en": english_words, "de": german_words, "fr": french_words,
                   "es": spanish_words}


def example(language, number):
    return {"input": f"{language}: {number}", "target": NUMBER_TO_WORDS[language](number)}


# --- data, tokenizer, model -------------------------------------------------------------------

def split_examples():
    """All (language, number) examples, minus every language of HELDOUT_NUMBER_COUNT numbers."""
    heldout_numbers = sorted(random.Random(SEED).sample(NUMBER_RANGE, HELDOUT_NUMBER_COUNT))
    heldout_set = set(heldout_numbers)
    train = [example(lang, n) for n in NUMBER_RANGE if n not in heldout_set for lang in LANGUAGES]
    heldout = [example(lang, n) for n in heldout_numbers for lang in LANGUAGES]
    return train, heldout


def train_sentencepiece(examples, out_dir):
    """A unigram model over the task text with T5's special ids (pad 0, eos 1, unk 2, no bos).

    Digits are split so "4721" is four pieces the model can read position by position. Training
    from an iterator into memory keeps file paths out of the saved model, so reruns are byte-identical.
    """
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(text for e in examples for text in (e["input"], e["target"])),
        model_writer=model_bytes, model_type="unigram",
        vocab_size=SENTENCEPIECE_VOCAB_SIZE, character_coverage=1.0, split_digits=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        num_threads=2, minloglevel=2,
    )
    model_path = out_dir / "spiece.model"
    model_path.write_bytes(model_bytes.getvalue())
    return T5Tokenizer(str(model_path), extra_ids=EXTRA_IDS, legacy=True)


def build_model(vocab_size):
    config = UMT5Config(
        vocab_size=vocab_size, d_model=128, d_kv=32, num_heads=4, d_ff=256,
        num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        # No dropout: 40k examples of a deterministic task leave nothing to regularise, and the
        # saved config is what inference (where dropout is off anyway) reads.
        dropout_rate=0.0, tie_word_embeddings=False,
    )
    return UMT5ForConditionalGeneration(config)


def encode_examples(tokenizer, examples):
    """Token id lists (with </s>) per example, so batches are just padded slices."""
    inputs = tokenizer([e["input"] for e in examples])["input_ids"]
    targets = tokenizer([e["target"] for e in examples])["input_ids"]
    return list(zip(inputs, targets))


def pad(sequences, pad_id):
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])


def make_batch(pairs, pad_id):
    input_ids = pad([p[0] for p in pairs], pad_id)
    labels = pad([p[1] for p in pairs], -100)  # -100: ignored by the loss
    return input_ids, (input_ids != pad_id).long(), labels


def exact_match(model, tokenizer, examples, batch_size=100):
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            enc = tokenizer([e["input"] for e in chunk], padding=True, return_tensors="pt")
            out = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            predictions = tokenizer.batch_decode(out, skip_special_tokens=True)
            correct += sum(p == e["target"] for p, e in zip(predictions, chunk))
    model.train()
    return correct / len(examples)


def learning_rate(step, total_steps, peak, warmup):
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "umt5_fast/assets/tiny-umt5")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    shuffle_rng = random.Random(SEED)
    started = time.time()

    train, heldout = split_examples()
    print(f"{len(train)} training examples, {len(heldout)} held out", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_sentencepiece(train, args.out)
    tokenizer.save_pretrained(args.out)
    print(f"sentencepiece vocab {tokenizer.vocab_size}, tokenizer length {len(tokenizer)}", flush=True)
    model = build_model(len(tokenizer))
    print(f"model parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)

    pairs = encode_examples(tokenizer, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    order, cursor = [], 0
    running_loss = None
    model.train()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):  # new epoch
            order = list(range(len(pairs)))
            shuffle_rng.shuffle(order)
            cursor = 0
        batch = [pairs[i] for i in order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        input_ids, attention_mask, labels = make_batch(batch, tokenizer.pad_token_id)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}/{args.steps}  loss {running_loss:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - started:.0f}s", flush=True)
        if (step + 1) % 2000 == 0 and step + 1 < args.steps:
            print(f"  held-out exact match {exact_match(model, tokenizer, heldout):.3f}", flush=True)

    accuracy = exact_match(model, tokenizer, heldout)
    print(f"held-out greedy exact match: {accuracy:.3f} ({len(heldout)} examples), "
          f"{(time.time() - started) / 60:.1f} min in all", flush=True)
    if accuracy < REQUIRED_EXACT_MATCH:
        raise SystemExit(f"held-out exact match {accuracy:.3f} is below {REQUIRED_EXACT_MATCH}; "
                         f"model not saved (try more --steps)")

    model.generation_config.max_length = MAX_NEW_TOKENS + 1  # decoder start token + answer
    model.save_pretrained(args.out)
    with open(args.out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for e in heldout:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
