"""generate(): greedy, sampled and beam decoding with a static KV cache.

The encoder runs once; every decoder layer's cross-attention K/V are projected once into the cache;
then each step feeds one token per row through ``DecoderStack.run`` (self-attention reads the
preallocated cache; the bias is computed for the step's query position only) and the LM head of
that position alone. Results are token-for-token those of transformers' ``generate`` (fp32): the
logits processors and the beam bookkeeping below follow its definitions.
"""
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from umt5_fast import buckets, decode_step, lm_head_screen, validation
from umt5_fast.processors import (NO_HYPOTHESIS, Processors, StopCriteria, check_processor_options, eos_forbidden,
                                   is_finite_number, is_token_id, narrow_width)
from umt5_fast.cache import DynamicCache, StaticCache
from umt5_fast.outputs import ModelOutput, as_encoder_output

# transformers' GenerationConfig defaults for the options we support.
DEFAULTS = dict(max_length=20, max_new_tokens=None, min_length=0, min_new_tokens=None, do_sample=False,
                num_beams=1, num_return_sequences=1, temperature=1.0, top_k=50, top_p=1.0,
                repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, early_stopping=False,
                eos_token_id=None, pad_token_id=None, decoder_start_token_id=None, output_scores=False,
                output_logits=None, output_attentions=False, output_hidden_states=False,
                return_dict_in_generate=False, sequence_bias=None, encoder_repetition_penalty=1.0,
                encoder_no_repeat_ngram_size=0, bad_words_ids=None, forced_bos_token_id=None,
                forced_eos_token_id=None, remove_invalid_values=False, exponential_decay_length_penalty=None,
                suppress_tokens=None, begin_suppress_tokens=None, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                eta_cutoff=0.0, renormalize_logits=False, max_time=None,
                stop_strings=None, bos_token_id=None, use_cache=True)
# transformers' default max_length: when it is neither passed to generate nor changed in a config,
# it means 20 new tokens (not 20 in all).
_DEFAULT_MAX_LENGTH = DEFAULTS["max_length"]
# Keys of a generation_config.json that do not change decoding here: bookkeeping, cache choices (the
# static cache is always used; results are the same; use_cache only decides whether the dict returns
# it), and assisted decoding's settings, which only act with an assistant model (generate takes none).
_IGNORED = {"_from_model_config", "transformers_version", "cache_implementation",
            "cache_config", "return_legacy_cache", "prefill_chunk_size", "disable_compile", "compile_config",
            "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
            "max_matching_ngram_size"}
# Options we do not implement, with transformers' value that leaves them off: any other value is
# refused.
_UNSUPPORTED_OFF = dict(forced_decoder_ids=None, force_words_ids=None, num_beam_groups=1, diversity_penalty=0.0,
                        penalty_alpha=None, constraints=None, guidance_scale=None, low_memory=None, dola_layers=None,
                        watermarking_config=None, prompt_lookup_num_tokens=None, token_healing=False)


# Options that None turns off in transformers (passed to generate or set in a generation config:
# its processors skip a None), with the value that does the same here (length_penalty: transformers'
# beam search fails on None, its other modes ignore it; here it means no penalty).
_OFF_WHEN_NONE = dict(top_k=0, top_p=1.0, typical_p=1.0, temperature=1.0, min_length=0, repetition_penalty=1.0,
                      encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0, length_penalty=1.0, renormalize_logits=False,
                      remove_invalid_values=False, output_scores=False, output_attentions=False,
                      output_hidden_states=False, return_dict_in_generate=False)
# Arguments of transformers' generate for features we do not implement, with the values that leave
# them off (accepted; any other value is refused).
_ARGUMENTS_OFF = dict(synced_gpus=(None, False), assistant_model=(None,), assistant_tokenizer=(None,),
                      negative_prompt_ids=(None,), negative_prompt_attention_mask=(None,), custom_generate=(None,))

_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")


def _generation_options(settings) -> dict:
    return {key: value for key, value in settings.items() if key in DEFAULTS or key in _UNSUPPORTED_OFF}


def settings_from_model_config(config) -> "GenerationSettings":
    """What transformers' ``GenerationConfig.from_model_config`` derives for a checkpoint without a
    generation_config.json: the config's token ids, and the generation options its config.json sets
    (saves from before generation configs kept num_beams, max_length, no_repeat_ngram_size... there;
    an option we do not implement is refused when generate reads it)."""
    settings = {key: value for key, value in _generation_options(config.extra).items() if value is not None}
    settings.update(decoder_start_token_id=config.decoder_start_token_id, pad_token_id=config.pad_token_id,
                    eos_token_id=config.eos_token_id)
    if config.bos_token_id is not None:  # (transformers writes it only when set)
        settings["bos_token_id"] = config.bos_token_id
    if not config.use_cache:  # (transformers writes it only when off)
        settings["use_cache"] = False
    for flag in ("output_attentions", "output_hidden_states"):  # config fields of ours (forward's defaults)
        if getattr(config, flag, False):
            settings[flag] = True
    if not settings.get("return_dict_in_generate") and any(settings.get(flag) for flag in _OUTPUT_FLAGS):
        settings["return_dict_in_generate"] = True  # as transformers: an output flag asks for the dict
    return GenerationSettings(settings).as_derived_from_config()


def settings_dict(generation_config) -> dict:
    """A generation config as a dict of its settings: a dict, or a transformers GenerationConfig
    (only what differs from its defaults)."""
    if generation_config is None:
        return {}
    return dict(generation_config) if isinstance(generation_config, dict) else generation_config.to_diff_dict()


@dataclass
class GenerateOutput(ModelOutput):
    """``return_dict_in_generate=True``: transformers' fields in its order (index, key and tuple
    access over those that are set): sequences, beam scores, per-step processed scores, per-step raw
    logits, for beam search each generated token's beam (``batch * num_beams`` numbering, -1
    after a sequence ended), which ``compute_transition_scores`` reads; with output_attentions /
    output_hidden_states the encoder's, and per step and layer the decoder's self- and
    cross-attention probabilities ``[rows, heads, step queries, keys]`` and hidden states (for beam
    search, of the step's running beams, as transformers returns them); for greedy / sampled
    decoding (unless ``use_cache=False``) the decoder's cache at the end, every position but the last
    token's, which forward takes to go on."""
    sequences: torch.Tensor = None
    sequences_scores: Optional[torch.Tensor] = None
    scores: Optional[Tuple[torch.Tensor, ...]] = None
    logits: Optional[Tuple[torch.Tensor, ...]] = None
    beam_indices: Optional[torch.Tensor] = None
    encoder_attentions: Optional[Tuple[torch.Tensor, ...]] = None
    encoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    decoder_attentions: Optional[Tuple[Tuple[torch.Tensor, ...], ...]] = None
    cross_attentions: Optional[Tuple[Tuple[torch.Tensor, ...], ...]] = None
    decoder_hidden_states: Optional[Tuple[Tuple[torch.Tensor, ...], ...]] = None
    past_key_values: Optional[DynamicCache] = None


@dataclass
class StepRecord:
    """What ``return_dict_in_generate`` keeps of each step: processed scores and / or raw logits,
    and (beam search) the decoder's per-layer attentions / hidden states (None: not asked for)."""
    scores: Optional[list] = None
    logits: Optional[list] = None
    decoder_attentions: Optional[list] = None
    cross_attentions: Optional[list] = None
    decoder_hidden_states: Optional[list] = None

    def add(self, scores, logits):
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(logits)

    @property
    def wants_decoder_outputs(self) -> bool:
        return self.decoder_attentions is not None or self.decoder_hidden_states is not None

    def add_decoder_outputs(self, out):
        """A step's decoder output (``Decoder.step_with_outputs``)."""
        if self.decoder_attentions is not None:
            self.decoder_attentions.append(out.attentions)
            self.cross_attentions.append(out.cross_attentions)
        if self.decoder_hidden_states is not None:
            self.decoder_hidden_states.append(out.hidden_states)

    def steps(self, name: str) -> Optional[Tuple[torch.Tensor, ...]]:
        kept = getattr(self, name)
        return None if kept is None else tuple(kept)


