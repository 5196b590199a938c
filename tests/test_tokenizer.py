"""UMT5Tokenizer must reproduce transformers' T5Tokenizer: ids, masks, padding, truncation, decoding.

A small multilingual sentencepiece model is trained here (T5's special ids: pad 0, eos 1, unk 2, no
bos; byte fallback so emoji encode) and both tokenizers load it the way users do, with
from_pretrained on a directory.
"""
import copy
import json
import random
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

transformers = pytest.importorskip("transformers")  # the reference; umt5_fast itself never imports it

from umt5_fast.tokenizer import UMT5Tokenizer  # noqa: E402

TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "umt5_fast/assets/tiny-umt5"

WORDS = {
    "english": "the quick brown fox jumps over a lazy dog while machine learning models translate text".split(),
    "french": "le renard brun très rapide saute par-dessus un chien paresseux à côté de l'été".split(),
    "german": "der schnelle braune Fuchs springt über den faulen Hund Straße Mädchen schön".split(),
    "russian": "быстрая коричневая лиса прыгает через ленивую собаку привет мир модель".split(),
    "chinese": "快速 的 棕色 狐狸 跳过 懒 狗 你好 世界 机器 学习 模型".split(),
    "japanese": "こんにちは 世界 東京 日本語 カタカナ ひらがな 機械 翻訳".split(),
    "arabic": "الثعلب البني السريع يقفز فوق الكلب الكسول مرحبا بالعالم".split(),
}
EMOJI = ["😀", "🚀", "👍🏽", "🇯🇵", "❤️", "🤖"]
PUNCTUATION = [".", ",", "!", "?", ";", ":", "'", "\"", "(", ")", "-", "%", "…"]
WHITESPACE = [" ", " ", " ", " ", "  ", "\t", "\n", " \u3000 "]
SPECIAL_LITERALS = ["</s>", "<pad>", "<unk>", "<extra_id_", "extra_id_0", "<extra_id_100>", "\u2581"]


def corpus_lines(rng, count):
    lines = []
    for _ in range(count):
        words = WORDS[rng.choice(list(WORDS))]
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 99999)}"
        lines.append(line + rng.choice(["", ".", "!", "?", ","]))
    return lines


def random_text(rng):
    """Mixed-script text with sentinels, special-token literals, odd whitespace, digits and emoji."""
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.55:
            parts.append(rng.choice(WORDS[rng.choice(list(WORDS))]))
        elif kind < 0.65:
            parts.append(f"<extra_id_{rng.randint(0, 99)}>")
        elif kind < 0.72:
            parts.append(rng.choice(EMOJI))
        elif kind < 0.8:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif kind < 0.9:
            parts.append(rng.choice(PUNCTUATION))
        else:
            parts.append(rng.choice(SPECIAL_LITERALS))
        parts.append(rng.choice(WHITESPACE) if rng.random() < 0.8 else "")
    text = "".join(parts)
    return rng.choice(["", " ", "  "]) + text if rng.random() < 0.2 else text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spiece")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(random.Random(0), 4000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "spiece"), model_type="unigram", vocab_size=700,
        hard_vocab_limit=False, character_coverage=0.9995, byte_fallback=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=1,
    )
    corpus.unlink()
    return directory


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(1234)
    return [random_text(rng) for _ in range(400)] + [
        "", " ", "hello <extra_id_0> world", "hello<extra_id_0>world", " a  </s>  b", "ends with </s>",
        "x <pad> y <unk> z", "<extra_id_1><extra_id_10><extra_id_99>", "<extra_id_1<extra_id_2>>",
        "😀 🚀 emoji only", "\u2581leading underline", "4721", " leading space", "trailing space ",
    ]


def load_pair(directory, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5Tokenizer's "legacy behaviour" notice
        reference = transformers.T5Tokenizer.from_pretrained(str(directory), **options)
    return reference, UMT5Tokenizer.from_pretrained(directory, **options)


def as_lists(encoding):
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in encoding.items()}


