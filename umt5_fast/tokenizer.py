"""UMT5Tokenizer: sentencepiece tokenization that gives the same ids as transformers' T5Tokenizer.

UMT5 checkpoints ship a sentencepiece `spiece.model` and, when saved by transformers,
`tokenizer_config.json` / `special_tokens_map.json`. This module reads those files itself (transformers
is not imported) and reproduces the slow `T5Tokenizer`'s behaviour, quirks included, because a drop-in
replacement must produce the ids the model was trained on:

* `</s>` is appended (unless the ids already end with it) and counts towards `max_length`.
* "Added tokens" (`<pad>`, `</s>`, `<unk>` and the `<extra_id_N>` sentinels) are cut out of the text
  before sentencepiece sees it. Sentinels strip the whitespace on both sides of them.
* `<extra_id_N>` has id `sentencepiece_size - 1 + extra_ids - N`: the sentinels count down from the top.
* With `legacy=True` (T5Tokenizer's default) each piece of text between added tokens gets
  sentencepiece's dummy-prefix space; with `legacy=False` only the start of the text does.
* Decoding rebuilds the text piece run by piece run, with a space before special tokens, the way
  `T5Tokenizer.convert_tokens_to_string` and `PreTrainedTokenizer._decode` do.
"""
import inspect
import json
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

SENTENCEPIECE_FILE = "spiece.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
SPIECE_UNDERLINE = "\u2581"

# transformers writes int(1e30) as model_max_length when a model has no length limit, and treats
# anything above 1e20 as "no limit" (padding or truncating to it is skipped).
NO_MAX_LENGTH = int(1e30)
_LIMITLESS_ABOVE = int(1e20)

_PADDING_CHOICES = {False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                    "max_length": "max_length"}
_TRUNCATION_CHOICES = {None: None, False: None, "do_not_truncate": None, True: "longest_first",
                       "longest_first": "longest_first", "only_first": "only_first", "only_second": "only_second"}
# transformers' from_pretrained arguments about the hub or the tokenizer class: nothing to do here
_HUB_ARGUMENTS = ("revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download",
                  "resume_download", "proxies", "trust_remote_code", "use_fast", "_from_pipeline")
# transformers' save_pretrained arguments that change nothing here (no upload; one file format)
_SAVE_ARGUMENTS = ("push_to_hub", "token", "legacy_format", "safe_serialization", "commit_message", "private")
_CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before sentencepiece runs (transformers' AddedToken fields).

    `lstrip`/`rstrip`: the token swallows the whitespace on its left/right. `single_word`: it only
    matches as a whole word. `normalized` is kept only to write configs transformers can read.
    """
    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True

    @classmethod
    def from_config(cls, value):
        """A token as written in tokenizer configs: a plain string or a dict of AddedToken fields."""
        if isinstance(value, AddedToken):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            fields = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special")
                      if k in value}
            return cls(value["content"], **fields)
        raise ValueError(f"cannot read a token from {value!r}: expected a string or a dict with 'content'")

    def to_config(self, with_special=True):
        fields = asdict(self)
        if not with_special:
            del fields["special"]
        return fields


class BatchEncoding(dict):
    """The tokenizer's output: a dict of model inputs that also allows `enc.input_ids` and `enc.to(device)`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this encoding (keys: {list(self)})") from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _load_sentencepiece(path, legacy):
    """Load `path`; with `legacy=False` switch off the dummy prefix, as T5Tokenizer(legacy=False) does."""
    if not path.is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {path}")
    proto = path.read_bytes()
    try:
        if not legacy:
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto.FromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto)
    except Exception as error:  # sentencepiece raises RuntimeError, protobuf DecodeError
        raise ValueError(f"{path} is not a valid sentencepiece model: {error}") from error
    return processor


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read tokenizer file {path}: {error}") from error


