"""UMT5Config: reads, validates and writes transformers' ``config.json`` for UMT5 checkpoints."""
import copy
import json
import os
from pathlib import Path

import torch

from umt5_fast.ops.eager import ACTIVATIONS

CONFIG_NAME = "config.json"

# Field -> default, as transformers' UMT5Config (4.x) and PretrainedConfig define them.
_DEFAULTS = {
    "vocab_size": 250112,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 8,
    "num_decoder_layers": None,
    "num_heads": 6,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "use_cache": True,
    "tie_word_embeddings": True,
    "scale_decoder_outputs": None,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "bos_token_id": None,
    "classifier_dropout": 0.0,
    "num_labels": None,
    "id2label": None,
    "label2id": None,
    "problem_type": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "use_return_dict": True,
    "architectures": None,
    "torch_dtype": None,
}

_POSITIVE_INTS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                  "num_decoder_layers", "relative_attention_num_buckets",
                  "relative_attention_max_distance")
# transformers' PretrainedConfig attributes that no field here models, with its defaults: read as
# these until set (a set one, as every unknown key of a config.json, is kept in ``extra`` and saved).
_PRETRAINED_CONFIG_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "task_specific_params": None, "sep_token_id": None, "tie_encoder_decoder": False, "pruned_heads": {},
    "chunk_size_feed_forward": 0, "finetuning_task": None, "tokenizer_class": None, "prefix": None,
    "add_cross_attention": False, "cross_attention_hidden_size": None, "torchscript": False,
    "tf_legacy_loss": False, "use_bfloat16": False,
}
# Attributes of the config object itself besides the fields
_OWN_ATTRIBUTES = ("dense_act_fn", "is_gated_act", "name_or_path", "extra")
# Keys transformers writes that are derived here (and so not kept as separate facts).
_DERIVED = ("model_type", "transformers_version")
# Fields that must be JSON booleans: a string such as "false" would read as true.
_BOOLS = ("is_encoder_decoder", "use_cache", "tie_word_embeddings", "scale_decoder_outputs",
          "output_hidden_states", "output_attentions", "use_return_dict", "is_gated_act")