def quiet(function, *args, **kwargs):
    """Call with warnings silenced; return ("raised", exception type) instead of raising."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError) as error:
            return ("raised", type(error))


@pytest.mark.parametrize("legacy", [None, True, False])
def test_single_texts_give_the_same_ids(model_dir, texts, legacy):
    options = {} if legacy is None else {"legacy": legacy}
    reference, ours = load_pair(model_dir, **options)
    assert ours.legacy == (legacy is not False)
    for text in texts:
        for add_special_tokens in (True, False):
            expected = quiet(reference, text, add_special_tokens=add_special_tokens)
            assert quiet(ours, text, add_special_tokens=add_special_tokens) == dict(expected), text
        assert reference.tokenize(text) == ours.tokenize(text), text
        assert quiet(reference.encode, text) == quiet(ours.encode, text), text


@pytest.mark.parametrize("padding", [False, True, "longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batches_pad_and_truncate_the_same(model_dir, texts, padding, padding_side):
    reference, ours = load_pair(model_dir)
    batches = [texts[i:i + 7] for i in range(0, 140, 7)] + [[texts[3]]]
    for truncation in (None, False, True):
        for max_length in (None, 2, 5, 12, 40):
            for return_tensors in (None, "pt"):
                options = dict(padding=padding, truncation=truncation, max_length=max_length,
                               return_tensors=return_tensors, padding_side=padding_side)
                for batch in batches:
                    expected = quiet(reference, batch, **options)
                    got = quiet(ours, batch, **options)
                    assert (got if isinstance(got, tuple) else as_lists(got)) == (
                        expected if isinstance(expected, tuple) else as_lists(expected)), (batch, options)
                single = quiet(reference, batches[0][1], **options)
                assert as_lists(quiet(ours, batches[0][1], **options)) == as_lists(single), options


@pytest.mark.filterwarnings("ignore:This sequence already")
def test_tensors_have_the_reference_shape_and_dtype(model_dir, texts):
    reference, ours = load_pair(model_dir)
    for text_or_batch in (texts[5], texts[:9]):
        expected = reference(text_or_batch, padding=True, return_tensors="pt")
        got = ours(text_or_batch, padding=True, return_tensors="pt")
        for key in ("input_ids", "attention_mask"):
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key])
    assert torch.equal(ours.encode(texts[7], return_tensors="pt"), reference.encode(texts[7], return_tensors="pt"))
    assert got.input_ids is got["input_ids"]


def test_unequal_lengths_cannot_become_one_tensor(model_dir):
    _, ours = load_pair(model_dir)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["short", "a much longer text than the first one"], return_tensors="pt")


def test_truncation_too_short_for_the_eos_token_leaves_the_text_as_transformers_does(model_dir):
    """transformers logs an error and returns the sequence untruncated: so do we, with a warning."""
    reference, ours = load_pair(model_dir)
    with pytest.warns(UserWarning, match="max_length leaves no room"):
        got = ours(["some text to truncate", "more"], truncation=True, max_length=1)
    assert got == dict(reference(["some text to truncate", "more"], truncation=True, max_length=1))


def as_plain(value):
    """Tensors and arrays as (kind, nested lists), so that the return type is compared too."""
    if isinstance(value, tuple):
        return value
    return {k: (type(v).__name__, str(getattr(v, "dtype", "")), v.tolist()) if hasattr(v, "tolist") else v
            for k, v in value.items()}


@pytest.mark.filterwarnings("ignore:This sequence already")
def test_pairs_targets_and_call_options_match_transformers(model_dir, texts):
    """text_pair (A </s> B </s>) under every truncation strategy, text_target (labels), padding to a
    multiple, numpy tensors, special-token masks and lengths: the same as T5Tokenizer, on a random
    sample of the option grid."""
    reference, ours = load_pair(model_dir)
    rng = random.Random(7)
    for _ in range(300):
        size = rng.choice([None, 1, 3])
        first = rng.choice(texts) if size is None else rng.sample(texts, size)
        second = rng.choice(texts) if size is None else rng.sample(texts, size)
        inputs = rng.choice([dict(text=first, text_pair=second), dict(text=first, text_target=second),
                             dict(text_target=first), dict(text=first, text_pair=second, text_target=second,
                                                           text_pair_target=first)])
        options = dict(truncation=rng.choice([None, True, "longest_first", "only_first", "only_second", False]),
                       max_length=rng.choice([None, 3, 7, 20]), padding=rng.choice([False, True, "max_length"]),
                       padding_side=rng.choice(["right", "left"]), pad_to_multiple_of=rng.choice([None, 8]),
                       return_tensors=rng.choice([None, "pt", "np"]), add_special_tokens=rng.random() < 0.8,
                       return_special_tokens_mask=rng.random() < 0.5, return_length=rng.random() < 0.5)
        expected, got = quiet(reference, **inputs, **options), quiet(ours, **inputs, **options)
        if not isinstance(expected, tuple) and any(str(getattr(v, "dtype", "")) == "object" for v in expected.values()):
            expected = ("raised", ValueError)  # ragged rows: numpy object arrays there, as for "pt" an error here
        assert as_plain(got) == as_plain(expected), (inputs, options)


@pytest.mark.filterwarnings("ignore:This sequence already")
def test_transformers_helper_methods_and_attributes(model_dir, texts):
    reference, ours = load_pair(model_dir)
    pair = (texts[10], texts[11])
    assert ours.encode(*pair) == reference.encode(*pair)
    assert dict(ours.encode_plus(*pair, max_length=9, truncation=True)) == dict(
        reference.encode_plus(*pair, max_length=9, truncation=True))
    batch = [pair, (texts[12], texts[13])]
    assert dict(ours.batch_encode_plus(batch, padding=True)) == dict(reference.batch_encode_plus(batch, padding=True))
    assert dict(ours.batch_encode_plus(texts[:4])) == dict(reference.batch_encode_plus(texts[:4]))
    a, b = ours.encode(texts[14], add_special_tokens=False), ours.encode(texts[15], add_special_tokens=False)
    for args in ((a,), (a, b)):
        assert ours.build_inputs_with_special_tokens(*args) == reference.build_inputs_with_special_tokens(*args)
        assert ours.get_special_tokens_mask(*args) == reference.get_special_tokens_mask(*args)
    with_specials = ours.encode(texts[16] + " <extra_id_3>")
    assert ours.get_special_tokens_mask(with_specials, already_has_special_tokens=True) == \
        reference.get_special_tokens_mask(with_specials, already_has_special_tokens=True)
    assert [ours.num_special_tokens_to_add(p) for p in (False, True)] == \
        [reference.num_special_tokens_to_add(p) for p in (False, True)]
    assert sorted(ours.get_sentinel_tokens()) == sorted(reference.get_sentinel_tokens())
    assert sorted(ours.get_sentinel_token_ids()) == sorted(reference.get_sentinel_token_ids())
    for name in ("bos_token", "bos_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
                 "additional_special_tokens_ids", "special_tokens_map"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert getattr(ours, name) == getattr(reference, name), name
    assert ours.batch_decode([a, b], True) == reference.batch_decode([a, b], True)
    # pad: per-example dicts (a data collator's input) and a dict of rows, to a multiple, as tensors
    examples = [dict(ours(t)) for t in texts[20:24]]
    for kwargs in (dict(), dict(padding="max_length", max_length=64, return_tensors="pt"),
                   dict(pad_to_multiple_of=8, padding_side="left")):
        assert as_plain(ours.pad(examples, **kwargs)) == as_plain(reference.pad(examples, **kwargs)), kwargs
    rows = {"input_ids": [e["input_ids"] for e in examples]}
    assert as_plain(ours.pad(rows)) == as_plain(reference.pad(copy.deepcopy(rows)))
    assert rows == {"input_ids": [e["input_ids"] for e in examples]}  # (transformers pads its input in place)


def test_call_and_loading_arguments_transformers_takes(model_dir, texts, tmp_path):
    """return_attention_mask / return_token_type_ids None, True, False (None: T5's inputs, a mask
    included), the off values of overflow / offsets / split words, and from_pretrained's hub and class
    arguments and subfolder: what T5Tokenizer gives; the features themselves and unknown arguments
    are clear errors; transformers' attributes and vocabulary helpers."""
    reference, ours = load_pair(model_dir)
    # (T5Tokenizer's token types of a text that ends in </s> count a second </s>, one more than its ids)
    batch = [text for text in texts[30:40] if not text.rstrip().endswith("</s>")][:3]
    for options in (dict(return_attention_mask=None), dict(return_attention_mask=False),
                    dict(return_token_type_ids=True), dict(return_token_type_ids=None, return_tensors="pt"),
                    dict(return_overflowing_tokens=False, stride=0, return_offsets_mapping=False,
                         is_split_into_words=False)):
        expected = reference(batch, padding=True, **options)
        got = ours(batch, padding=True, **options)
        assert list(got.keys()) == list(expected.keys()) and as_plain(got) == as_plain(expected), options
    with pytest.raises(NotImplementedError, match="return_offsets_mapping"):
        ours(batch[0], return_offsets_mapping=True)
    for options in (dict(return_overflowing_tokens=True), dict(is_split_into_words=True)):
        with pytest.raises(ValueError, match="not supported"):
            ours(batch[0], **options)
    pipeline = tmp_path / "pipeline"
    ours.save_pretrained(pipeline / "tokenizer", push_to_hub=False, token=None, legacy_format=None)
    with pytest.raises(ValueError, match="push_to_hub is not supported"):
        ours.save_pretrained(tmp_path / "elsewhere", push_to_hub=True)
    with pytest.raises(TypeError, match=r"save_pretrained\(\) got unexpected arguments \['no_such_option'\]"):
        ours.save_pretrained(tmp_path / "elsewhere", no_such_option=1)
    hub = dict(revision="main", cache_dir=str(tmp_path), token=None, local_files_only=True, trust_remote_code=True,
               use_fast=False, force_download=False)
    loaded = UMT5Tokenizer.from_pretrained(pipeline, subfolder="tokenizer", **hub)
    assert loaded(batch)["input_ids"] == reference(batch)["input_ids"]
    assert loaded.name_or_path == str(pipeline / "tokenizer") and loaded.is_fast is reference.is_fast is False
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected arguments \['no_such_option'\]"):
        UMT5Tokenizer.from_pretrained(model_dir, no_such_option=1)
    assert ours.sp_model.get_piece_size() == reference.sp_model.get_piece_size()
    text = "Hello , world ! It 's fine ."
    assert ours.clean_up_tokenization(text) == reference.clean_up_tokenization(text)
    (saved,) = ours.save_vocabulary(tmp_path / "vocabulary", filename_prefix="x")
    (tmp_path / "vocabulary-theirs").mkdir()
    (their_saved,) = reference.save_vocabulary(str(tmp_path / "vocabulary-theirs"), filename_prefix="x")
    assert Path(saved).name == Path(their_saved).name and Path(saved).read_bytes() == Path(their_saved).read_bytes()