class GenerationSettings(dict):
    """``model.generation_config``: the checkpoint's generation_config.json as a dict whose keys
    are also attributes (``model.generation_config.max_new_tokens = 3``, as transformers allows);
    unset options read as generate's defaults."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
        raise AttributeError(f"generation config has no option {name!r}")

    def __setattr__(self, name, value):
        self[name] = value

    def to_diff_dict(self) -> dict:
        return dict(self)

    def as_derived_from_config(self) -> "GenerationSettings":
        """Marked as derived from the model config (transformers' ``_from_model_config``): while
        unchanged, it follows generation options set on the model config later (resolve_options)."""
        object.__setattr__(self, "derived_from_config", dict(self))  # (an attribute, not an option)
        return self


def resolve_options(model, generation_config=None, **kwargs) -> dict:
    """Merge defaults < model config ids < generation_config.json < ``generation_config`` < kwargs.

    A generation config that asks for a feature this engine does not implement (a constraint,
    a different processor) is refused rather than silently ignored.
    """
    cfg = model.config
    options = dict(DEFAULTS, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                   decoder_start_token_id=cfg.decoder_start_token_id, bos_token_id=cfg.bos_token_id)
    model_settings = getattr(model, "generation_config", None)
    derived = getattr(model_settings, "derived_from_config", None)
    if derived is not None and dict(model_settings) == derived and any(
            key in DEFAULTS and value is not None for key, value in cfg.extra.items()):
        # transformers' legacy rule: a generation config derived from the model config, and not
        # changed since, follows generation options the model config holds (set on it afterwards),
        # and is replaced by the one derived now
        fresh = settings_from_model_config(cfg)
        if _generation_options(fresh) != _generation_options(model_settings):
            warnings.warn("generation options set on model.config steer generate (transformers' deprecated "
                          "rule); set them on model.generation_config instead", UserWarning, stacklevel=3)
            model.generation_config = model_settings = fresh
    layers = (("model.generation_config", settings_dict(model_settings)),
              ("generation_config", settings_dict(generation_config)), ("generate()", kwargs))
    for source, layer in layers:
        passed = source == "generate()"
        for key, value in layer.items():
            if key in DEFAULTS:
                if value is None and key in _OFF_WHEN_NONE:
                    options[key] = _OFF_WHEN_NONE[key]
                elif value is not None or passed:  # (None in a config: not set)
                    options[key] = value
            elif key in _UNSUPPORTED_OFF:
                if value != _UNSUPPORTED_OFF[key]:
                    raise ValueError(f"{source} sets {key}={value!r}, which umt5_fast's generate does not support")
            elif passed and key in _ARGUMENTS_OFF:
                if not any(value is off for off in _ARGUMENTS_OFF[key]):
                    raise ValueError(f"generate() got {key}={value!r}, which umt5_fast's generate does not support")
            elif passed and key not in _IGNORED:
                raise TypeError(f"generate() got an unexpected argument {key!r}")
            elif key not in _IGNORED and value not in (None, False, [], {}):
                raise ValueError(f"{source} sets {key}={value!r}, which umt5_fast's generate does not support")
    if (options["max_new_tokens"] is None and kwargs.get("max_length") is None
            and options["max_length"] == _DEFAULT_MAX_LENGTH):
        options["max_new_tokens"] = _DEFAULT_MAX_LENGTH
    return options


def check_options(o: dict, vocab_size: int):
    def positive_int(name, minimum=1, optional=False):
        value = o[name]
        if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                    or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    positive_int("max_new_tokens", optional=True)
    positive_int("max_length", optional=o["max_new_tokens"] is not None)  # (max_new_tokens decides then)
    positive_int("num_beams")
    positive_int("num_return_sequences")
    positive_int("top_k", 0)
    positive_int("no_repeat_ngram_size", 0)
    positive_int("min_length", 0)
    positive_int("min_new_tokens", 0, optional=True)
    if o["num_beams"] > 1 and o["num_return_sequences"] > o["num_beams"]:
        raise ValueError(f"num_return_sequences ({o['num_return_sequences']}) must be <= num_beams "
                         f"({o['num_beams']})")
    if o["num_beams"] == 1 and o["num_return_sequences"] > 1 and not o["do_sample"]:
        raise ValueError(f"greedy decoding returns one sequence per input: num_return_sequences "
                         f"({o['num_return_sequences']}) needs do_sample=True or num_beams >= it")
    for name in ("do_sample", "output_scores", "return_dict_in_generate", "output_logits", "output_attentions",
                 "output_hidden_states", "use_cache"):
        if not isinstance(o[name], bool) and not (o[name] is None and name in ("output_logits", "use_cache")):
            raise ValueError(f"{name} must be True or False, got {o[name]!r}")
    if not is_finite_number(o["length_penalty"]):
        raise ValueError(f"length_penalty must be a finite number, got {o['length_penalty']!r}")
    if o["do_sample"] and not (is_finite_number(o["temperature"]) and o["temperature"] > 0):
        raise ValueError(f"temperature must be a number > 0, got {o['temperature']!r}")
    if not (isinstance(o["top_p"], (int, float)) and 0 <= o["top_p"] <= 1):
        raise ValueError(f"top_p must be in [0, 1], got {o['top_p']!r}")
    if not (is_finite_number(o["repetition_penalty"]) and o["repetition_penalty"] > 0):
        raise ValueError(f"repetition_penalty must be a number > 0, got {o['repetition_penalty']!r}")
    if o["early_stopping"] not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {o['early_stopping']!r}")
    eos = token_id_list(o["eos_token_id"])
    if not all(is_token_id(e, vocab_size) for e in eos):
        raise ValueError(f"eos_token_id must be token ids in [0, {vocab_size}), got {o['eos_token_id']!r}")
    o["eos_token_id"] = eos
    if o["pad_token_id"] is None and eos:  # transformers pads with the first eos token then
        o["pad_token_id"] = eos[0]
    pad = o["pad_token_id"]
    if (pad is not None or eos) and not is_token_id(pad, vocab_size):
        # (no pad and no eos: no row ever ends, nothing is padded; transformers generates then too)
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab_size}), got {o['pad_token_id']!r}")
    if o["decoder_start_token_id"] is None:  # transformers then starts from bos
        o["decoder_start_token_id"] = o["bos_token_id"]
    start = o["decoder_start_token_id"]
    start_ids = token_id_list(start) if isinstance(start, torch.Tensor) else [start]
    if not all(is_token_id(i, vocab_size) for i in start_ids):
        raise ValueError(f"decoder_start_token_id (or, when it is None, bos_token_id) must be a token id in "
                         f"[0, {vocab_size}) (or a tensor of them, one per row), got {start!r}")
    check_processor_options(o, vocab_size)


def token_id_list(ids) -> list:
    """eos_token_id as given (None, an id, a list, or a tensor of ids) as a list of Python ints."""
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got a {ids.dtype} tensor")
        return ids.reshape(-1).tolist()
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


# ---------------------------------------------------------------------------------------------
# The decoding engine
# ---------------------------------------------------------------------------------------------
def decoder_pass(model, tokens, encoder_states, encoder_mask, cache, past_length, output_attentions=False,
                 output_hidden_states=False, self_mask=None):
    """One decoder pass over ``tokens`` ``[rows, L]`` at ``past_length`` (an int, or a device tensor
    when a CUDA graph replays it), through the Python layers; the decoder's output object.
    ``self_mask``: which of the ``past_length + L`` positions are keys (None: all)."""
    decoder = model.decoder
    h = F.embedding(tokens, decoder.embed_tokens.weight)
    return decoder.run(h, self_mask=self_mask, encoder_states=encoder_states, encoder_mask=encoder_mask, cache=cache,
                       past_length=past_length, output_attentions=output_attentions,
                       output_hidden_states=output_hidden_states)


def next_token_hidden(model, tokens, encoder_states, encoder_mask, cache, past_length, self_mask=None) -> torch.Tensor:
    """``decoder_pass``'s final hidden states ``[rows, d_model]`` of the last position."""
    return decoder_pass(model, tokens, encoder_states, encoder_mask, cache, past_length,
                        self_mask=self_mask).last_hidden_state[:, -1]


def next_token_logits(model, tokens, encoder_states, encoder_mask, cache, past_length) -> torch.Tensor:
    """``next_token_hidden``'s fp32 logits."""
    return model.logits(next_token_hidden(model, tokens, encoder_states, encoder_mask, cache, past_length)).float()


# Decoder positions a generation's cache holds at first: enough for most calls without regrowth,
# while max_new_tokens in the thousands allocates only what the sequences reach (doubling).
_INITIAL_CACHE_LENGTH = 256


class Decoder:
    """Encoder output + static cache for its rows; ``step`` returns next-token logits. ``prompt_mask``
    ``[rows, prompt length]`` (or None): the decoder prompt's padding, masked keys in every step."""

    def __init__(self, model, encoder_states, encoder_mask, max_length: int,
                 prompt_mask: Optional[torch.Tensor] = None):
        self.model = model
        self.encoder_states, self.encoder_mask = encoder_states, encoder_mask
        self.prompt_mask = prompt_mask
        cfg = model.config
        self.cache = StaticCache(cfg.num_decoder_layers, encoder_states.shape[0], cfg.num_heads, max_length,
                                 cfg.d_kv, model.shared.weight.dtype, encoder_states.device,
                                 initial_length=_INITIAL_CACHE_LENGTH)
        self.cpu_step = decode_step.build(model)  # None unless the cpu backend covers the model
        self._logits = None  # [rows, vocab] fp32 memory ``step`` reuses (see there)

    def step_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[rows, L]`` (the prompt, then one token a step); the final hidden states
        of the last position."""
        self.cache.reserve(self.cache.length + tokens.shape[1])
        if (self.cpu_step is not None and self.prompt_mask is None  # (the C++ step masks no self-attention key)
                and self.cpu_step.accepts(tokens, self.cache, self.encoder_states)):
            cfg = self.model.config  # (the Python path checks this in its attention layers)
            buckets.check_distance(self.cache.length + tokens.shape[1] - 1, cfg.relative_attention_num_buckets,
                                   cfg.relative_attention_max_distance, bidirectional=False)
            hidden = self.cpu_step.run(tokens, self.cache, self.encoder_mask)
        else:
            hidden = next_token_hidden(self.model, tokens, self.encoder_states, self.encoder_mask, self.cache,
                                       self.cache.length, self.step_keys(tokens.shape[1]))
        self.cache.length += tokens.shape[1]
        return hidden

    def step(self, tokens: torch.Tensor, reuse_memory: bool = False) -> torch.Tensor:
        """``step_hidden``'s fp32 logits. ``reuse_memory``: the caller keeps no reference to them past
        its step, so they may go into this decoder's memory of the previous step's (the cpu backend
        then skips the page faults of fresh [rows, vocab] memory)."""
        hidden = self.step_hidden(tokens)
        out = None
        if reuse_memory:
            rows, vocab = hidden.shape[0], self.model.config.vocab_size
            if self._logits is None or self._logits.shape[0] < rows or self._logits.device != hidden.device:
                self._logits = torch.empty(rows, vocab, device=hidden.device)
            out = self._logits[:rows]
        return self.model.logits(hidden, out=out).float()

    def step_with_outputs(self, tokens: torch.Tensor, output_attentions: bool, output_hidden_states: bool):
        """``step``, also returning the decoder's output with the fed positions' per-layer attention
        probabilities and / or hidden states (through the Python layers: the fused kernels form no
        probabilities)."""
        self.cache.reserve(self.cache.length + tokens.shape[1])
        out = decoder_pass(self.model, tokens, self.encoder_states, self.encoder_mask, self.cache, self.cache.length,
                           output_attentions, output_hidden_states, self.step_keys(tokens.shape[1]))
        self.cache.length += tokens.shape[1]
        return self.model.logits(out.last_hidden_state[:, -1]).float(), out

    def share_cross_attention(self, source_states: torch.Tensor, rows_per_source: int):
        """Fill the cache's cross-attention K/V from ``source_states`` (one row per source): each
        source's projections computed once and copied to its ``rows_per_source`` rows (beams,
        returned sequences), which would otherwise project the same encoder output each."""
        with torch.no_grad():
            for layer, block in enumerate(self.model.decoder.block):
                attention = block.layer[1].EncDecAttention
                self.cache.cross_kv[layer] = tuple(
                    attention.heads(projection(source_states)).contiguous().repeat_interleave(rows_per_source, dim=0)
                    for projection in (attention.k, attention.v))

    def step_keys(self, fed: int) -> Optional[torch.Tensor]:
        """The self-attention keys of a step feeding ``fed`` positions: the prompt's mask, then 1s."""
        if self.prompt_mask is None:
            return None
        rows, prompt_length = self.prompt_mask.shape
        keys = self.prompt_mask.new_ones(rows, self.cache.length + fed)
        keys[:, :prompt_length] = self.prompt_mask
        return keys

    def reorder(self, index: torch.Tensor):
        self.cache.reorder(index)
        if self.prompt_mask is not None:  # (the same rows as the cache's, whatever the index)
            self.prompt_mask = self.prompt_mask[index]

    def keep_rows(self, index: torch.Tensor):
        """Continue with rows ``index`` only (finished rows stop costing work)."""
        self.encoder_states = self.encoder_states[index]
        self.encoder_mask = None if self.encoder_mask is None else self.encoder_mask[index]
        self.prompt_mask = None if self.prompt_mask is None else self.prompt_mask[index]
        self.cache.keep_rows(index)

    def close(self):
        pass


