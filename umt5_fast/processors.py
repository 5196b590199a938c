"""transformers' logits processors and warpers, same definitions and order (its
``_get_logits_processor``): what ``generate`` does to each step's scores before it picks tokens.

``Processors`` is built once per ``generate`` call from the resolved options; calling it on a step's
``[rows, vocab]`` scores applies, in order: sequence_bias, encoder_repetition_penalty,
repetition_penalty, no_repeat_ngram_size, encoder_no_repeat_ngram_size, bad_words_ids, min_length /
min_new_tokens, prefix_allowed_tokens_fn, forced_bos_token_id, forced_eos_token_id,
remove_invalid_values, exponential_decay_length_penalty, suppress_tokens, begin_suppress_tokens, the
caller's ``logits_processor`` list; then, when sampling, temperature, top_k, top_p, min_p, typical_p,
epsilon_cutoff and eta_cutoff; and renormalize_logits last.
"""
import ast
import math
import time
import warnings
from typing import Callable, Optional, Sequence

import torch

# Beam search's score of a missing hypothesis (transformers' -1e9): scaled scores below it would lose
# to the placeholders of empty hypotheses.
NO_HYPOTHESIS = -1.0e9


# ---------------------------------------------------------------------------------------------
# The processors, one function each (``sequences``: the ids so far, ``[rows, length]``)
# ---------------------------------------------------------------------------------------------
def repetition_penalty(sequences, scores, penalty: float):
    picked = torch.gather(scores, 1, sequences)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, sequences, picked)


def banned_continuations(windows, sequences, scores) -> torch.Tensor:
    """``[rows, vocab]`` bool: the last tokens of those n-gram ``windows`` ``[rows, count, n]`` whose
    first n-1 tokens equal the last n-1 ids of the row (vectorised n-gram lookup)."""
    n = windows.shape[-1]
    prefix = sequences[:, sequences.shape[1] - n + 1:]
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)
    # scatter_add: several windows may name the same next token (scatter_ would keep any one write)
    banned = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], matches.to(scores.dtype))
    return banned > 0


def no_repeat_ngram(sequences, scores, n: int):
    """Ban every token that would complete an n-gram already present in the row."""
    length = sequences.shape[1]
    if length < n:  # no complete n-gram yet
        return scores
    if n == 1:
        return scores.scatter(1, sequences, -math.inf)
    return scores.masked_fill(banned_continuations(sequences.unfold(1, n, 1), sequences, scores), -math.inf)


def encoder_no_repeat_ngram(source_ids, sequences, scores, n: int):
    """Ban every token that would complete an n-gram of the row's source (``source_ids``
    ``[rows, source length]``, padding included, as transformers reads it)."""
    if sequences.shape[1] < n - 1 or source_ids.shape[1] < n:  # no prefix to match yet / no n-gram
        return scores
    if n == 1:
        return scores.scatter(1, source_ids, -math.inf)
    return scores.masked_fill(banned_continuations(source_ids.unfold(1, n, 1), sequences, scores), -math.inf)


def forbid_eos(scores, eos_ids):
    """In place (min_length / min_new_tokens): a copy of [rows, vocab] scores per step cost more than the
    rest of the processors; ``Processors`` owns the scores it is given."""
    scores[:, eos_ids] = -math.inf
    return scores


def only_tokens(scores, token_ids):
    """forced_bos / forced_eos: every score -inf but ``token_ids``' (0)."""
    forced = torch.full_like(scores, -math.inf)
    forced[:, token_ids] = 0
    return forced


def remove_invalid_values(scores):
    finfo = torch.finfo(scores.dtype)
    cleaned = torch.where(scores != scores, 0.0, scores)
    cleaned = torch.where(scores == math.inf, finfo.max, cleaned)
    return torch.where(scores == -math.inf, finfo.min, cleaned)


def suppress(scores, token_mask):
    """``token_mask`` ``[vocab]`` bool: those tokens' scores become -inf."""
    return torch.where(token_mask, -math.inf, scores)


def top_k_filter(scores, top_k: int, min_tokens_to_keep: int = 1):
    top_k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], -math.inf)