def test_added_tokens_json_of_older_saves_is_read(model_dir, tmp_path):
    """Before transformers 4.34, added tokens lived only in added_tokens.json."""
    import shutil
    shutil.copy(model_dir / "spiece.model", tmp_path / "spiece.model")
    reference, _ = load_pair(tmp_path)
    size = len(reference)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"hundred": size, "<new>": size + 1}))
    reference, ours = load_pair(tmp_path)
    assert len(ours) == len(reference) == size + 2
    text = "one hundred <new> two"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode([size, size + 1]) == reference.decode([size, size + 1])


def random_id_sequences(rng, tokenizer, count):
    special = tokenizer.all_special_ids
    return [[rng.choice(special) if rng.random() < 0.2 else rng.randrange(len(tokenizer))
             for _ in range(rng.randint(0, 20))] for _ in range(count)]


@pytest.mark.parametrize("legacy", [True, False])
def test_decoding_matches(model_dir, texts, legacy):
    reference, ours = load_pair(model_dir, legacy=legacy)
    encoded = quiet(reference, texts, padding=True)["input_ids"]
    sequences = encoded + random_id_sequences(random.Random(5), reference, 300)
    for options in ({}, {"skip_special_tokens": True}, {"clean_up_tokenization_spaces": True},
                    {"spaces_between_special_tokens": False, "skip_special_tokens": False}):
        assert ours.batch_decode(sequences, **options) == reference.batch_decode(sequences, **options), options
    assert ours.batch_decode(torch.tensor(encoded)) == reference.batch_decode(torch.tensor(encoded))
    for token_id in (0, 1, 2, 5, len(ours) - 1):
        for skip in (False, True):
            assert ours.decode(token_id, skip_special_tokens=skip) == reference.decode(token_id, skip_special_tokens=skip)
            assert ours.decode(torch.tensor(token_id), skip_special_tokens=skip) == reference.decode(
                token_id, skip_special_tokens=skip)