def make_decoder(model, encoder_states, encoder_mask, rows_per_source: int, max_length: int,
                 use_cuda_graph: bool = False, prompt_mask: Optional[torch.Tensor] = None):
    """A ``Decoder`` for ``rows_per_source`` rows per source (beams, returned sequences), or with
    ``use_cuda_graph`` one whose single-token steps replay a CUDA graph."""
    source_states = encoder_states
    if rows_per_source > 1:
        encoder_states = encoder_states.repeat_interleave(rows_per_source, dim=0)
        encoder_mask = None if encoder_mask is None else encoder_mask.repeat_interleave(rows_per_source, dim=0)
        prompt_mask = None if prompt_mask is None else prompt_mask.repeat_interleave(rows_per_source, dim=0)
    if not use_cuda_graph:  # opt-in until the captured path has passed tests/test_cuda.py on a GPU
        decoder = Decoder(model, encoder_states, encoder_mask, max_length, prompt_mask)
        if rows_per_source > 1:
            decoder.share_cross_attention(source_states, rows_per_source)
        return decoder
    if not encoder_states.is_cuda:
        raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
    if prompt_mask is not None:
        raise ValueError("use_cuda_graph=True takes an unpadded decoder prompt (decoder_attention_mask all 1s)")
    cfg = model.config  # replayed steps get their position as a tensor: check the longest one now
    buckets.check_distance(max_length - 2, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                           bidirectional=False)
    from umt5_fast.cuda_graph import GraphedDecoder
    return GraphedDecoder(model, encoder_states, encoder_mask, max_length)


def decoder_start_column(start, batch: int, device) -> torch.Tensor:
    """The decoder's first ids ``[batch, 1]``: one id for every row, or (as transformers allows) a
    tensor of ``batch`` ids, one per row."""
    if not isinstance(start, torch.Tensor) or start.dim() == 0:
        return torch.full((batch, 1), int(start), dtype=torch.long, device=device)
    if start.numel() != batch or start.dim() not in (1, 2) or start.shape[0] != batch:
        raise ValueError(f"decoder_start_token_id as a tensor must hold one id per row, shape [{batch}] or "
                         f"[{batch}, 1], got shape {list(start.shape)}")
    return start.reshape(batch, 1).to(device=device, dtype=torch.long)


