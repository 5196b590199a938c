"""Output containers with transformers' field names and access rules.

Like transformers' ``ModelOutput``: a dataclass that is also an ordered dict of the fields that are
not None, in declaration order: attribute access, key access (``out["logits"]``), tuple access
(``out[0]``, unpacking), ``isinstance(out, dict)``. As there, a field that was None at
construction stays out of the keys when it is set later, and keys cannot be removed.
"""
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Optional, Tuple

import torch


class ModelOutput(OrderedDict):
    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} cannot drop or merge keys (as transformers' ModelOutput)")

    __delitem__ = setdefault = pop = popitem = update = _refuse

    def __reduce__(self):  # pickling / deepcopy rebuild the dataclass from its fields
        if not is_dataclass(self):
            return super().__reduce__()
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


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
    if hasattr(encoder_outputs, "last_hidden_state"):  # transformers' output (its tuple drops None fields)
        return BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state,
                               hidden_states=getattr(encoder_outputs, "hidden_states", None),
                               attentions=getattr(encoder_outputs, "attentions", None))
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