def dtype_name(dtype: torch.dtype) -> str:
    """How config.json writes a dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ValueError naming ``what`` and the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


class UMT5Config:
    """Hyper-parameters of a UMT5 model, with transformers' field names and defaults.

    Unknown keys of a ``config.json`` are kept and written back, so a round trip loses nothing.
    ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers`` and ``head_dim`` are aliases.
    """
    model_type = "umt5"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                     "num_hidden_layers": "num_layers", "head_dim": "d_kv", "return_dict": "use_return_dict",
                     "dtype": "torch_dtype", "_name_or_path": "name_or_path"}
    is_decoder = False  # (the whole model is an encoder-decoder; transformers' flag for decoder-only use)

    def __init__(self, **kwargs):
        for alias, field in self.attribute_map.items():
            if alias in kwargs:
                kwargs.setdefault(field, kwargs.pop(alias))
        for key, default in _DEFAULTS.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        for key in _DERIVED:
            kwargs.pop(key, None)
        # transformers derives the FFN activation from feed_forward_proj, and a config.json's own
        # dense_act_fn / is_gated_act override that (PretrainedConfig sets leftover keys last)
        act, gated = self._activation_of(self.feed_forward_proj)
        self.dense_act_fn = kwargs.pop("dense_act_fn", act)
        self.is_gated_act = kwargs.pop("is_gated_act", gated)
        self.name_or_path = str(kwargs.pop("_name_or_path", kwargs.pop("name_or_path", "")))
        self.extra = kwargs  # everything else, preserved for save_pretrained
        if isinstance(self.torch_dtype, str):  # as transformers: a torch.dtype once read
            dtype = getattr(torch, self.torch_dtype.removeprefix("torch."), None)
            self.torch_dtype = dtype if isinstance(dtype, torch.dtype) else self.torch_dtype
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            # transformers 4.x rescales the decoder output by d_model**-0.5 exactly when the LM head
            # is tied; transformers 5 writes the flag explicitly.
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        self._set_labels()
        self.validate()

    @classmethod
    def is_field(cls, name: str) -> bool:
        """Whether ``name`` is a field (or an alias of one), or an attribute of transformers' configs,
        that ``from_pretrained`` may set."""
        return (name in _DEFAULTS or name in cls.attribute_map or name in ("dense_act_fn", "is_gated_act")
                or name in _PRETRAINED_CONFIG_DEFAULTS)

    def _set_labels(self):
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if self.num_labels is None:
                self.num_labels = len(self.id2label)
        if self.num_labels is None:
            self.num_labels = 2
        if self.id2label is None or len(self.id2label) != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != self.num_labels:
            self.label2id = {v: k for k, v in self.id2label.items()}

    @staticmethod
    def _activation_of(feed_forward_proj):
        """(dense_act_fn, is_gated_act) that ``feed_forward_proj`` names (None, None if it is not a string)."""
        if not isinstance(feed_forward_proj, str):
            return None, None
        if feed_forward_proj == "gated-gelu":
            return "gelu_new", True  # T5 v1.1 checkpoints mean the tanh approximation
        parts = feed_forward_proj.split("-")
        return parts[-1], parts[0] == "gated"

    def __getattr__(self, name):
        alias = type(self).attribute_map.get(name)
        if alias is not None:
            return getattr(self, alias)
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        if name in _PRETRAINED_CONFIG_DEFAULTS:
            return copy.deepcopy(_PRETRAINED_CONFIG_DEFAULTS[name])
        raise AttributeError(f"UMT5Config has no attribute {name!r}")

    def __setattr__(self, name, value):
        name = type(self).attribute_map.get(name, name)
        if name in _DEFAULTS or name in _OWN_ATTRIBUTES or hasattr(type(self), name) or name.startswith("_"):
            super().__setattr__(name, value)  # (private names: tools' bookkeeping, not saved)
        else:  # any other attribute, as transformers' config keeps it: saved with the config
            self.extra[name] = value

    def validate(self):
        """Raise ValueError naming the first bad field."""
        for field in _POSITIVE_INTS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UMT5Config.{field} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            # the encoder's buckets split per direction, then into exact and log-scale halves: fewer
            # than 4 leave no exact bucket, and the log formula divides by zero (in transformers too)
            raise ValueError("UMT5Config.relative_attention_num_buckets must be >= 4 (half of them per "
                             "direction in the encoder, each half split into exact and log-scale buckets), "
                             f"got {self.relative_attention_num_buckets}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"UMT5Config.layer_norm_epsilon must be a positive number, got "
                             f"{self.layer_norm_epsilon!r}")
        if not isinstance(self.feed_forward_proj, str):
            raise ValueError(f"UMT5Config.feed_forward_proj must be a string, got {self.feed_forward_proj!r}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"UMT5Config.feed_forward_proj={self.feed_forward_proj!r} is not valid: use "
                             "'gated-{ACT}' or '{ACT}', e.g. 'gated-gelu' or 'relu'")
        for field in _BOOLS:
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"UMT5Config.{field} must be true or false, got {getattr(self, field)!r}")
        if not isinstance(self.dense_act_fn, str) or self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"UMT5Config.dense_act_fn={self.dense_act_fn!r} (feed_forward_proj="
                             f"{self.feed_forward_proj!r}) is not supported (supported: {sorted(ACTIVATIONS)})")
        if not isinstance(self.dropout_rate, (int, float)) or isinstance(self.dropout_rate, bool) \
                or not 0 <= self.dropout_rate <= 1:
            raise ValueError(f"UMT5Config.dropout_rate must be a number in [0, 1], got {self.dropout_rate!r}")
        for field in ("pad_token_id", "decoder_start_token_id", "bos_token_id"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ValueError(f"UMT5Config.{field} must be an id in [0, vocab_size={self.vocab_size}), "
                                 f"got {value!r}")
        for eos in self.eos_token_ids:
            if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
                raise ValueError(f"UMT5Config.eos_token_id must be ids in [0, vocab_size={self.vocab_size}), "
                                 f"got {self.eos_token_id!r}")
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"UMT5Config.num_labels must be a positive integer, got {self.num_labels!r}")
        if self.classifier_dropout is not None and not 0 <= float(self.classifier_dropout) <= 1:
            raise ValueError(f"UMT5Config.classifier_dropout must be in [0, 1], got {self.classifier_dropout!r}")
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ValueError(f"UMT5Config.problem_type={self.problem_type!r} is not one of 'regression', "
                             "'single_label_classification', 'multi_label_classification'")

    @property
    def eos_token_ids(self) -> list:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {key: copy.deepcopy(getattr(self, key)) for key in _DEFAULTS}
        if isinstance(self.torch_dtype, torch.dtype):
            out["torch_dtype"] = dtype_name(self.torch_dtype)
        out["return_dict"] = out.pop("use_return_dict")
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out.update(copy.deepcopy(self.extra))
        out.update(model_type=self.model_type, dense_act_fn=self.dense_act_fn,
                   is_gated_act=self.is_gated_act)
        return out

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "UMT5Config":
        data = dict(data, **overrides)
        model_type = data.get("model_type", "umt5")
        if model_type not in ("umt5", "t5", "mt5"):
            raise ValueError(f"config model_type={model_type!r} is not a UMT5 (or T5/mT5-shaped) model")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path) -> "UMT5Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_dict(read_json_object(path, "config file"))

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "UMT5Config":
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        config = cls.from_json_file(file)
        return config.updated(**overrides) if overrides else config

    def updated(self, **overrides) -> "UMT5Config":
        """A copy with ``overrides`` (field names or aliases) applied and validated."""
        data = self.to_dict()
        if "feed_forward_proj" in overrides:  # the activation follows the new value unless also given
            for derived in ("dense_act_fn", "is_gated_act"):
                data.pop(derived)
        return type(self).from_dict(dict(data, **overrides))

    def to_diff_dict(self) -> dict:
        """to_dict() without the values a default UMT5Config has (model_type kept), as transformers'."""
        defaults = type(self)().to_dict()
        return {key: value for key, value in self.to_dict().items()
                if key == "model_type" or key not in defaults or defaults[key] != value}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory):
        text = self.to_json_string()  # a bad value fails before the file opens
        os.makedirs(directory, exist_ok=True)
        (Path(directory) / CONFIG_NAME).write_text(text, encoding="utf-8")

    def __repr__(self):
        return f"UMT5Config {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"

    def __eq__(self, other):
        return isinstance(other, UMT5Config) and self.to_dict() == other.to_dict()