def prepare(model, input_ids, attention_mask, decoder_input_ids, options, inputs_embeds=None,
            encoder_outputs=None, decoder_attention_mask=None):
    """Validate inputs, run the encoder (unless ``encoder_outputs`` are given); return (encoder
    output, mask, decoder prompt, its mask, max_length). The source is ``input_ids`` or
    ``inputs_embeds``; the encoder returns its attentions / hidden states when the options ask generate
    for them. The prompt's mask is ``decoder_attention_mask`` (with a 1 for a start token generate
    prepends, as transformers does), or None when it pads nothing: the positions it masks are
    masked keys in every step."""
    cfg = model.config
    if encoder_outputs is not None:
        encoder_output = as_encoder_output(encoder_outputs)
        encoder_states = encoder_output.last_hidden_state
        if input_ids is not None:  # (transformers' encoder processors still read them)
            validation.check_ids("input_ids", input_ids, cfg.vocab_size, model.device, allow_none=False)
            validation.same_batch("input_ids", input_ids.shape[0], "encoder_outputs", encoder_states.shape[0])
        # Not required finite: a model's own encoder may give NaN (transformers lets it flow on).
        validation.check_embeds("encoder_outputs (last_hidden_state)", encoder_states, cfg.d_model, model.device,
                                model.shared.weight.dtype, require_finite=False)
        source_shape = encoder_states.shape[:2]
    elif inputs_embeds is not None:
        if input_ids is not None:
            raise ValueError("pass one of input_ids and inputs_embeds, not both")
        source_shape = inputs_embeds.shape[:2]
    else:
        validation.check_ids("input_ids", input_ids, cfg.vocab_size, model.device, allow_none=False)
        source_shape = input_ids.shape
        pad = options["pad_token_id"]
        if (attention_mask is None and pad is not None and bool((input_ids == pad).any())
                and pad not in options["eos_token_id"]):
            # transformers' rule: without a mask, ids holding the pad token (when it is not an eos
            # token) are padded there
            attention_mask = input_ids.ne(pad)
    mask = validation.check_mask("attention_mask", attention_mask, source_shape, model.device)
    batch = source_shape[0]
    start = decoder_start_column(options["decoder_start_token_id"], batch, model.device)
    prompt_mask = None
    if decoder_input_ids is None:
        if decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask masks a decoder prompt: pass decoder_input_ids with it")
        prompt = start
    else:
        validation.check_ids("decoder_input_ids", decoder_input_ids, cfg.vocab_size, model.device, allow_none=False)
        validation.same_batch("decoder_input_ids", decoder_input_ids.shape[0], "the encoder input", batch)
        prompt = decoder_input_ids.long()
        decoder_mask = validation.check_mask("decoder_attention_mask", decoder_attention_mask, prompt.shape,
                                             model.device)
        if decoder_mask is not None and not bool(decoder_mask.all()):
            prompt_mask = decoder_mask.bool()
        if bool((prompt[:, 0] != start[:, 0]).all()):
            # transformers prepends the start token unless some row's prompt begins with it (and
            # its mask a 1)
            prompt = torch.cat([start, prompt], dim=1)
            if prompt_mask is not None:
                prompt_mask = torch.cat([prompt_mask.new_ones(batch, 1), prompt_mask], dim=1)
    prompt_length = prompt.shape[1]
    if options["min_new_tokens"] is not None:  # transformers: min_new_tokens takes min_length's place
        options["min_length"] = prompt_length + options["min_new_tokens"]
    if options["max_new_tokens"] is not None:
        max_length = prompt_length + options["max_new_tokens"]
    else:
        max_length = options["max_length"]
        if max_length <= prompt_length:
            raise ValueError(f"max_length ({max_length}) leaves no room to generate after the decoder prompt "
                             f"({prompt_length} tokens); set max_new_tokens")
    if encoder_outputs is None:
        returned = options["return_dict_in_generate"]
        with torch.no_grad():
            encoder_output = model.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                                           output_attentions=returned and options["output_attentions"],
                                           output_hidden_states=returned and options["output_hidden_states"],
                                           return_dict=True)
    return encoder_output, mask, prompt, prompt_mask, max_length


# Steps the LM head screen may fail to decide before a generate call stops trying it.
_SCREEN_PATIENCE = 3