def test_vocabulary_and_special_tokens_match(model_dir):
    reference, ours = load_pair(model_dir)
    assert ours.vocab_size == reference.vocab_size
    assert len(ours) == len(reference) == ours.vocab_size + 100
    assert ours.get_vocab() == reference.get_vocab()
    for name in ("eos_token", "pad_token", "unk_token", "eos_token_id", "pad_token_id", "unk_token_id",
                 "all_special_tokens", "all_special_ids", "additional_special_tokens"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)
    sentinels = [f"<extra_id_{n}>" for n in range(100)]
    assert ours.convert_tokens_to_ids(sentinels) == [ours.vocab_size + 99 - n for n in range(100)]
    all_ids = list(range(len(ours)))
    assert ours.convert_ids_to_tokens(all_ids) == reference.convert_ids_to_tokens(all_ids)
    assert ours.convert_ids_to_tokens(all_ids, skip_special_tokens=True) == reference.convert_ids_to_tokens(
        all_ids, skip_special_tokens=True)
    pieces = ours.convert_ids_to_tokens(all_ids) + ["not-a-piece", "▁the"]
    assert ours.convert_tokens_to_ids(pieces) == reference.convert_tokens_to_ids(pieces)
    assert ours.convert_tokens_to_ids("<extra_id_0>") == reference.convert_tokens_to_ids("<extra_id_0>")
    with pytest.raises(IndexError, match=str(len(ours))):
        ours.convert_ids_to_tokens(len(ours))