def _to_python_ids(ids):
    """Accept ints, lists, numpy arrays and torch tensors of token ids."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


class UMT5Tokenizer:
    """Tokenizer for UMT5 (and T5) checkpoints, equivalent to transformers' slow T5Tokenizer."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100,
                 additional_special_tokens=None, legacy=True, add_prefix_space=True,
                 model_max_length=NO_MAX_LENGTH, clean_up_tokenization_spaces=False,
                 padding_side="right", truncation_side="right", added_tokens_decoder=None):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} must be 'right' or 'left', got {side!r}")
        self.vocab_file = Path(vocab_file)
        self.name_or_path = str(self.vocab_file.parent)  # (transformers' attribute: where it was loaded from)
        self.legacy = bool(legacy)
        self.add_prefix_space = bool(add_prefix_space)
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.extra_ids = int(extra_ids)
        self._sp = _load_sentencepiece(self.vocab_file, self.legacy)

        self._eos = AddedToken.from_config(eos_token)
        self._unk = AddedToken.from_config(unk_token)
        self._pad = AddedToken.from_config(pad_token)
        self._additional, self._added_by_id = self._sentinel_layout(additional_special_tokens)
        for token_id, token in (added_tokens_decoder or {}).items():
            self._added_by_id[int(token_id)] = AddedToken.from_config(token)
        self._register_special_tokens()

        self.all_special_tokens = list(dict.fromkeys(
            t.content for t in (self._eos, self._unk, self._pad, *self._additional)))
        self._all_special_set = frozenset(self.all_special_tokens)
        self.all_special_ids = self.convert_tokens_to_ids(self.all_special_tokens)
        self._all_special_id_set = frozenset(self.all_special_ids)
        # Added tokens that decode as separate words (sentinels above the sentencepiece range and
        # added non-special tokens), cf. PreTrainedTokenizer._decode's "legacy_added_tokens".
        self._standalone_tokens = (set(self._added_by_content) - self._all_special_set) | {
            t.content for t in self._additional if self.convert_tokens_to_ids(t.content) >= self.vocab_size}
        # Longest first, so "<extra_id_10>" wins over a shorter token that is a prefix of it.
        contents = sorted(self._added_by_content, key=len, reverse=True)
        self._added_token_pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        self._unk_piece_count = len(self._sp.encode(self._unk.content))

    def _sentinel_layout(self, additional_special_tokens):
        """T5Tokenizer's additional special tokens, and the ids it reserves for the sentinels.

        <extra_id_N> gets id sentencepiece_size - 1 + extra_ids - N, counting down from the top.
        """
        generated = [AddedToken(f"<extra_id_{i}>") for i in range(self.extra_ids)]
        if additional_special_tokens is None:
            additional, sentinel_count = generated, self.extra_ids
        else:
            additional = [AddedToken.from_config(t) for t in additional_special_tokens]
            sentinel_count = sum("<extra_id_" in t.content for t in additional)
            if sentinel_count == 0:
                # T5Tokenizer then appends the sentinels without reserving ids for them: they are
                # registered like any other special token, after the vocabulary.
                additional += generated
            elif self.extra_ids > 0 and self.extra_ids != sentinel_count:
                raise ValueError(f"extra_ids={self.extra_ids} but additional_special_tokens holds {sentinel_count} "
                                 "<extra_id_N> tokens; they must agree (or set extra_ids=0)")
        top = self._sp.get_piece_size() - 1 + self.extra_ids
        reserved = {top - i: AddedToken(f"<extra_id_{i}>", lstrip=True, rstrip=True) for i in range(sentinel_count)}
        return additional, reserved

    def _register_special_tokens(self):
        """Give every special token an id, as PreTrainedTokenizer._add_tokens does.

        A token that is not an added token yet takes its sentencepiece id if it is a piece, otherwise
        the next id after the whole vocabulary.
        """
        self._added_by_content = {t.content: i for i, t in self._added_by_id.items()}
        vocabulary = self.get_vocab()
        next_id = len(vocabulary)
        for token in (self._eos, self._unk, self._pad, *self._additional):
            if not token.content or token.content in self._added_by_content:
                continue
            if token.content in vocabulary:
                token_id = vocabulary[token.content]
            else:
                token_id = vocabulary[token.content] = next_id
                next_id += 1
            self._added_by_id[token_id] = token
            self._added_by_content[token.content] = token_id
        self._length = len(vocabulary)

    # --- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, *, subfolder: str = "", **overrides):
        """Load `directory`/spiece.model plus, if present, tokenizer_config.json and special_tokens_map.json
        (in ``subfolder`` of it: a pipeline's "tokenizer").

        Keyword arguments override the saved settings (e.g. legacy=False, padding_side="left");
        transformers' hub and class-choice arguments (revision, token, use_fast...) are accepted and
        change nothing (files are local, and this is the sentencepiece tokenizer).
        """
        for name in _HUB_ARGUMENTS:
            overrides.pop(name, None)
        unknown = sorted(set(overrides) - set(inspect.signature(cls.__init__).parameters) - {"self", "vocab_file"})
        if unknown:
            raise TypeError(f"UMT5Tokenizer.from_pretrained() got unexpected arguments {unknown}")
        directory = Path(directory) / subfolder
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        special_map_path = directory / SPECIAL_TOKENS_MAP_FILE
        # As in transformers: special_tokens_map.json only counts when the config does not list
        # every added token itself.
        if "added_tokens_decoder" not in config and special_map_path.is_file():
            for key, value in _read_json(special_map_path).items():
                if key == "additional_special_tokens":
                    merged = list(config.get(key) or [])
                    merged += [t for t in value if t not in merged]
                    config[key] = merged
                elif key in ("eos_token", "unk_token", "pad_token"):
                    config[key] = value
        added_tokens_path = directory / ADDED_TOKENS_FILE
        if "added_tokens_decoder" not in config and added_tokens_path.is_file():
            # saves before transformers 4.34 list added tokens only here, as {content: id}; like
            # transformers, those not named special elsewhere load as normalized non-special tokens
            added = _read_json(added_tokens_path)
            if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
                raise ValueError(f"{added_tokens_path} must map token strings to integer ids")
            special = {AddedToken.from_config(token).content for token in (
                *(config.get(key) for key in ("eos_token", "unk_token", "pad_token")),
                *(config.get("additional_special_tokens") or [])) if token is not None}
            config["added_tokens_decoder"] = {
                str(token_id): {"content": content, "special": content in special, "normalized": content not in special}
                for content, token_id in added.items()}
        if config.get("sp_model_kwargs"):
            raise ValueError(f"{config_path}: sp_model_kwargs={config['sp_model_kwargs']} (sampling) is not supported")
        settings = {key: config[key] for key in (
            "eos_token", "unk_token", "pad_token", "extra_ids", "additional_special_tokens", "legacy",
            "add_prefix_space", "model_max_length", "clean_up_tokenization_spaces", "padding_side",
            "truncation_side", "added_tokens_decoder") if config.get(key) is not None}
        settings.update(overrides)
        return cls(directory / SENTENCEPIECE_FILE, **settings)  # (name_or_path: directory)

    # transformers' PreTrainedTokenizer attributes: a sentencepiece ("slow") tokenizer
    is_fast = False

    @property
    def sp_model(self):
        """The sentencepiece processor (T5Tokenizer's attribute)."""
        return self._sp

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Write the sentencepiece model (as T5Tokenizer: ``[prefix-]spiece.model``); its path, in a tuple."""
        target = Path(save_directory) / ((f"{filename_prefix}-" if filename_prefix else "") + SENTENCEPIECE_FILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)

    def save_pretrained(self, directory, **hub_options):
        """Write spiece.model, tokenizer_config.json and special_tokens_map.json (loadable by transformers);
        transformers' other arguments (push_to_hub=False, token...) change nothing."""
        unknown = sorted(set(hub_options) - set(_SAVE_ARGUMENTS))
        if unknown:
            raise TypeError(f"UMT5Tokenizer.save_pretrained() got unexpected arguments {unknown}")
        if hub_options.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported: umt5_fast writes local files only")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_vocabulary(directory)
        named = {"eos_token": self._eos, "pad_token": self._pad, "unk_token": self._unk}
        additional = [t.content for t in self._additional]
        config = {
            "add_prefix_space": self.add_prefix_space,
            "added_tokens_decoder": {str(i): self._added_by_id[i].to_config() for i in sorted(self._added_by_id)},
            "additional_special_tokens": additional,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **{name: token.content for name, token in named.items()},
            "extra_ids": self.extra_ids,
            "legacy": self.legacy,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
            "truncation_side": self.truncation_side,
        }
        special_map = {"additional_special_tokens": additional,
                       **{name: token.to_config(with_special=False) for name, token in named.items()}}
        for name, content in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special_map)):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    # --- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self):
        """Pieces in the sentencepiece model (sentinels and other added tokens not counted), as in T5Tokenizer."""
        return self._sp.get_piece_size()

    def get_vocab(self):
        vocabulary = {self._id_to_token(i): i for i in range(self.vocab_size)}
        vocabulary.update(self._added_by_content)
        return vocabulary

    def __len__(self):
        """Size of the full vocabulary, sentinels included (what the model's embedding must cover)."""
        return self._length

    eos_token = property(lambda self: self._eos.content)
    unk_token = property(lambda self: self._unk.content)
    pad_token = property(lambda self: self._pad.content)
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self._eos.content))
    unk_token_id = property(lambda self: self.convert_tokens_to_ids(self._unk.content))
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self._pad.content))
    additional_special_tokens = property(lambda self: [t.content for t in self._additional])
    additional_special_tokens_ids = property(lambda self: self.convert_tokens_to_ids(self.additional_special_tokens))
    # T5 has no bos / sep / cls / mask token
    bos_token = bos_token_id = sep_token = sep_token_id = cls_token = cls_token_id = None
    mask_token = mask_token_id = None

    @property
    def special_tokens_map(self):
        return {"eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token,
                "additional_special_tokens": self.additional_special_tokens}

    def get_sentinel_tokens(self):
        return [t for t in self.additional_special_tokens if re.search(r"<extra_id_\d+>", t)]

    def get_sentinel_token_ids(self):
        return self.convert_tokens_to_ids(self.get_sentinel_tokens())

    def _token_to_id(self, token):
        added_id = self._added_by_content.get(token)
        return added_id if added_id is not None else self._sp.piece_to_id(token)

    def _id_to_token(self, token_id):
        added = self._added_by_id.get(token_id)
        if added is not None:
            return added.content
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is neither a sentencepiece id (0..{self.vocab_size - 1}) "
                             "nor the id of an added token")
        return self._sp.id_to_piece(token_id)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        ids = _to_python_ids(ids)
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids
                if not (skip_special_tokens and int(i) in self._all_special_id_set)]

    # --- encoding ------------------------------------------------------------------------------

    def tokenize(self, text):
        """Text to pieces: added tokens cut out first, the text between them through sentencepiece."""
        if not self.legacy and text:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        chunks = self._split_on_added_tokens(text)
        pieces = []
        for chunk in chunks:
            if chunk in self._added_by_content:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._sentencepiece_pieces(chunk))
        if not self.legacy and len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self._all_special_set:
            pieces = pieces[1:]  # T5Tokenizer drops the lone prefix space before a leading special token
        return pieces

    def _split_on_added_tokens(self, text):
        """Split around added tokens and apply their strip rules (PreTrainedTokenizer.tokenize)."""
        if self._added_token_pattern is None:
            return [text]
        chunks = [c for c in self._added_token_pattern.split(text) if c]
        for i, chunk in enumerate(chunks):
            token_id = self._added_by_content.get(chunk)
            if token_id is None:
                continue
            token = self._added_by_id[token_id]
            left = chunks[i - 1] if i > 0 else None
            right = chunks[i + 1] if i < len(chunks) - 1 else None
            if token.rstrip and right:
                chunks[i + 1] = right.lstrip()
            if token.lstrip and left:
                chunks[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                chunks[i - 1] += chunk
                chunks[i] = ""
            elif token.single_word and right and right[0] != " ":
                chunks[i + 1] = chunk + chunks[i + 1]
                chunks[i] = ""
        return chunks

    def _sentencepiece_pieces(self, text):
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp.encode(text, out_type=str)
        # Without the dummy prefix, sentencepiece drops a leading space; encoding after "<unk>" and
        # removing its pieces keeps it (T5Tokenizer._tokenize's trick).
        pieces = self._sp.encode(self._unk.content + text, out_type=str)
        return pieces[self._unk_piece_count:] if len(pieces) >= self._unk_piece_count else pieces

    def _text_ids(self, text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a string or a list of strings, got an item of type {type(text).__name__}")
        return self.convert_tokens_to_ids(self.tokenize(text))

    def _with_eos(self, ids):
        """T5Tokenizer._add_eos_if_not_present."""
        if ids and ids[-1] == self.eos_token_id:
            warnings.warn(f"This sequence already ends with {self.eos_token}; not adding a second one "
                          "(T5Tokenizer behaviour).", stacklevel=3)
            return list(ids)
        return list(ids) + [self.eos_token_id]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``A </s>`` or ``A </s> B </s>`` (no second ``</s>`` where a sequence already ends with one)."""
        first = self._with_eos(token_ids_0)
        return first if token_ids_1 is None else first + self._with_eos(token_ids_1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        """1 where ``build_inputs_with_special_tokens`` puts a special token (T5Tokenizer's rule)."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("already_has_special_tokens=True takes one sequence of ids (with its special tokens)")
            return [1 if i in self._all_special_id_set else 0 for i in _to_python_ids(token_ids_0)]
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def num_special_tokens_to_add(self, pair=False):
        return 2 if pair else 1

    def _truncate(self, ids, pair, remove, strategy):
        """transformers' truncate_sequences (no overflow returned): ``remove`` ids off ``ids`` and
        ``pair`` by ``strategy``; what cannot be removed is left, with a warning, as transformers does."""
        def cut(seq, n):
            return seq[:-n] if self.truncation_side == "right" else seq[n:]

        if remove <= 0:
            return ids, pair
        if strategy == "only_first" or (strategy == "longest_first" and pair is None):
            if len(ids) > remove:
                return cut(ids, remove), pair
            warnings.warn(f"max_length leaves no room: {remove} ids would have to go from a first sequence of "
                          f"{len(ids)}; not truncating it (T5Tokenizer behaviour)", stacklevel=4)
        elif strategy == "longest_first":
            first_remove = min(abs(len(pair) - len(ids)), remove)
            second_remove = remove - first_remove
            if len(ids) > len(pair):
                from_ids, from_pair = first_remove + second_remove // 2, second_remove - second_remove // 2
            else:
                from_ids, from_pair = second_remove // 2, first_remove + second_remove - second_remove // 2
            return (cut(ids, from_ids) if from_ids else ids), (cut(pair, from_pair) if from_pair else pair)
        elif strategy == "only_second" and pair is not None:
            if len(pair) > remove:
                return ids, cut(pair, remove)
            warnings.warn(f"max_length leaves no room: {remove} ids would have to go from a second sequence of "
                          f"{len(pair)}; not truncating it (T5Tokenizer behaviour)", stacklevel=4)
        return ids, pair

    def _encode_one(self, text, pair_text, add_special_tokens, truncation, max_length):
        """(input ids, special tokens mask) of one text (and its pair), truncated as transformers does."""
        ids = self._text_ids(text)
        pair = None if pair_text is None else self._text_ids(pair_text)
        if truncation and max_length is not None:
            specials = self.num_special_tokens_to_add(pair is not None) if add_special_tokens else 0
            total = len(ids) + (len(pair) if pair is not None else 0) + specials
            ids, pair = self._truncate(ids, pair, total - max_length, truncation)
        if add_special_tokens:
            return self.build_inputs_with_special_tokens(ids, pair), self.get_special_tokens_mask(ids, pair)
        combined = ids + (pair or [])
        return combined, [0] * len(combined)

    def _resolve_lengths(self, padding, truncation, max_length):
        """(padding mode, truncation strategy or None, max length) as transformers derives them from
        the call's arguments."""
        if padding not in _PADDING_CHOICES:
            raise ValueError(f"padding must be one of {list(_PADDING_CHOICES)}, got {padding!r}")
        if truncation not in _TRUNCATION_CHOICES:
            raise ValueError(f"truncation must be one of {list(_TRUNCATION_CHOICES)}, got {truncation!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers truncates when only max_length is given
        pad_mode, strategy = _PADDING_CHOICES[padding], _TRUNCATION_CHOICES[truncation]
        if max_length is None and (pad_mode == "max_length" or strategy):
            if self.model_max_length > _LIMITLESS_ABOVE:
                warnings.warn("No max_length given and the tokenizer has no model_max_length: "
                              "not padding to / truncating at a maximum length.", stacklevel=4)
                pad_mode = None if pad_mode == "max_length" else pad_mode
                strategy = None
            else:
                max_length = self.model_max_length
        return pad_mode, strategy, max_length

    def _pad_rows(self, rows, pad_mode, max_length, pad_to_multiple_of, padding_side):
        """Pad every row of ``rows`` (a dict of per-key lists of rows) in place, as transformers' pad()."""
        if pad_mode is None or not rows["input_ids"]:
            return
        width = max_length if pad_mode == "max_length" else max(len(r) for r in rows["input_ids"])
        if pad_to_multiple_of and width % pad_to_multiple_of:
            width = (width // pad_to_multiple_of + 1) * pad_to_multiple_of
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "special_tokens_mask": 1, "token_type_ids": 0}
        differences = [width - len(ids) for ids in rows["input_ids"]]  # every key grows by input_ids' difference
        for key, fill_value in fills.items():
            for i, row in enumerate(rows.get(key, ())):
                fill = [fill_value] * differences[i]
                rows[key][i] = list(row) + fill if padding_side == "right" else fill + list(row)

    def __call__(self, text=None, text_pair=None, text_target=None, text_pair_target=None, add_special_tokens=True,
                 padding=False, truncation=None, max_length=None, *, pad_to_multiple_of=None, padding_side=None,
                 return_tensors=None, return_attention_mask=None, return_token_type_ids=None,
                 return_special_tokens_mask=False, return_length=False, return_overflowing_tokens=False,
                 return_offsets_mapping=False, stride=0, is_split_into_words=False, verbose=True):
        """Encode a string or a list of strings (with ``text_pair``: pairs, ``A </s> B </s>``) into
        input_ids (+ attention_mask); ``text_target`` encodes the labels the same way (transformers'
        arguments and rules: None for return_attention_mask / return_token_type_ids means T5's
        model inputs, with a mask and without token types). A single string gives flat lists (or a
        batch of one with tensors)."""
        if text is None and text_target is None:
            raise ValueError("pass text or text_target")
        if return_offsets_mapping:  # (as transformers' Python tokenizers)
            raise NotImplementedError("return_offsets_mapping is not available from a sentencepiece (slow) tokenizer")
        if return_overflowing_tokens or is_split_into_words:
            raise ValueError("return_overflowing_tokens and is_split_into_words are not supported by "
                             "UMT5Tokenizer; join pre-split words with spaces")
        options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                       return_tensors=return_tensors,
                       return_attention_mask=return_attention_mask is None or return_attention_mask,
                       return_token_type_ids=bool(return_token_type_ids),
                       return_special_tokens_mask=return_special_tokens_mask, return_length=return_length)
        encoding = self._call_one(text, text_pair, **options) if text is not None else None
        if text_target is None:
            return encoding
        targets = self._call_one(text_target, text_pair_target, **options)
        if encoding is None:
            return targets
        encoding["labels"] = targets["input_ids"]
        return encoding

    def _padding_side(self, padding_side, return_tensors):
        """The call's padding side (else the tokenizer's), both output options checked."""
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        padding_side = padding_side or self.padding_side
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        return padding_side

    def _encoding(self, rows, is_batch, return_tensors):
        """``rows`` (per key, a list of rows) as the call returns them: lists, or tensors."""
        encoding = BatchEncoding({key: value if is_batch else value[0] for key, value in rows.items()})
        return self._as_tensors(encoding, is_batch, return_tensors) if return_tensors else encoding

    def _call_one(self, text, text_pair, add_special_tokens, padding, truncation, max_length, pad_to_multiple_of,
                  padding_side, return_tensors, return_attention_mask, return_token_type_ids,
                  return_special_tokens_mask, return_length):
        padding_side = self._padding_side(padding_side, return_tensors)
        is_batch = isinstance(text, (list, tuple))
        if not is_batch and not isinstance(text, str):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        texts = list(text) if is_batch else [text]
        if text_pair is None:
            pairs = [None] * len(texts)
        else:
            if isinstance(text_pair, (list, tuple)) != is_batch or (is_batch and len(text_pair) != len(texts)):
                raise ValueError("text_pair must be a string for a string and a list of as many strings for a list")
            pairs = list(text_pair) if is_batch else [text_pair]
        pad_mode, strategy, max_length = self._resolve_lengths(padding, truncation, max_length)
        if strategy and pad_mode and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise ValueError(f"truncation to max_length={max_length} and padding to a multiple of "
                             f"pad_to_multiple_of={pad_to_multiple_of} contradict each other (as in transformers)")
        encoded = [self._encode_one(t, p, add_special_tokens, strategy, max_length) for t, p in zip(texts, pairs)]
        rows = {"input_ids": [ids for ids, _ in encoded]}
        if return_token_type_ids:  # T5 has one segment: zeros, as T5Tokenizer gives them
            rows["token_type_ids"] = [[0] * len(ids) for ids in rows["input_ids"]]
        if return_special_tokens_mask:
            rows["special_tokens_mask"] = [mask for _, mask in encoded]
        if return_attention_mask:
            rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
        unpadded = [len(ids) for ids in rows["input_ids"]]
        self._pad_rows(rows, pad_mode, max_length, pad_to_multiple_of, padding_side)
        if return_length:  # transformers: a batch's lengths before padding, a single text's after
            rows["length"] = unpadded if is_batch else [len(rows["input_ids"][0])]
        return self._encoding(rows, is_batch, return_tensors)

    @staticmethod
    def _as_tensors(encoding, is_batch, kind):
        lengths = {len(row) for row in encoding["input_ids"]} if is_batch else set()
        if len(lengths) > 1:
            raise ValueError("cannot make one tensor from sequences of different lengths "
                             f"({sorted(lengths)}); pass padding=True (and truncation=True if needed)")
        if kind == "pt":
            import torch  # only needed for return_tensors="pt"
            make = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
        else:
            import numpy
            make = lambda rows: numpy.array(rows, dtype=numpy.int64)  # noqa: E731
        return BatchEncoding({key: make(value if is_batch else [value])
                              for key, value in encoding.items()})

    def encode(self, text, text_pair=None, add_special_tokens=True, padding=False, truncation=None, max_length=None,
               return_tensors=None, **kwargs):
        """Ids of one string (or pair; a [1, length] tensor with return_tensors="pt")."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one string, got {type(text).__name__}; call the tokenizer for batches")
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, return_tensors=return_tensors, **kwargs)["input_ids"]

    def encode_plus(self, text, text_pair=None, **kwargs):
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
        """A list of strings, or of (text, pair) tuples."""
        items = list(batch_text_or_text_pairs)
        if items and all(isinstance(item, (list, tuple)) and len(item) == 2 for item in items):
            return self([a for a, _ in items], [b for _, b in items], **kwargs)
        return self(items, **kwargs)

    def pad(self, encoded_inputs, padding=True, max_length=None, pad_to_multiple_of=None, padding_side=None,
            return_attention_mask=None, return_tensors=None):
        """Pad encodings (a dict of rows, or a list of per-example dicts, as data collators pass
        them): input_ids with pad, attention_mask with 0 (made if missing), special_tokens_mask with 1."""
        padding_side = self._padding_side(padding_side, return_tensors)
        if isinstance(encoded_inputs, (list, tuple)):
            if not encoded_inputs or not all(isinstance(e, dict) for e in encoded_inputs):
                raise ValueError("pad takes a dict of rows or a non-empty list of dicts with input_ids")
            encoded_inputs = {key: [e[key] for e in encoded_inputs] for key in encoded_inputs[0]}
        if "input_ids" not in encoded_inputs:
            raise ValueError(f"pad needs input_ids, got keys {list(encoded_inputs)}")
        rows = {key: _to_python_ids(value) for key, value in encoded_inputs.items()}
        rows = {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in rows.items()}
        is_batch = bool(rows["input_ids"]) and isinstance(rows["input_ids"][0], (list, tuple))
        if not is_batch:
            rows = {key: [value] for key, value in rows.items()}
        if return_attention_mask is not False and "attention_mask" not in rows:
            rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
        pad_mode, _, max_length = self._resolve_lengths(padding, None, max_length)
        self._pad_rows(rows, pad_mode, max_length, pad_to_multiple_of, padding_side)
        return self._encoding(rows, is_batch, return_tensors)

    # --- decoding ------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens):
        """T5Tokenizer.convert_tokens_to_string: sentencepiece decodes the runs between special tokens."""
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens = [tokens[0][1:], *tokens[1:]]
        text, run, previous_was_special = "", [], False
        for token in tokens:
            if token in self._all_special_set:
                if not previous_was_special:
                    text += " "
                text += (self._sp.decode_pieces(run) if run else "") + token  # runs of <pad> are common
                previous_was_special, run = True, []
            else:
                run.append(token)
                previous_was_special = False
        return (text + self._sp.decode_pieces(run)).strip()

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
               spaces_between_special_tokens=True):
        """Ids back to text, exactly as T5Tokenizer.decode does (sentinels become separate words)."""
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        if isinstance(tokens, str):
            tokens = [tokens]
        parts, run = [], []
        for token in tokens:
            if skip_special_tokens and token in self._all_special_set:
                continue
            if token in self._standalone_tokens:
                if run:
                    text = self.convert_tokens_to_string(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """transformers' clean-up of spaces before punctuation and English contractions."""
        for old, new in _CLEANUP_REPLACEMENTS:
            text = text.replace(old, new)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None, **decode_options):
        return [self.decode(ids, skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **decode_options)
                for ids in _to_python_ids(sequences)]

    def __repr__(self):
        return (f"UMT5Tokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size}, "
                f"len={len(self)}, legacy={self.legacy})")