def sample_steps(model, encoder_states, encoder_mask, prompt, max_length, options, processors: Processors,
                 stops: StopCriteria, generator=None, record: Optional[StepRecord] = None,
                 use_cuda_graph=False, kept_cache: Optional[list] = None,
                 prompt_mask: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; yields the ``[rows]`` tokens of each step (pad once a row ended).

    Finished rows read pad tokens, exactly like transformers. In greedy decoding they also stop
    costing work: once a quarter of the computed rows have finished, the decoder drops them (the
    choice of the other rows does not depend on them). Sampling keeps every row so that its random
    draws, and ``output_scores``, stay those of transformers; so do the caller's processors and
    stopping criteria, which see every row as in transformers; and so does a call that keeps the
    cache: ``kept_cache`` (a list) receives the decoder's cache at the end, every row's K/V of the
    positions fed (all but the last token), as transformers' generate returns it. ``prompt_mask``
    ``[batch, prompt length]``: the decoder prompt's padding (``prepare``), or None.
    """
    expand = options["num_return_sequences"] if options["do_sample"] else 1
    rows = prompt.shape[0] * expand
    prompt_length = prompt.shape[1]
    pad = options["pad_token_id"] if options["pad_token_id"] is not None else 0  # (None: no row ends, unread)
    # grows as the cache does (see beam_search)
    sequences = torch.full((rows, min(max_length, prompt_length + _INITIAL_CACHE_LENGTH)), pad,
                           dtype=torch.long, device=prompt.device)
    sequences[:, :prompt_length] = prompt.repeat_interleave(expand, dim=0)
    decoder = make_decoder(model, encoder_states, encoder_mask, expand, max_length, use_cuda_graph, prompt_mask)
    eos = torch.tensor(options["eos_token_id"], dtype=torch.long, device=prompt.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=prompt.device)
    may_drop_rows = (not options["do_sample"] and record is None and isinstance(decoder, Decoder)
                     and not processors.custom and processors.prefix_allowed_tokens_fn is None and not stops.custom
                     and kept_cache is None)
    computed = torch.arange(rows, device=prompt.device)  # rows the decoder still runs
    tokens = sequences[:, :prompt_length]
    # Greedy steps whose only processor forbids eos need the argmax alone, top-k sampling the top_k
    # largest logits: the LM head screen finds them without computing every logit (None: not for
    # this model).
    screens_samples = (processors.samples_from_top_k
                       and rows * options["top_k"] <= lm_head_screen.TOP_CANDIDATES_MAX_IDS)
    screen = (lm_head_screen.screen_for(model) if (processors.bans_eos_only or screens_samples)
              and record is None and isinstance(decoder, Decoder) else None)
    undecided_steps = 0
    vocab = model.config.vocab_size
    with torch.no_grad(), contextlib.closing(decoder):
        try:
            for length in range(prompt_length, max_length):
                if length == sequences.shape[1]:
                    sequences = widened(sequences, min(max_length, 2 * length), pad)
                picked = None
                if screen is not None:
                    hidden = model.lm_head_input(decoder.step_hidden(tokens))
                    forbidden = options["eos_token_id"] if eos_forbidden(options, length) else None
                    if options["do_sample"]:  # the candidates for the top_k largest logits decide the draw
                        candidates = screen.top_candidates(hidden, options["top_k"], forbidden)
                        undecided = candidates is None
                        if candidates is not None:
                            ids, candidate_logits = candidates
                            picked = draw_from_candidates(ids, candidate_logits, vocab, processors, generator)
                            if picked is None:  # the same draw from full rows: -inf but at the candidates
                                logits = candidate_logits.new_full((len(hidden), vocab), -math.inf)
                                logits[:, ids] = candidate_logits
                    else:
                        picked = screen.argmax(hidden, forbidden)
                        undecided = picked is None
                    if undecided:
                        logits = model.lm_head(hidden).float()
                        undecided_steps += 1
                        if undecided_steps == _SCREEN_PATIENCE:  # e.g. a head with too many close rows
                            screen = None
                else:  # (logits only the caller's processors or the record could keep past the step)
                    logits = decoder.step(tokens, reuse_memory=record is None and not processors.custom)
                if picked is None:
                    # the processors may write into the logits they are given (forbid_eos): keep the raw ones
                    raw = logits.clone() if record is not None and record.logits is not None else logits
                    scores = processors(sequences[computed, :length], logits, computed)
                    if record is not None:
                        record.add(scores, raw)
                    if options["do_sample"]:
                        picked = multinomial_draw(scores.softmax(-1), generator).squeeze(1)
                    else:
                        picked = model.runtime.ops.argmax(scores)
                next_tokens = torch.full((rows,), pad, dtype=torch.long, device=prompt.device)
                next_tokens[computed] = torch.where(unfinished[computed], picked, pad) if len(eos) else picked
                sequences[:, length] = next_tokens
                yield next_tokens
                if len(eos):
                    unfinished &= ~torch.isin(next_tokens, eos)
                if stops:
                    unfinished &= ~stops(sequences[:, :length + 1], record.steps("scores") if record else None)
                if len(eos) or stops:
                    if not bool(unfinished.any()):
                        return
                    if may_drop_rows and 4 * int((~unfinished[computed]).sum()) >= len(computed):
                        keep = unfinished[computed].nonzero().squeeze(1)
                        decoder.keep_rows(keep)
                        computed = computed[keep]
                tokens = sequences[computed, length:length + 1]
        finally:  # (also when the rows end early, or the caller stops the iteration)
            if kept_cache is not None:
                kept_cache.append(decoder.cache.as_dynamic())


def widened(buffer: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``buffer`` ``[..., w]`` continued with ``fill`` to ``[..., width]``."""
    grown = buffer.new_full(buffer.shape[:-1] + (width,), fill)
    grown[..., :buffer.shape[-1]] = buffer
    return grown


# torch.multinomial(probs, 1) on the CPU draws q ~ Exp(1) for every entry and picks argmax(probs / q);
# each q is -log1p(-x) (in double, then fp32) of x = the low 53 bits of one 64-bit draw / 2^53.
_UNIFORM_BITS = (1 << 53) - 1
_TWISTER_CHECKED = {}  # whether csrc/mt19937.cpp reproduces this torch's generator (checked once)


def _twister_reproduces_torch() -> bool:
    """Whether the C++ Mersenne twister, run on get_state()'s bytes, draws what this torch draws and
    leaves the state torch leaves (its layout is torch's internal one: checked, not assumed)."""
    if "ok" not in _TWISTER_CHECKED:
        try:
            from umt5_fast.ops.cpu import _C
            generator = torch.Generator().manual_seed(20261207)
            torch.empty(3, dtype=torch.long).random_(generator=generator)  # mid-block
            state, entries = generator.get_state(), 1000  # (crosses a regeneration of the words)
            positions, low = torch.arange(0, entries, 3), torch.empty((entries + 2) // 3, dtype=torch.long)
            _C.mt19937_low53_draws(state=state.data_ptr(), entries=entries, positions=positions.data_ptr(),
                                   count=len(positions), out=low.data_ptr())
            draws = torch.empty(entries, dtype=torch.long).random_(generator=generator) & _UNIFORM_BITS
            _TWISTER_CHECKED["ok"] = bool(torch.equal(low, draws[positions])
                                          and torch.equal(state, generator.get_state()))
        except (ImportError, AttributeError, ValueError, RuntimeError):
            _TWISTER_CHECKED["ok"] = False
    return _TWISTER_CHECKED["ok"]


def _low_53_bits(source: torch.Generator, entries: int, flat: torch.Tensor):
    """The low 53 bits of ``source``'s next ``entries`` 64-bit draws at the ascending positions
    ``flat``, whether any of the ``entries`` draws had them all 0, and the generator state after the
    draws; ``source`` itself is left as it was."""
    before = source.get_state()
    if _twister_reproduces_torch():  # C++, on a copy of the state: only the wanted draws are stored
        from umt5_fast.ops.cpu import _C
        after, low = before.clone(), torch.empty(len(flat), dtype=torch.long)
        drew_zero = _C.mt19937_low53_draws(state=after.data_ptr(), entries=entries, positions=flat.data_ptr(),
                                           count=len(flat), out=low.data_ptr())
        return low, drew_zero, after
    bits = torch.empty(entries, dtype=torch.long).random_(generator=source).bitwise_and_(_UNIFORM_BITS)
    after = source.get_state()
    source.set_state(before)
    return bits[flat], bool((bits == 0).any()), after


def multinomial_draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)`` of ``[rows, n]`` fp32 CPU probabilities:
    the same ids, leaving the generator in the same state. torch fills a ``[rows, n]`` tensor of
    exponential draws one entry at a time (a 64-bit draw and a log1p in double each: 100 ms for 16 x
    256384 entries, most of a sampled step). Here the same 64-bit draws come from a C++ copy of its
    generator (csrc/mt19937.cpp; 5 ms; else from ``random_``, 30 ms) and only the entries of nonzero
    probability take the log, when top-k / top-p leave few (else torch draws). Where torch's rule
    matters beyond that (a draw of exactly 0, ratios that underflow, invalid probabilities), torch
    draws from the untouched generator."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or not probs.is_contiguous():
        return torch.multinomial(probs, 1, generator=generator)
    low, high = torch.aminmax(probs)
    if not (bool(high < math.inf) and bool(low >= 0) and bool((probs.sum(1) > 0).all())):
        return torch.multinomial(probs, 1, generator=generator)  # (its errors, before any draw)
    if int(torch.count_nonzero(probs)) > probs.numel() // 16:  # (most entries take the log: torch's loop is as fast)
        return torch.multinomial(probs, 1, generator=generator)
    rows, cols = probs.nonzero(as_tuple=True)
    return _draw_among(rows, cols, probs[rows, cols], probs.shape, generator, lambda: probs)


def _draw_among(rows, cols, values, shape, generator, full_probs):
    """``torch.multinomial(full_probs(), 1, generator=generator)`` of ``shape`` valid probabilities,
    given their nonzero ``values`` at ``(rows, cols)`` in ascending row-major order (see
    multinomial_draw); ``full_probs`` is called only where torch draws."""
    source = torch.default_generator if generator is None else generator
    bits, drew_zero, state_after = _low_53_bits(source, shape[0] * shape[1], rows * shape[1] + cols)
    x = bits.double() * 2.0 ** -53
    ratio = values / (-1.0 * torch.log1p(-x)).float()
    best = torch.zeros(shape[0]).scatter_reduce_(0, rows, ratio, "amax", include_self=True)
    if drew_zero or not bool((best > 0).all() & torch.isfinite(best).all()):
        return torch.multinomial(full_probs(), 1, generator=generator)
    source.set_state(state_after)
    first = ratio == best[rows]  # torch.argmax: the first of equal maxima
    picked = torch.full((shape[0],), shape[1], dtype=torch.long)
    return picked.scatter_reduce_(0, rows[first], cols[first], "amin", include_self=True)[:, None]


# torch's CPU softmax sums a row in vector lanes: lane j adds the values at the positions j (mod the
# lane count) in their order, then the lanes are combined. A shorter row that keeps each value in its
# lane and in its order there (-inf elsewhere, whose exp adds exact zeros) has the same sum, the same
# maximum and so the same probabilities.
_SOFTMAX_LANES = {}


def softmax_lanes() -> Optional[int]:
    """The lane count of torch's CPU softmax sums (found by trial once, not assumed: the first of 8,
    16, 4, 32, 64 whose lane layouts give the full rows' probabilities in 64 trials that tell them
    apart), or None when none does."""
    if "lanes" not in _SOFTMAX_LANES:
        g = torch.Generator().manual_seed(20261207)
        trials = []
        for trial in range(64):
            length = 4099 + trial  # (every tail length)
            ids = torch.randperm(length, generator=g)[:100 + 31 * trial].sort().values
            # e^0 among ~2^-24 values: whether the small ones are added before or after a 1 decides
            # their rounding, so another order of a lane's values changes the sum
            small = torch.rand(len(ids), generator=g) < 0.98
            row = torch.full((1, length), -math.inf)
            row[0, ids] = torch.where(small, -24 * math.log(2), 0.0)
            trials.append((ids, row[:, ids], row.softmax(-1)[:, ids]))
        _SOFTMAX_LANES["lanes"] = next(
            (lanes for lanes in (8, 16, 4, 32, 64)
             if all(torch.equal(lane_softmax(ids, scores, lanes), expected) for ids, scores, expected in trials)),
            None)
    return _SOFTMAX_LANES["lanes"]


def lane_softmax(ids: torch.Tensor, scores: torch.Tensor, lanes: int) -> torch.Tensor:
    """``softmax`` of rows that hold ``scores`` ``[rows, n]`` at the ascending ``ids`` and -inf
    elsewhere, at ``ids``: computed on rows that keep each id in its lane (mod ``lanes``) and in its
    order there, bit-equal where ``lanes`` is torch's (``softmax_lanes``)."""
    lane = ids % lanes
    counts = torch.bincount(lane, minlength=lanes)
    order = torch.argsort(lane, stable=True)  # by lane, ascending ids within each
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(len(ids)) - (torch.cumsum(counts, 0) - counts)[lane[order]]
    positions = rank * lanes + lane
    laid = torch.full((scores.shape[0], int(counts.max()) * lanes), -math.inf)
    laid[:, positions] = scores
    return laid.softmax(-1)[:, positions]


def draw_from_candidates(ids: torch.Tensor, logits: torch.Tensor, vocab: int, processors: Processors,
                         generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """A sampled step's ids from the scores that hold ``logits`` ``[rows, n]`` at the ascending
    ``ids`` and -inf at the rest of ``vocab`` (the LM head screen's top-k candidates, for processors
    that ``samples_from_top_k``): ``multinomial_draw(softmax(processors(scores)))``, the same ids and
    generator state, computed on rows of ~n scores instead of ``vocab``. None where only the full
    rows decide: top-p keeps some and drops others of equal scores (the full sort orders them), or
    softmax's lanes are unknown."""
    lanes = softmax_lanes()
    if lanes is None or vocab < lanes:  # (rows shorter than a vector sum otherwise)
        return None
    rows, n = logits.shape
    scores = torch.full((rows, narrow_width(n, vocab, processors.o["top_k"])), -math.inf)
    scores[:, :n] = logits
    for name, warp in processors.warpers:
        warped = warp(scores)
        # top-p drops a row's lowest scores; of equal scores on both sides of its cut, the full
        # row's sort orders which it drops
        if name == "top_p" and bool((scores.masked_fill(~torch.isinf(warped), -math.inf).amax(dim=1)
                                     == warped.masked_fill(torch.isinf(warped), math.inf).amin(dim=1)).any()):
            return None
        scores = warped
    probs = lane_softmax(ids, scores[:, :n], lanes)
    rows_kept, kept = probs.nonzero(as_tuple=True)
    return _draw_among(rows_kept, ids[kept], probs[rows_kept, kept], (rows, vocab), generator,
                       lambda: probs.new_zeros(rows, vocab).index_copy_(1, ids, probs)).squeeze(1)


def best_of_beams(values: torch.Tensor, indices: torch.Tensor, k: int, batch: int, vocab: int):
    """``torch.topk(scores, k)`` of ``[batch, num_beams * vocab]`` scores from each beam's best
    ``k + 1`` (``values`` / ``indices`` ``[batch * num_beams, k + 1]``, indices within the beam's
    vocabulary), or None unless the k best are distinct and the k-th beats the (k + 1)-th: the
    answer is then unique (whichever of equal values each beam's list kept at its end), while
    otherwise (tied scores, e.g. tokens banned to -inf) only torch.topk over all the scores gives
    its own choice among the ties."""
    merged, picked = values.view(batch, -1).topk(k + 1, dim=-1)
    if not bool((merged[:, :-1] > merged[:, 1:]).all()):
        return None
    per_beam = values.shape[1]
    merged_indices = (picked // per_beam) * vocab + indices.view(batch, -1).gather(1, picked)
    return merged[:, :k], merged_indices[:, :k]


def top_candidates(log_probs: torch.Tensor, k: int, num_beams: int, ops):
    """``torch.topk(log_probs, k)`` of ``[batch, num_beams * vocab]`` scores, exactly, through each
    beam's own k + 1 best first (``ops.top_k``, then ``best_of_beams``; torch.topk where that does
    not decide): torch.topk gives a whole row to one thread and runs slower on one long row than on
    several short ones (7.3 against 1.9 ms for 4 beams of umt5's vocabulary on 2 cores)."""
    batch, width = log_probs.shape
    vocab = width // num_beams
    if num_beams == 1 or k + 1 > vocab:
        return torch.topk(log_probs, k)
    per_beam_values, per_beam_indices = ops.top_k(log_probs.view(batch * num_beams, vocab), k + 1)
    best = best_of_beams(per_beam_values, per_beam_indices, k, batch, vocab)
    return torch.topk(log_probs, k) if best is None else best


def beam_search(model, encoder_states, encoder_mask, prompt, max_length, options, processors: Processors,
                stops: StopCriteria, generator=None, record: Optional[StepRecord] = None, use_cuda_graph=False,
                kept_cache: Optional[list] = None, prompt_mask: Optional[torch.Tensor] = None):
    """transformers' vectorised beam search (its ``_beam_search``), on our static cache.

    Returns ``(sequences [batch * num_return_sequences, T], sequence scores, beam indices
    [batch * num_return_sequences, T - prompt length])``. ``kept_cache`` (a list) receives the
    decoder's cache at the end as transformers returns it: the running beams' (``batch * num_beams``
    rows, in the order of the last step's reorder) K/V of every position fed. ``prompt_mask``: as in
    ``sample_steps``.
    """
    num_beams, o = options["num_beams"], options
    batch, prompt_length = prompt.shape
    vocab = model.config.vocab_size
    device = prompt.device
    eos = torch.tensor(o["eos_token_id"], dtype=torch.long, device=device)
    # (at most every candidate: with more eos ids than the vocabulary leaves, transformers' topk fails)
    beams_to_keep = min(max(2, 1 + len(eos)) * num_beams, num_beams * vocab)
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    length_penalty, early_stopping = o["length_penalty"], o["early_stopping"]
    fill = (o["pad_token_id"] or o["eos_token_id"][0]) if len(eos) else -1  # transformers' fill value

    # Sequence buffers start at the cache's initial length and double as the beams grow (as the
    # cache does), so a generous max_length costs only the positions reached.
    width = min(max_length, prompt_length + _INITIAL_CACHE_LENGTH)
    running = torch.full((batch, num_beams, width), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompt[:, None, :]
    finished = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NO_HYPOTHESIS
    finished_scores = torch.full((batch, num_beams), NO_HYPOTHESIS, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_origin = torch.full((batch, num_beams, width - prompt_length), -1, dtype=torch.long,
                                device=device)
    finished_origin = running_origin.clone()
    # steps that return attentions / hidden states run the Python layers: no graph to replay
    records_outputs = record is not None and record.wants_decoder_outputs
    # neither the output record nor the caller's processors keep a step's logits or scores
    step_scores_kept_by_nobody = record is None and not processors.custom
    # ... nor is anything but eos banned: each beam's best come from its logits in one pass
    # (ops.log_softmax_top_k), with no [rows, vocab] log-probabilities written and read back
    selects_from_logits = (step_scores_kept_by_nobody and processors.bans_eos_only
                           and beams_to_keep + 1 + len(eos) <= vocab)
    decoder = make_decoder(model, encoder_states, encoder_mask, num_beams, max_length,
                           use_cuda_graph and not records_outputs, prompt_mask)
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams
    every_row = torch.arange(batch * num_beams, device=device)

    def gather(tensor, index):
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    length = prompt_length
    tokens = running.view(batch * num_beams, width)[:, :prompt_length]
    # A step's [batch * num_beams, vocab] log-probabilities, in one buffer for the whole call unless
    # they are returned: fresh memory of that size costs more in page faults than log_softmax itself
    # (umt5-small, 16 x 4 beams: 36 against 15 ms a step on 2 cores)
    scratch = None
    with torch.no_grad(), contextlib.closing(decoder):
        while True:
            if length == width:
                width = min(max_length, 2 * width)
                running, finished = widened(running, width, fill), widened(finished, width, fill)
                running_origin = widened(running_origin, width - prompt_length, -1)
                finished_origin = widened(finished_origin, width - prompt_length, -1)
            flat = running.view(batch * num_beams, width)[:, :length]
            if records_outputs:
                logits, step_output = decoder.step_with_outputs(tokens, record.decoder_attentions is not None,
                                                                record.decoder_hidden_states is not None)
                record.add_decoder_outputs(step_output)
            else:
                logits = decoder.step(tokens, reuse_memory=step_scores_kept_by_nobody)
            best = None
            if selects_from_logits:
                banned = o["eos_token_id"] if eos_forbidden(o, length) else ()
                values, indices = model.runtime.ops.log_softmax_top_k(logits, beams_to_keep + 1, banned)
                best = best_of_beams(values + running_scores.view(-1, 1), indices, beams_to_keep, batch, vocab)
            if best is not None:
                top_log_probs, top_indices = best
            else:
                if step_scores_kept_by_nobody:  # reuse a buffer
                    if scratch is None or scratch.shape != logits.shape:
                        scratch = torch.empty_like(logits)
                    log_probs = processors(flat, model.runtime.ops.log_softmax(logits, out=scratch), every_row)
                else:  # (the caller's processors may keep the scores they are given)
                    log_probs = processors(flat, model.runtime.ops.log_softmax(logits), every_row)
                    if record is not None:
                        record.add(log_probs, logits)
                if log_probs is scratch:
                    log_probs = log_probs.view(batch, num_beams, vocab).add_(running_scores[:, :, None]).view(batch, -1)
                else:
                    log_probs = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
                if o["do_sample"]:
                    top_indices = torch.multinomial(log_probs.softmax(-1), beams_to_keep, generator=generator)
                    top_log_probs = torch.gather(log_probs, 1, top_indices)
                else:
                    top_log_probs, top_indices = top_candidates(log_probs, beams_to_keep, num_beams,
                                                                model.runtime.ops)
            source_beam = top_indices // vocab
            top_sequences = gather(running, source_beam)
            top_sequences[:, :, length] = top_indices % vocab
            top_origin = gather(running_origin, source_beam)
            top_origin[:, :, length - prompt_length] = source_beam + batch_offset
            hits_eos = torch.isin(top_sequences[:, :, length], eos) if len(eos) else \
                torch.zeros_like(top_log_probs, dtype=torch.bool)
            hits_stop = hits_eos | (length + 1 >= max_length)
            if stops:
                candidates = top_sequences[:, :, :length + 1].reshape(batch * beams_to_keep, length + 1)
                hits_stop = hits_stop | stops(candidates, record.steps("scores") if record else None).view(
                    batch, beams_to_keep)

            # the best num_beams continuations that did not stop keep running
            continuing = top_log_probs + hits_stop.float() * NO_HYPOTHESIS
            keep = torch.topk(continuing, num_beams)[1]
            running, running_scores, running_origin = (gather(top_sequences, keep), gather(continuing, keep),
                                                       gather(top_origin, keep))

            # the stopped ones among the top num_beams compete with the finished hypotheses
            just_finished = hits_stop & top_num_beam_mask[None, :]
            candidate_scores = top_log_probs / ((length + 1 - prompt_length) ** length_penalty)
            batch_full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
            candidate_scores = candidate_scores + batch_full.float() * NO_HYPOTHESIS
            candidate_scores = candidate_scores + (~improvable).float() * NO_HYPOTHESIS
            candidate_scores = candidate_scores + (~just_finished).float() * NO_HYPOTHESIS
            merged_scores = torch.cat([finished_scores, candidate_scores], dim=1)
            best = torch.topk(merged_scores, num_beams)[1]
            finished = gather(torch.cat([finished, top_sequences], dim=1), best)
            finished_scores = gather(merged_scores, best)
            finished_origin = gather(torch.cat([finished_origin, top_origin], dim=1), best)
            is_finished = gather(torch.cat([is_finished, just_finished], dim=1), best)

            decoder.reorder(running_origin[:, :, length - prompt_length].reshape(-1))
            length += 1
            tokens = running.view(batch * num_beams, width)[:, length - 1:length]

            # can a running beam still beat the worst finished one?
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - prompt_length
            else:
                best_length = length - prompt_length
            best_running = running_scores[:, :1] / (best_length ** length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NO_HYPOTHESIS)
            improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
            open_beams = ~(is_finished.all() & (early_stopping is True))
            if not bool(improvable.any() & open_beams & ~hits_stop.all()):
                break
        if kept_cache is not None:
            kept_cache.append(decoder.cache.as_dynamic())

    n = o["num_return_sequences"]
    sequences = finished[:, :n].reshape(batch * n, width)
    sequence_scores = finished_scores[:, :n].reshape(-1)
    origin = finished_origin[:, :n].reshape(batch * n, -1)
    generated = int((origin + 1).bool().sum(dim=1).max())
    return sequences[:, :prompt_length + generated], sequence_scores, origin[:, :generated]


def decoding_rules(model, options, prompt, max_length, input_ids, logits_processor=None,
                   prefix_allowed_tokens_fn=None, stopping_criteria=None, tokenizer=None):
    """The call's ``Processors`` (what each step does to the scores) and ``StopCriteria`` (what
    ends rows besides eos and max_length)."""
    beam = options["num_beams"] > 1
    rows_per_source = options["num_beams"] if beam else (options["num_return_sequences"] if options["do_sample"] else 1)
    processors = Processors(options, model.config.vocab_size, prompt.shape[1], max_length, beam, rows_per_source,
                            source_ids=input_ids, logits_processor=logits_processor,
                            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, device=prompt.device)
    stops = StopCriteria(options["max_time"], stopping_criteria, options["stop_strings"], tokenizer,
                         has_eos=bool(options["eos_token_id"]))
    return processors, stops


def generate(model, input_ids=None, attention_mask=None, *, decoder_input_ids=None, decoder_attention_mask=None,
             inputs_embeds=None,
             encoder_outputs=None, generation_config=None, streamer=None, generator: Optional[torch.Generator] = None,
             seed: Optional[int] = None, use_cuda_graph: bool = False, logits_processor=None,
             prefix_allowed_tokens_fn=None, stopping_criteria=None, tokenizer=None, **kwargs):
    """Decode like transformers' ``generate``; returns ids ``[batch * num_return_sequences, T]``.

    The source is ``input_ids``, ``inputs_embeds`` or (the encoder skipped) ``encoder_outputs``.
    Sampling draws from ``generator`` (or a fresh one seeded with ``seed``; else torch's global RNG).
    ``logits_processor``: callables ``(ids so far, scores) -> scores`` run after the built-in processors
    and before the sampling warpers, as in transformers; ``prefix_allowed_tokens_fn(batch_id, ids)``
    lists the tokens allowed next; ``stopping_criteria``: callables ``(ids so far, scores) -> [rows]
    bool`` that end rows, besides eos, max_length, ``max_time`` and ``stop_strings`` (which reads the
    tokens' text through ``tokenizer``).
    ``use_cuda_graph=True`` (CUDA only; opt-in) replays single-token steps from a captured CUDA graph.
    ``streamer``: an object with ``put(ids)`` / ``end()`` (transformers' streamer protocol): it
    receives the decoder prompt, then each step's tokens.
    """
    if "inputs" in kwargs:  # transformers' name of the first argument
        if input_ids is not None:
            raise TypeError("generate() got both input_ids and inputs")
        input_ids = kwargs.pop("inputs")
    options = resolve_options(model, generation_config, **kwargs)
    check_options(options, model.config.vocab_size)
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    encoder_output, mask, prompt, prompt_mask, max_length = prepare(
        model, input_ids, attention_mask, decoder_input_ids, options, inputs_embeds, encoder_outputs,
        decoder_attention_mask)
    encoder_states = encoder_output.last_hidden_state
    processors, stops = decoding_rules(model, options, prompt, max_length, input_ids, logits_processor,
                                       prefix_allowed_tokens_fn, stopping_criteria, tokenizer)
    record = None
    beam = options["num_beams"] > 1
    # greedy / sampled decoding gets its attentions and hidden states from one pass afterwards
    # (attentions_and_hidden_states); beam search records them per step, from its running beams
    beam_attentions, beam_hidden = (beam and options["output_attentions"], beam and options["output_hidden_states"])
    if options["return_dict_in_generate"] and (options["output_scores"] or options["output_logits"]
                                               or beam_attentions or beam_hidden):
        record = StepRecord(scores=[] if options["output_scores"] else None,
                            logits=[] if options["output_logits"] else None,
                            decoder_attentions=[] if beam_attentions else None,
                            cross_attentions=[] if beam_attentions else None,
                            decoder_hidden_states=[] if beam_hidden else None)
    sequence_scores = beam_indices = None
    # (transformers returns the cache with the dict unless use_cache=False)
    kept_cache = [] if options["return_dict_in_generate"] and options["use_cache"] is not False else None
    if beam:
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1)")
        sequences, sequence_scores, beam_indices = beam_search(model, encoder_states, mask, prompt, max_length,
                                                               options, processors, stops, generator, record,
                                                               use_cuda_graph, kept_cache, prompt_mask)
    else:
        expand = options["num_return_sequences"] if options["do_sample"] else 1
        if streamer is not None:  # one stream per returned sequence
            streamer.put(prompt.repeat_interleave(expand, dim=0).cpu())
        steps = []
        for tokens in sample_steps(model, encoder_states, mask, prompt, max_length, options, processors, stops,
                                   generator, record, use_cuda_graph, kept_cache, prompt_mask):
            steps.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([prompt.repeat_interleave(expand, dim=0), torch.stack(steps, dim=1)], dim=1)
    if options["return_dict_in_generate"]:
        kept = record or StepRecord()
        step_outputs = {}
        if beam_attentions or beam_hidden:
            step_outputs = dict(encoder_attentions=encoder_output.attentions if beam_attentions else None,
                                encoder_hidden_states=encoder_output.hidden_states if beam_hidden else None,
                                decoder_attentions=kept.steps("decoder_attentions"),
                                cross_attentions=kept.steps("cross_attentions"),
                                decoder_hidden_states=kept.steps("decoder_hidden_states"))
        elif options["output_attentions"] or options["output_hidden_states"]:
            step_outputs = attentions_and_hidden_states(model, sequences, encoder_output, mask, prompt_mask,
                                                        prompt.shape[1], options)
        return GenerateOutput(sequences=sequences,
                              sequences_scores=sequence_scores if options["output_scores"] else None,
                              scores=kept.steps("scores"), logits=kept.steps("logits"), beam_indices=beam_indices,
                              past_key_values=kept_cache[0] if kept_cache else None, **step_outputs)
    return sequences


def attentions_and_hidden_states(model, sequences, encoder_output, encoder_mask, prompt_mask: Optional[torch.Tensor],
                                 prompt_length: int, options) -> dict:
    """transformers' encoder and per-step decoder attentions and hidden states of greedy / sampled
    decoding (GenerateOutput's fields), from one decoder pass over the generated sequences: step 0
    is the prompt's positions, step i > 0 the position that fed token i; causal attention (and the
    prompt's padding, ``prompt_mask``) gives each position what its step computed."""
    attentions, hidden = options["output_attentions"], options["output_hidden_states"]
    fields = dict(encoder_attentions=encoder_output.attentions if attentions else None,
                  encoder_hidden_states=encoder_output.hidden_states if hidden else None)
    rows_per_source = sequences.shape[0] // encoder_output.last_hidden_state.shape[0]
    states = encoder_output.last_hidden_state.repeat_interleave(rows_per_source, dim=0)
    mask = None if encoder_mask is None else encoder_mask.repeat_interleave(rows_per_source, dim=0)

    def decode(length, self_mask):
        with torch.no_grad():
            return model.decoder(input_ids=sequences[:, :length], attention_mask=self_mask, encoder_hidden_states=states,
                                 encoder_attention_mask=mask, output_attentions=attentions,
                                 output_hidden_states=hidden, use_cache=False, return_dict=True)

    self_mask = None
    if prompt_mask is not None:
        prompt_mask = prompt_mask.repeat_interleave(rows_per_source, dim=0)
        self_mask = prompt_mask.new_ones(sequences.shape[0], sequences.shape[1] - 1)
        self_mask[:, :prompt_length] = prompt_mask
    decoded = decode(sequences.shape[1] - 1, self_mask)
    # A padded prompt position with no unmasked key up to it attends uniformly to every key of its
    # pass (transformers' additive mask), so step 0 comes from a pass over the prompt alone; the
    # later steps' positions are keys of their own.
    prompt_pass = decoded if prompt_mask is None else decode(prompt_length, prompt_mask)
    steps = [(prompt_pass, 0, prompt_length)] + [(decoded, p, p + 1)
                                                 for p in range(prompt_length, sequences.shape[1] - 1)]
    if attentions:
        fields["decoder_attentions"] = tuple(tuple(a[:, :, q0:q1, :q1] for a in d.attentions) for d, q0, q1 in steps)
        fields["cross_attentions"] = tuple(tuple(a[:, :, q0:q1] for a in d.cross_attentions) for d, q0, q1 in steps)
    if hidden:
        fields["decoder_hidden_states"] = tuple(tuple(h[:, q0:q1] for h in d.hidden_states) for d, q0, q1 in steps)
    return fields


def transition_scores(sequences: torch.Tensor, scores, beam_indices: Optional[torch.Tensor], vocab_size: int,
                      normalize_logits: bool = False) -> torch.Tensor:
    """transformers' ``compute_transition_scores``: ``[rows, steps]``, the score each generated token
    got at its step (from ``scores``, one ``[step rows, vocab]`` tensor a step), read from the
    beam it grew from (``beam_indices``; None: row i at every step); 0 where a beam had ended
    (index -1). ``normalize_logits`` first turns each step's scores into log-probabilities."""
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences must be generate's [rows, length] ids, got {sequences!r:.100}")
    if (not isinstance(scores, (tuple, list)) or not scores
            or not all(isinstance(s, torch.Tensor) and s.shape == scores[0].shape and s.dim() == 2 for s in scores)):
        raise ValueError("scores must be the per-step scores generate returned (output_scores=True or "
                         "output_logits=True with return_dict_in_generate=True): [rows, vocab] tensors alike")
    steps = torch.stack(tuple(scores))  # [steps, step rows, vocab]
    if steps.shape[-1] != vocab_size:
        raise ValueError(f"scores have {steps.shape[-1]} entries per row, the model's vocabulary {vocab_size}")
    if normalize_logits:
        steps = F.log_softmax(steps, dim=-1)
    if beam_indices is None:
        beam_indices = torch.arange(steps.shape[1], device=steps.device)[:, None].expand(-1, steps.shape[0])
    if not isinstance(beam_indices, torch.Tensor) or beam_indices.dim() != 2 \
            or beam_indices.shape[0] != sequences.shape[0] or bool((beam_indices >= steps.shape[1]).any()):
        given = f"shape {list(beam_indices.shape)}" if isinstance(beam_indices, torch.Tensor) else repr(beam_indices)
        raise ValueError(f"beam_indices ({given:.100}) must name, for each of the "
                         f"{sequences.shape[0]} sequences, a row of the scores' {steps.shape[1]} at each step "
                         "(beam search: pass the beam_indices generate returned)")
    ended = beam_indices < 0
    length = int((~ended).sum(dim=1).max())  # steps of the longest returned sequence
    beam_indices, ended = beam_indices[:, :length], ended[:, :length]
    if sequences.shape[1] < length:
        raise ValueError(f"sequences ({sequences.shape[1]} tokens) are shorter than the {length} scored steps")
    tokens = sequences[:, sequences.shape[1] - length:]  # the generated tokens, step by step
    step_index = torch.arange(length, device=steps.device)[None, :].expand_as(tokens)
    picked = steps[step_index, beam_indices.clamp(min=0), tokens]
    return picked.masked_fill(ended, 0.0)


def generate_stream(model, input_ids=None, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
    """Greedy/sampled decoding as an iterator: yields each step's ``[rows]`` tokens (pad after eos)."""
    generator = kwargs.pop("generator", None)
    seed = kwargs.pop("seed", None)
    decoder_input_ids = kwargs.pop("decoder_input_ids", None)
    decoder_attention_mask = kwargs.pop("decoder_attention_mask", None)
    use_cuda_graph = kwargs.pop("use_cuda_graph", False)
    logits_processor = kwargs.pop("logits_processor", None)
    prefix_allowed_tokens_fn = kwargs.pop("prefix_allowed_tokens_fn", None)
    stopping_criteria = kwargs.pop("stopping_criteria", None)
    tokenizer = kwargs.pop("tokenizer", None)
    options = resolve_options(model, kwargs.pop("generation_config", None), **kwargs)
    check_options(options, model.config.vocab_size)
    if options["num_beams"] > 1:
        raise ValueError("generate_stream supports greedy and sampled decoding (num_beams=1)")
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    encoder_output, mask, prompt, prompt_mask, max_length = prepare(
        model, input_ids, attention_mask, decoder_input_ids, options, decoder_attention_mask=decoder_attention_mask)
    encoder_states = encoder_output.last_hidden_state
    processors, stops = decoding_rules(model, options, prompt, max_length, input_ids, logits_processor,
                                       prefix_allowed_tokens_fn, stopping_criteria, tokenizer)
    yield from sample_steps(model, encoder_states, mask, prompt, max_length, options, processors, stops, generator,
                            use_cuda_graph=use_cuda_graph, prompt_mask=prompt_mask)