def test_saved_tokenizer_loads_in_both_libraries(model_dir, texts, tmp_path):
    reference, ours = load_pair(model_dir, padding_side="left", model_max_length=24)
    ours.save_pretrained(tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {
        "spiece.model", "tokenizer_config.json", "special_tokens_map.json"}
    reloaded_reference, reloaded_ours = load_pair(tmp_path / "ours")
    assert reloaded_reference.padding_side == reloaded_ours.padding_side == "left"
    assert reloaded_ours.model_max_length == reloaded_reference.model_max_length == 24
    batch = texts[:20]
    expected = quiet(reference, batch, padding="max_length", truncation=True)
    for tokenizer in (reloaded_reference, reloaded_ours):
        assert quiet(tokenizer, batch, padding="max_length", truncation=True) == dict(expected)


@pytest.mark.parametrize("settings", [
    {"extra_ids": 10},
    {"extra_ids": 0},
    # UMT5-style: the sentinels are named in additional_special_tokens, none are appended
    {"extra_ids": 0, "additional_special_tokens": [f"<extra_id_{n}>" for n in range(20)]},
    {"extra_ids": 3, "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<sep>"]},
    {"additional_special_tokens": ["<lang_en>", "<lang_de>"]},  # no sentinels: appended, no reserved ids
    {"eos_token": "<eos>", "legacy": False, "clean_up_tokenization_spaces": True},  # eos not in the vocab
])
def test_configs_written_by_transformers(model_dir, texts, tmp_path, settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.T5Tokenizer(str(model_dir / "spiece.model"), **settings).save_pretrained(str(tmp_path))
    reference, ours = load_pair(tmp_path)
    assert len(ours) == len(reference)
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.all_special_ids == reference.all_special_ids
    extra_texts = [f"{texts[i]} <lang_en> {texts[i + 1]}<sep>" for i in range(40)]
    expected = quiet(reference, texts + extra_texts, padding=True)
    assert quiet(ours, texts + extra_texts, padding=True) == dict(expected)
    for skip in (False, True):
        assert ours.batch_decode(expected["input_ids"], skip_special_tokens=skip) == reference.batch_decode(
            expected["input_ids"], skip_special_tokens=skip)


def test_special_tokens_map_without_added_tokens_decoder(model_dir, tmp_path):
    """Older checkpoints: tokenizer_config.json without added_tokens_decoder, special tokens in the map."""
    (tmp_path / "spiece.model").write_bytes((model_dir / "spiece.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 5, "model_max_length": 16}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": {"content": "<pad>", "lstrip": False},
        "additional_special_tokens": [f"<extra_id_{n}>" for n in range(5)]}))
    reference, ours = load_pair(tmp_path)
    assert len(ours) == len(reference) == ours.vocab_size + 5
    batch = ["a <extra_id_4> b", "<extra_id_0> Straße 😀", "x"]
    assert quiet(ours, batch, padding="max_length", truncation=True) == dict(
        quiet(reference, batch, padding="max_length", truncation=True))