# A sorted row's windows (its last positions, where the finite scores are) end where the row ends
# and hold at least this many positions, and their lengths are congruent to the row's modulo it.
# torch's CPU softmax sums a row in the lanes of a vector (8 or 16 values), in order within each
# lane, then combines the lanes in a butterfly that a cyclic shift of the lanes leaves alike; the
# -inf entries before a window add exact zeros. A row shorter than a vector sums in another order.
_SOFTMAX_WINDOW = 256


def window_length(finite: int, length: int) -> int:
    """The shortest window of a sorted row of ``length`` that holds its ``finite`` last values and
    sums them as the whole row does (see _SOFTMAX_WINDOW); the whole row when it is that short."""
    return length - max(length - max(finite, _SOFTMAX_WINDOW), 0) // _SOFTMAX_WINDOW * _SOFTMAX_WINDOW


def narrow_width(finite: int, vocab: int, top_k: int) -> int:
    """The narrowest row width, at least ``finite`` and ``top_k``, whose sorted rows' windows are
    those of rows of ``vocab`` (``window_length``): ``top_k_filter`` and ``top_p_filter`` of such
    rows, holding a full row's finite scores (-inf elsewhere), give the full row's results at those
    scores when they are distinct: the k-th largest is the same, and the sorted row's finite scores
    take the same lanes in the same order, so its softmax and cumulative sums are the full row's."""
    return window_length(max(finite, min(top_k, vocab)), vocab)


def top_p_filter(scores, top_p: float, min_tokens_to_keep: int = 1):
    """transformers' TopPLogitsWarper: -inf for the entries of each row whose ascending cumulative
    softmax stays within 1 - top_p (but the last ``min_tokens_to_keep``)."""
    cumulative, sorted_indices = ascending_cumulative_probabilities(scores, min_tokens_to_keep)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = 0
    dropped = torch.zeros_like(scores, dtype=torch.bool).scatter(1, sorted_indices, remove)
    return scores.masked_fill(dropped, -math.inf)


def ascending_cumulative_probabilities(scores, min_length: int = 1):
    """``(softmax(sorted).cumsum(-1), indices)`` of each row sorted ascending, as transformers forms
    them for top-p; at least the last ``min_length`` positions. When few scores are finite (after
    top-k: 50 of umt5's 256384), the sort's last window that holds them all is formed alone
    (torch.topk; 20 against 75 ms for 16 rows): its sums are the whole sort's from the window on (the
    zeros before it add nothing), when its finite scores are distinct (else their order is the full
    sort's to choose, which then runs)."""
    rows, vocab = scores.shape
    finite = torch.isfinite(scores).sum(1)
    start = vocab - window_length(int(finite.max()) if rows else vocab, vocab)
    # (NaN or +inf: only the full sort knows their place)
    if min_length <= vocab - start < vocab // 4 and bool((finite + (scores == -math.inf).sum(1) == vocab).all()):
        values, indices = (t.flip(1) for t in torch.topk(scores, vocab - start, dim=1))
        if not bool((torch.isfinite(values[:, 1:]) & (values[:, 1:] == values[:, :-1])).any()):
            return values.softmax(dim=-1).cumsum(dim=-1), indices
    values, indices = torch.sort(scores, descending=False)
    return values.softmax(dim=-1).cumsum(dim=-1), indices


def min_p_filter(scores, min_p: float, min_tokens_to_keep: int = 1):
    """Drop tokens less likely than min_p times the most likely one."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.max(dim=-1, keepdim=True)[0]
    order = torch.argsort(scores, descending=True, dim=-1)
    sorted_remove = torch.gather(remove, -1, order)
    sorted_remove[..., :min_tokens_to_keep] = False
    return scores.masked_fill(sorted_remove.scatter(1, order, sorted_remove), -math.inf)


def typical_filter(scores, mass: float, min_tokens_to_keep: int = 1):
    """Keep the tokens whose surprise is closest to the entropy, up to ``mass`` of probability."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - entropy)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=sorted_shifted.shape[-1] - 1)
    sorted_remove = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
    sorted_remove[..., :min_tokens_to_keep] = 0
    return scores.masked_fill(sorted_remove.scatter(1, order, sorted_remove), -math.inf)


