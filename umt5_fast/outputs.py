"""Output containers with transformers' field names and access rules.

Like transformers' ``ModelOutput``: attribute access, key access (``out["logits"]``), and tuple
access (``out[0]``, unpacking) over the fields that are not None, in declaration order.
"""
from dataclasses import dataclass, fields
from typing import Any, Optional, Tuple

import torch


class ModelOutput:
    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default


Tensor = Optional[torch.Tensor]
Tensors = Optional[Tuple[torch.Tensor, ...]]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor = None
    hidden_states: Tensors = None
    attentions: Tensors = None


def as_encoder_output(encoder_outputs) -> BaseModelOutput:
    """User-given encoder outputs (an output object, a tuple, or the last hidden state) as ours."""
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, torch.Tensor):
        encoder_outputs = (encoder_outputs,)
    if hasattr(encoder_outputs, "to_tuple"):
        encoder_outputs = encoder_outputs.to_tuple()
    if not isinstance(encoder_outputs, (tuple, list)) or not encoder_outputs:
        raise TypeError("encoder_outputs must be an encoder output, a tuple (last_hidden_state, ...) or a "
                        f"[batch, length, d_model] tensor, got {type(encoder_outputs).__name__}")
    return BaseModelOutput(last_hidden_state=encoder_outputs[0],
                           hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                           attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None)


@dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: Tensor = None
    past_key_values: Any = None
    hidden_states: Tensors = None
    attentions: Tensors = None
    cross_attentions: Tensors = None


@dataclass
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: Tensor = None
    past_key_values: Any = None
    decoder_hidden_states: Tensors = None
    decoder_attentions: Tensors = None
    cross_attentions: Tensors = None
    encoder_last_hidden_state: Tensor = None
    encoder_hidden_states: Tensors = None
    encoder_attentions: Tensors = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    past_key_values: Any = None
    decoder_hidden_states: Tensors = None
    decoder_attentions: Tensors = None
    cross_attentions: Tensors = None
    encoder_last_hidden_state: Tensor = None
    encoder_hidden_states: Tensors = None
    encoder_attentions: Tensors = None


@dataclass
class Seq2SeqSequenceClassifierOutput(Seq2SeqLMOutput):
    pass


@dataclass
class Seq2SeqQuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor = None
    start_logits: Tensor = None
    end_logits: Tensor = None
    past_key_values: Any = None
    decoder_hidden_states: Tensors = None
    decoder_attentions: Tensors = None
    cross_attentions: Tensors = None
    encoder_last_hidden_state: Tensor = None
    encoder_hidden_states: Tensors = None
    encoder_attentions: Tensors = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    hidden_states: Tensors = None
    attentions: Tensors = None