def test_fast_tokenizer_agrees_on_ordinary_text(model_dir):
    """T5TokenizerFast converted from the same spiece.model gives the same ids on normal text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = transformers.T5TokenizerFast.from_pretrained(str(model_dir), from_slow=True)
    ours = UMT5Tokenizer.from_pretrained(model_dir)
    rng = random.Random(7)
    batch = [" ".join(rng.choice(WORDS[rng.choice(list(WORDS))]) for _ in range(rng.randint(1, 12)))
             + rng.choice(["", ".", " <extra_id_3> tail", " 12345"]) for _ in range(200)]
    for options in ({"padding": True}, {"padding": "max_length", "max_length": 16, "truncation": True}):
        assert as_lists(ours(batch, **options)) == as_lists(fast(batch, **options)), options
    ids = ours(batch)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == fast.batch_decode(ids, skip_special_tokens=True)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        UMT5Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        UMT5Tokenizer.from_pretrained(tmp_path / "no-such-dir")
    (tmp_path / "spiece.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="spiece.model"):
        UMT5Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="spiece.model"):
        UMT5Tokenizer.from_pretrained(tmp_path, legacy=False)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        UMT5Tokenizer.from_pretrained(tmp_path)


def test_bad_arguments_are_rejected(model_dir):
    _, ours = load_pair(model_dir)
    with pytest.raises(ValueError, match="padding"):
        ours("text", padding="sideways")
    with pytest.raises(ValueError, match="padding_side"):
        ours("text", padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("text", return_tensors="tf")
    with pytest.raises(TypeError, match="string"):
        ours(42)
    with pytest.raises(TypeError, match="string"):
        ours(["fine", None])


@pytest.mark.skipif(not (TINY_MODEL_DIR / "heldout.jsonl").is_file(), reason="tiny model not built")
def test_shipped_tiny_model_tokenizer_matches(tmp_path):
    reference, ours = load_pair(TINY_MODEL_DIR)
    examples = [json.loads(line) for line in (TINY_MODEL_DIR / "heldout.jsonl").read_text("utf-8").splitlines()]
    inputs, targets = [e["input"] for e in examples], [e["target"] for e in examples]
    for batch in (inputs, targets):
        expected = reference(batch, padding=True)
        assert ours(batch, padding=True) == dict(expected)
        assert ours.batch_decode(expected["input_ids"], skip_special_tokens=True) == batch


def test_unknown_options_and_mismatched_pairs_are_named(model_dir):
    _, ours = load_pair(model_dir)
    with pytest.raises(ValueError, match="text_pair must be a string for a string and a list of as many"):
        ours(["one", "two"], text_pair=["only one"])
    with pytest.raises(ValueError, match="text_pair"):
        ours("one", text_pair=["a list"])
    examples = [dict(ours(t)) for t in ("one", "two three")]
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        ours.pad(examples, padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors must be None, 'pt' or 'np', got 'tf'"):
        ours.pad(examples, return_tensors="tf")