def probability_cutoff(scores, cutoff, min_tokens_to_keep: int = 1):
    """epsilon / eta sampling: drop tokens whose probability is below ``cutoff`` (a number or a
    ``[rows, 1]`` tensor), keeping the ``min_tokens_to_keep`` most likely."""
    remove = scores.softmax(dim=-1) < cutoff
    top_k = min(min_tokens_to_keep, scores.size(-1))
    remove = remove & (scores < torch.topk(scores, top_k)[0][..., -1, None])
    return scores.masked_fill(remove, -math.inf)


def eta_cutoff(scores, eta: float):
    """eta sampling's cutoff: min(eta, sqrt(eta) * exp(-entropy)) per row."""
    eta_tensor = torch.tensor(eta, device=scores.device)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    return torch.min(eta_tensor, torch.sqrt(eta_tensor) * torch.exp(-entropy))[..., None]


# ---------------------------------------------------------------------------------------------
# Options: normalisation and checks
# ---------------------------------------------------------------------------------------------
def token_id_sequences(name: str, value, vocab_size: int) -> list:
    """bad_words_ids (and sequence_bias keys): non-empty lists of token ids."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of lists of token ids, got {value!r}")
    sequences = []
    for sequence in value:
        if (not isinstance(sequence, (list, tuple)) or not sequence
                or not all(is_token_id(t, vocab_size) for t in sequence)):
            raise ValueError(f"{name} must be a non-empty list of non-empty lists of token ids in "
                             f"[0, {vocab_size}), got {value!r}")
        sequences.append(tuple(int(t) for t in sequence))
    return sequences


def sequence_bias_dict(value, vocab_size: int) -> dict:
    """sequence_bias as transformers takes it, ``{(ids...): bias}`` or ``[[ids], bias]`` pairs (the
    form a generation_config.json stores), as a dict."""
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple, type({}.items()))) or not pairs or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ValueError(f"sequence_bias must be a non-empty dict {{(token ids): bias}} or a list of "
                         f"[[token ids], bias] pairs, got {value!r}")
    keys = token_id_sequences("sequence_bias's token sequences", [token_sequence_key(k) for k, _ in pairs],
                              vocab_size)
    biases = [b for _, b in pairs]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b) for b in biases):
        raise ValueError(f"sequence_bias's biases must be numbers, got {biases!r}")
    return dict(zip(keys, (float(b) for b in biases)))


def token_sequence_key(key):
    """A sequence_bias key as a list: a tuple, a list, or the text "(5, 7)" that transformers'
    GenerationConfig.save_pretrained writes for a tuple key (and cannot read back itself)."""
    if isinstance(key, str):
        try:
            key = ast.literal_eval(key)
        except (ValueError, SyntaxError):
            return key  # refused by the caller's check, named
        key = [key] if isinstance(key, int) else key
    return list(key) if isinstance(key, (list, tuple)) else key


def is_token_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_processor_options(o: dict, vocab_size: int):
    """Refuse option values transformers refuses (or that would fail inside a step), naming them;
    normalise the token-id lists in ``o``."""
    def in_range(name, low, high, low_open=False, high_open=False):
        value = o[name]
        ok = is_finite_number(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
        if not ok:
            raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}"
                             f"{')' if high_open else ']'}, got {value!r}")

    def token_ids(name):
        value = o[name]
        ids = list(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(ids, list) or not all(is_token_id(t, vocab_size) for t in ids):
            raise ValueError(f"{name} must be a list of token ids in [0, {vocab_size}), got {value!r}")
        o[name] = ids

    if o["sequence_bias"] is not None:
        o["sequence_bias"] = sequence_bias_dict(o["sequence_bias"], vocab_size)
    if o["bad_words_ids"] is not None:
        o["bad_words_ids"] = token_id_sequences("bad_words_ids", o["bad_words_ids"], vocab_size)
    if not (is_finite_number(o["encoder_repetition_penalty"]) and o["encoder_repetition_penalty"] > 0):
        raise ValueError(f"encoder_repetition_penalty must be a number > 0, got {o['encoder_repetition_penalty']!r}")
    size = o["encoder_no_repeat_ngram_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"encoder_no_repeat_ngram_size must be an integer >= 0, got {size!r}")
    if o["forced_bos_token_id"] is not None and not is_token_id(o["forced_bos_token_id"], vocab_size):
        raise ValueError(f"forced_bos_token_id must be a token id in [0, {vocab_size}), got "
                         f"{o['forced_bos_token_id']!r}")
    forced_eos = o["forced_eos_token_id"]
    if forced_eos is not None:
        forced_eos = list(forced_eos) if isinstance(forced_eos, (list, tuple)) else [forced_eos]
        if not forced_eos or not all(is_token_id(t, vocab_size) for t in forced_eos):
            raise ValueError(f"forced_eos_token_id must be a token id in [0, {vocab_size}) or a list of them, got "
                             f"{o['forced_eos_token_id']!r}")
        o["forced_eos_token_id"] = forced_eos
    decay = o["exponential_decay_length_penalty"]
    if decay is not None and not (isinstance(decay, (list, tuple)) and len(decay) == 2
                                  and isinstance(decay[0], int) and not isinstance(decay[0], bool) and decay[0] >= 0
                                  and is_finite_number(decay[1]) and decay[1] > 0):
        raise ValueError("exponential_decay_length_penalty must be (start index >= 0, decay factor > 0), got "
                         f"{decay!r}")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if o[name] is not None:
            token_ids(name)
    for name in ("remove_invalid_values", "renormalize_logits"):
        if not isinstance(o[name], bool):
            raise ValueError(f"{name} must be True or False, got {o[name]!r}")
    if o["min_p"] is not None:
        in_range("min_p", 0, 1)
    in_range("typical_p", 0, 1, low_open=True)
    in_range("epsilon_cutoff", 0, 1, high_open=True)
    in_range("eta_cutoff", 0, 1, high_open=True)
    if o["exponential_decay_length_penalty"] is not None and not o["eos_token_id"]:
        raise ValueError("exponential_decay_length_penalty raises the eos tokens' scores: it needs an eos_token_id")
    if o["max_time"] is not None and not (is_finite_number(o["max_time"]) and o["max_time"] >= 0):
        raise ValueError(f"max_time must be a number of seconds >= 0, got {o['max_time']!r}")


# ---------------------------------------------------------------------------------------------
# One generate call's processors
# ---------------------------------------------------------------------------------------------
class Processors:
    """The processors one ``generate`` call's options ask for, as a list of steps in transformers'
    order.

    ``rows_per_source``: rows of the decoded batch per source row (beams, or sampled return
    sequences); ``source_ids``: the encoder's input ids ``[batch, source length]``, None when the
    source came as embeddings alone (the encoder processors are then skipped with a warning, as
    transformers skips them); ``logits_processor``: the caller's ``(input_ids, scores) -> scores``
    callables, run after the built-in steps, except that one of the class transformers would build
    for an active option takes that step's place (transformers' ``_merge_criteria_processor_list``);
    ``prefix_allowed_tokens_fn(batch_id, ids) -> allowed ids``.
    """

    def __init__(self, o: dict, vocab_size: int, prompt_length: int, max_length: int, beam: bool,
                 rows_per_source: int, source_ids: Optional[torch.Tensor] = None,
                 logits_processor: Sequence[Callable] = (), prefix_allowed_tokens_fn: Optional[Callable] = None,
                 device=None):
        self.o, self.vocab_size, self.beam = o, vocab_size, beam
        self.device = device  # where the tables are made: the decoded ids' device
        self.max_length, self.rows_per_source = max_length, rows_per_source
        self.custom = list(logits_processor or ())  # all the caller's: they see every row, in transformers' order
        if not all(callable(p) for p in self.custom):
            raise TypeError("logits_processor must be a list of callables (input_ids, scores) -> scores")
        if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
            raise TypeError("prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> allowed token ids")
        self.prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        eos = o["eos_token_id"]
        self.eos = eos
        self.source_ids = None
        if o["encoder_repetition_penalty"] != 1.0 or o["encoder_no_repeat_ngram_size"]:
            if source_ids is None:
                warnings.warn("encoder_repetition_penalty and encoder_no_repeat_ngram_size need input_ids; "
                              "generating from inputs_embeds or encoder_outputs alone, they are ignored (as in "
                              "transformers)", UserWarning, stacklevel=3)
            else:
                self.source_ids = source_ids.long()
        self.sequence_bias = self.bias_tables(o["sequence_bias"])
        bad_words = o["bad_words_ids"]
        if bad_words is not None:  # a bad word that is an eos token alone is not banned
            bad_words = [w for w in bad_words if not (len(w) == 1 and w[0] in eos)]
        self.bad_words = self.bias_tables(dict.fromkeys(bad_words, -math.inf)) if bad_words else None
        self.suppressed = self.token_mask(o["suppress_tokens"])
        self.begin_suppressed = self.token_mask(o["begin_suppress_tokens"])
        # transformers: the first generated position, one later when forced_bos takes a 1-token prompt's
        self.begin_index = prompt_length + (1 if prompt_length == 1 and o["forced_bos_token_id"] is not None else 0)
        decay = o["exponential_decay_length_penalty"]
        self.decay = None if decay is None else (decay[0] + prompt_length, float(decay[1]))
        has_eos = bool(eos)
        # (transformers' class, step) for every active option, in its order
        active = [
            ("SequenceBiasLogitsProcessor", self.sequence_bias is not None and self.sequence_bias_step),
            ("EncoderRepetitionPenaltyLogitsProcessor", self.source_ids is not None
             and o["encoder_repetition_penalty"] != 1.0 and self.encoder_repetition_step),
            ("RepetitionPenaltyLogitsProcessor", o["repetition_penalty"] != 1.0 and self.repetition_step),
            ("NoRepeatNGramLogitsProcessor", bool(o["no_repeat_ngram_size"]) and self.no_repeat_ngram_step),
            ("EncoderNoRepeatNGramLogitsProcessor", self.source_ids is not None
             and bool(o["encoder_no_repeat_ngram_size"]) and self.encoder_no_repeat_ngram_step),
            ("NoBadWordsLogitsProcessor", self.bad_words is not None and self.bad_words_step),
            # (min_new_tokens set min_length to the same length: both ban eos until there)
            ("MinLengthLogitsProcessor", has_eos and o["min_length"] > 0 and self.min_length_step),
            ("MinNewTokensLengthLogitsProcessor", has_eos and bool(o["min_new_tokens"]) and self.min_length_step),
            ("PrefixConstrainedLogitsProcessor", prefix_allowed_tokens_fn is not None and self.prefix_step),
            ("ForcedBOSTokenLogitsProcessor", o["forced_bos_token_id"] is not None and self.forced_bos_step),
            ("ForcedEOSTokenLogitsProcessor", o["forced_eos_token_id"] is not None and self.forced_eos_step),
            ("InfNanRemoveLogitsProcessor", o["remove_invalid_values"] and self.remove_invalid_step),
            ("ExponentialDecayLengthPenalty", self.decay is not None and self.decay_step),
            ("SuppressTokensLogitsProcessor", self.suppressed is not None and self.suppress_step),
            ("SuppressTokensAtBeginLogitsProcessor", self.begin_suppressed is not None and self.begin_suppress_step),
        ]
        self.steps = []
        custom = list(self.custom)  # those not taking a built-in step's place run after the built-in steps
        for class_name, step in active:
            if not step:
                continue
            replacement = next((p for p in custom if type(p).__name__ == class_name), None)
            if replacement is not None:
                custom.remove(replacement)
                step = self.custom_step(replacement)
            self.steps.append(step)
        self.steps += [self.custom_step(p) for p in custom]
        # beam sampling keeps a token besides the eos ones, to have a continuation to explore
        keep = (len(eos) + 1 if eos else 2) if beam else 1
        # (name, warp) for every active warper, in transformers' order
        self.warpers = [(name, warp) for name, warp in [
            ("temperature", o["temperature"] != 1.0 and self.temperature_warp),
            ("top_k", bool(o["top_k"]) and (lambda s: top_k_filter(s, o["top_k"], keep))),
            ("top_p", o["top_p"] < 1.0 and (lambda s: top_p_filter(s, o["top_p"], keep))),
            ("min_p", o["min_p"] is not None and (lambda s: min_p_filter(s, o["min_p"], keep))),
            ("typical_p", o["typical_p"] < 1.0 and (lambda s: typical_filter(s, o["typical_p"], keep))),
            ("epsilon_cutoff", 0.0 < o["epsilon_cutoff"] < 1.0
             and (lambda s: probability_cutoff(s, o["epsilon_cutoff"], keep))),
            ("eta_cutoff", 0.0 < o["eta_cutoff"] < 1.0
             and (lambda s: probability_cutoff(s, eta_cutoff(s, o["eta_cutoff"]), keep))),
        ] if warp]
        # whether no step but min_length's ban of eos touches the scores, and none renormalises them
        only_eos_ban = all(step == self.min_length_step for step in self.steps) and not o["renormalize_logits"]
        # whether the processed scores are the raw ones (a greedy step's logits, a beam step's log-softmax)
        # but for min_length's ban of eos: a greedy pick is then the raw argmax outside eos (which the
        # LM head screen finds without computing every logit), a beam step's best the log-softmax's
        # best outside eos (ops.log_softmax_top_k, which writes no log-probabilities)
        self.bans_eos_only = only_eos_ban and not o["do_sample"]
        # whether a sampled step's distribution depends on nothing but the top_k largest logits outside
        # eos: min_length's ban, then temperature, top-k and top-p (the LM head screen finds those
        # logits without computing every one)
        self.samples_from_top_k = (only_eos_ban and o["do_sample"] and not beam and o["top_k"] > 0
                                   and {name for name, _ in self.warpers} <= {"temperature", "top_k", "top_p"})

    def bias_tables(self, biases: Optional[dict]):
        """(length-1 biases as a [vocab] tensor, [(prefix, last token, bias)] of longer sequences)."""
        if biases is None:
            return None
        single = torch.zeros(self.vocab_size, dtype=torch.float)
        longer = []
        for sequence, bias in biases.items():
            if len(sequence) == 1:
                single[sequence[0]] = bias
            else:
                longer.append((torch.tensor(sequence[:-1], dtype=torch.long, device=self.device), sequence[-1],
                               torch.tensor(bias, device=self.device)))
        single = single.to(self.device)
        return single, longer

    def token_mask(self, ids):
        if ids is None:
            return None
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[list(ids)] = True
        return mask.to(self.device)

    @staticmethod
    def add_bias(tables, sequences, scores):
        """transformers' SequenceBiasLogitsProcessor (NoBadWords is it with -inf biases)."""
        single, longer = tables
        bias = torch.zeros_like(scores)
        bias += single
        for prefix, last, value in longer:
            if len(prefix) + 1 > sequences.shape[1]:  # longer than the ids so far
                continue
            matching = torch.eq(sequences[:, -len(prefix):], prefix).prod(dim=1)
            bias[:, last] += torch.where(matching.bool(), value, 0.0)
        return scores + bias

    def allowed_by_prefix_fn(self, sequences, scores, rows):
        mask = torch.full_like(scores, -math.inf)
        for i, row in enumerate(rows.tolist()):
            # transformers' batch id: the row's index over num_beams (with sampled return sequences,
            # the expanded row index)
            batch_id = row // self.o["num_beams"]
            allowed = self.prefix_allowed_tokens_fn(batch_id, sequences[i])
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no token for batch id {batch_id}: the "
                                 "constraint cannot be met")
            mask[i, allowed] = 0
        return scores + mask

    # the steps: (ids so far [rows, length], scores [rows, vocab], rows of the decoded batch) -> scores
    def sequence_bias_step(self, sequences, scores, rows):
        return self.add_bias(self.sequence_bias, sequences, scores)

    def encoder_repetition_step(self, sequences, scores, rows):
        # raises the scores of the source's tokens: transformers applies 1 / penalty as the repetition
        # penalty applies its penalty
        return repetition_penalty(self.source_ids[rows // self.rows_per_source], scores,
                                  1 / self.o["encoder_repetition_penalty"])

    def repetition_step(self, sequences, scores, rows):
        return repetition_penalty(sequences, scores, self.o["repetition_penalty"])

    def no_repeat_ngram_step(self, sequences, scores, rows):
        return no_repeat_ngram(sequences, scores, self.o["no_repeat_ngram_size"])

    def encoder_no_repeat_ngram_step(self, sequences, scores, rows):
        return encoder_no_repeat_ngram(self.source_ids[rows // self.rows_per_source], sequences, scores,
                                       self.o["encoder_no_repeat_ngram_size"])

    def bad_words_step(self, sequences, scores, rows):
        return self.add_bias(self.bad_words, sequences, scores)

    def min_length_step(self, sequences, scores, rows):
        return forbid_eos(scores, self.eos) if eos_forbidden(self.o, sequences.shape[1]) else scores

    def prefix_step(self, sequences, scores, rows):
        return self.allowed_by_prefix_fn(sequences, scores, rows)

    def forced_bos_step(self, sequences, scores, rows):
        return only_tokens(scores, self.o["forced_bos_token_id"]) if sequences.shape[1] == 1 else scores

    def forced_eos_step(self, sequences, scores, rows):
        at_end = sequences.shape[1] == self.max_length - 1
        return only_tokens(scores, self.o["forced_eos_token_id"]) if at_end else scores

    def remove_invalid_step(self, sequences, scores, rows):
        return remove_invalid_values(scores)

    def decay_step(self, sequences, scores, rows):
        start, factor = self.decay
        length = sequences.shape[1]
        if length <= start:
            return scores
        penalties = torch.zeros_like(scores)
        penalties[:, self.eos] = torch.abs(scores[:, self.eos]) * (pow(factor, length - start) - 1)
        return scores + penalties

    def suppress_step(self, sequences, scores, rows):
        return suppress(scores, self.suppressed)

    def begin_suppress_step(self, sequences, scores, rows):
        at_begin = sequences.shape[1] == self.begin_index
        return suppress(scores, self.begin_suppressed) if at_begin else scores

    @staticmethod
    def custom_step(processor):
        def step(sequences, scores, rows):
            processed = processor(sequences, scores)
            if not isinstance(processed, torch.Tensor) or processed.shape != scores.shape:
                raise ValueError(f"logits_processor {processor!r} must return scores of shape {list(scores.shape)}, "
                                 f"got {processed!r:.200}")
            return processed
        return step

    def __call__(self, sequences, scores, rows: torch.Tensor):
        """Process ``scores`` ``[len(rows), vocab]`` (a step's fresh logits, or their log-softmax; may be
        modified in place) for the rows ``rows`` of the decoded batch, whose ids so far are
        ``sequences``."""
        for step in self.steps:
            scores = step(sequences, scores, rows)
        if self.o["do_sample"]:
            scores = self.warp(scores)
        if self.o["renormalize_logits"]:
            scores = scores.log_softmax(dim=-1)
        return scores

    def warp(self, scores):
        for _, warp in self.warpers:
            scores = warp(scores)
        return scores

    def temperature_warp(self, scores):
        o = self.o
        scores = scores / o["temperature"]
        if not bool(torch.isfinite(scores.max(dim=-1).values).all()):
            raise ValueError(f"temperature={o['temperature']!r} is so small that the scaled scores "
                             "overflow; use a larger temperature or greedy decoding (do_sample=False)")
        if self.beam:
            best = scores.topk(min(o["num_beams"], scores.shape[-1])).values
            if bool(((best < NO_HYPOTHESIS) & (best > -math.inf)).any()):
                # the beams' scores would lose to the placeholders of empty hypotheses, and the
                # result would be the prompt alone (as transformers returns it); scores a processor
                # set to -inf are dropped in transformers too
                raise ValueError(f"temperature={o['temperature']!r} scales the beam scores below "
                                 f"{NO_HYPOTHESIS:g}, the score beam search gives a missing hypothesis; use "
                                 "a larger temperature")
        return scores


def eos_forbidden(o: dict, length: int) -> bool:
    """Whether min_length (which ``generation.prepare`` derives from min_new_tokens where that is
    set) forbids eos at a step after ``length`` ids."""
    return bool(o["eos_token_id"]) and length < o["min_length"]


class StopStrings:
    """transformers' StopStringCriteria: a row stops once one of ``stop_strings`` is in its text and
    reaches into its last token, judged on each token's own text as transformers cleans it (the
    token decoded after a fixed prefix, the prefix removed)."""
    PREFIX = "abcdef"

    def __init__(self, stop_strings, tokenizer):
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(t, str) and t for t in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer to read the tokens' text: pass "
                             "generate(..., tokenizer=tokenizer)")
        self.strings, self.tokenizer = tuple(strings), tokenizer
        self.window = max(len(t) for t in strings)  # every token has >= 1 character: enough tokens
        self.prefix_tokens = tokenizer.convert_ids_to_tokens(
            tokenizer(self.PREFIX, add_special_tokens=False)["input_ids"])
        self.texts = {}

    def token_text(self, token_id: int) -> str:
        text = self.texts.get(token_id)
        if text is None:
            try:
                token = self.tokenizer.convert_ids_to_tokens(token_id)
            except (IndexError, KeyError):  # an id past the tokenizer's vocabulary: no text
                token = None
            if token is None:
                text = ""
            else:
                decoded = self.tokenizer.convert_tokens_to_string(self.prefix_tokens + [token])
                text = decoded[decoded.index(self.PREFIX) + len(self.PREFIX):]
            self.texts[token_id] = text
        return text

    def row_stops(self, ids) -> bool:
        texts = [self.token_text(t) for t in ids]
        before, last = "".join(texts[:-1]), texts[-1]
        text = before + last
        # an occurrence that reaches into the last token (earlier ones were judged at earlier steps)
        return any(stop in text[max(0, len(before) - len(stop) + 1):] for stop in self.strings)

    def __call__(self, sequences, scores) -> torch.Tensor:
        rows = sequences[:, -self.window:].tolist()
        return torch.tensor([self.row_stops(ids) for ids in rows], dtype=torch.bool, device=sequences.device)


class StopCriteria:
    """transformers' stopping criteria beyond eos and max_length: ``max_time`` (seconds from the
    end of the encoder pass), ``stop_strings`` (with the ``tokenizer``) and the caller's
    ``stopping_criteria``, callables ``(ids so far, scores) -> [rows] bool`` (scores: the steps'
    processed scores when generate returns them, else None, as transformers passes them)."""

    def __init__(self, max_time: Optional[float] = None, stopping_criteria: Sequence[Callable] = (),
                 stop_strings=None, tokenizer=None, has_eos: bool = True):
        self.custom = list(stopping_criteria or ())
        if not all(callable(c) for c in self.custom):
            raise TypeError("stopping_criteria must be a list of callables (input_ids, scores) -> bool per row")
        kinds = {type(c).__name__ for c in self.custom}
        # transformers puts a caller's criterion of a built-in one's class in its place
        # (_merge_criteria_processor_list): a max length or eos other than the call's is refused here
        # (the cache and buffers are sized by max_length), the others replace ours
        if "MaxLengthCriteria" in kinds:
            raise ValueError("stopping_criteria holds a MaxLengthCriteria, which transformers uses in place of "
                             "max_length: pass max_length / max_new_tokens instead")
        if "EosTokenCriteria" in kinds and has_eos:
            raise ValueError("stopping_criteria holds an EosTokenCriteria, which transformers uses in place of "
                             "eos_token_id: pass eos_token_id instead")
        if stop_strings is not None and "StopStringCriteria" not in kinds:
            self.custom.append(StopStrings(stop_strings, tokenizer))
        has_deadline = max_time is not None and "MaxTimeCriteria" not in kinds
        self.deadline = time.time() + max_time if has_deadline else None

    def __bool__(self):
        return bool(self.custom) or self.deadline is not None

    def __call__(self, sequences, scores) -> torch.Tensor:
        rows = sequences.shape[0]
        done = torch.full((rows,), self.deadline is not None and time.time() > self.deadline, dtype=torch.bool,
                          device=sequences.device)
        for criterion in self.custom:
            hit = criterion(sequences, scores)
            hit = torch.as_tensor(hit, device=sequences.device)
            if hit.dtype != torch.bool or hit.shape not in ((), (rows,)):
                raise ValueError(f"stopping criterion {criterion!r} must return a bool tensor of shape [{rows}], "
                                 f"got {hit!r:.200}")
            done = done | hit
        return done
