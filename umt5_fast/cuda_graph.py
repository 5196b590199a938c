"""Single-token decode steps replayed from a captured CUDA graph.

A graph needs static shapes and storage, so the decoder state lives in ``GraphedStep`` buffers
kept on the model per (row bucket, cache length, source length, dtype): rows are padded up to a
power-of-two bucket, and a later ``generate`` call of the same bucket copies its encoder output
into the buffers and replays the same graph. The step reads its position from a device tensor
(the cache write is an ``index_copy_``, the decode-attention kernel loads the length), so nothing
in the graph depends on a host value. The first token of a call (which also projects the
cross-attention K/V) and multi-token prompts run eagerly on the same buffers.
"""
import threading

import torch

from umt5_fast.cache import StaticCache
from umt5_fast.generation import next_token_logits

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def bucket_rows(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


class GraphedStep:
    """Static buffers and the captured graph of one decode-step shape."""

    def __init__(self, model, rows: int, max_length: int, source_length: int, dtype, device):
        cfg = model.config
        self.model = model
        self.cache = StaticCache(cfg.num_decoder_layers, rows, cfg.num_heads, max_length, cfg.d_kv, dtype, device,
                                 fixed_buffers=True)
        self.encoder_states = torch.zeros(rows, source_length, cfg.d_model, dtype=dtype, device=device)
        self.encoder_mask = torch.ones(rows, source_length, dtype=torch.bool, device=device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        self.captured_cross_kv = None
        self.in_use = threading.Lock()

    def forward(self, tokens, past_length):
        return next_token_logits(self.model, tokens, self.encoder_states, self.encoder_mask, self.cache,
                                 past_length)

    def prefill(self, tokens):
        """Eager step from position 0: (re)projects the cross-attention K/V into the graph's tensors."""
        self.cache.length = 0
        self.cache.cross_kv = [None] * self.cache.num_layers
        logits = self.forward(tokens, 0)
        if self.captured_cross_kv is None:
            self.captured_cross_kv = list(self.cache.cross_kv)
        else:  # the graph reads the tensors it was captured with: refill them
            for (k_old, v_old), (k_new, v_new) in zip(self.captured_cross_kv, self.cache.cross_kv):
                k_old.copy_(k_new)
                v_old.copy_(v_new)
            self.cache.cross_kv = list(self.captured_cross_kv)
        self.cache.length = tokens.shape[1]
        return logits

    def decode(self, tokens):
        """One token a row at position ``cache.length``: replay (capturing on first use)."""
        self.token.copy_(tokens)
        self.position.fill_(self.cache.length)
        if self.graph is None:
            stream = torch.cuda.Stream()  # warm up (allocator, kernel compilation) off the main stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self.forward(self.token, self.position)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # recorded, not run: the warm-up computed this step
                self.logits = self.forward(self.token, self.position)
            self.graph = graph
        else:
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits


class GraphedDecoder:
    """The ``generation.Decoder`` interface over a shared ``GraphedStep`` (rows padded to a bucket)."""

    def __init__(self, model, encoder_states, encoder_mask, max_length: int):
        self.rows, source_length = encoder_states.shape[:2]
        bucket = bucket_rows(self.rows)
        steps = model.__dict__.setdefault("_graphed_steps", {})
        key = (bucket, max_length, source_length, encoder_states.dtype)
        step = steps.get(key)
        if step is None or not step.in_use.acquire(blocking=False):
            # first of its shape, or busy in another thread: private buffers for this call
            step = GraphedStep(model, bucket, max_length, source_length, encoder_states.dtype,
                               encoder_states.device)
            step.in_use.acquire()
            steps.setdefault(key, step)
        self.step_state = step
        step.encoder_states.zero_()
        step.encoder_states[:self.rows] = encoder_states
        step.encoder_mask.fill_(True)
        if encoder_mask is not None:
            step.encoder_mask[:self.rows] = encoder_mask
        self.cache = step.cache
        self.pad_rows = torch.zeros(bucket - self.rows, dtype=torch.long, device=encoder_states.device)

    def step(self, tokens, reuse_memory=False):  # (the graph's own output buffer is copied out anyway)
        if self.pad_rows.numel():
            tokens = torch.cat([tokens, self.pad_rows[:, None].expand(-1, tokens.shape[1])])
        state = self.step_state
        logits = state.prefill(tokens) if self.cache.length == 0 or tokens.shape[1] > 1 else state.decode(tokens)
        return logits[:self.rows].clone()

    def reorder(self, index):
        if self.pad_rows.numel():  # padding rows stay where they are
            index = torch.cat([index, torch.arange(self.rows, self.rows + self.pad_rows.numel(), device=index.device)])
        self.cache.reorder(index)

    def close(self):
        self.step_state.in_use.release()
