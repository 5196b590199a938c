"""Text streamers for ``generate(streamer=...)`` (transformers' ``put(ids)`` / ``end()`` protocol)."""
import queue
import sys
from typing import Callable, List, Optional


class TextStreamer:
    """Decodes each row's tokens as they arrive and hands out the new text of every row.

    ``on_text(row, text)`` receives only the text added since the last call (default: print row 0
    to stdout, like transformers' TextStreamer for batch size 1). As in transformers, text is handed
    out up to its last space or newline: a later token can still change the word being formed (the
    space before a word may appear only with the next piece), and an incomplete UTF-8 sequence
    decodes to U+FFFD. ``end()`` hands out the rest and readies the streamer for the next call.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 on_text: Optional[Callable[[int, str], None]] = None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.on_text = on_text or self._print
        self.tokens: List[List[int]] = []
        self.emitted: List[int] = []
        self._prompt_seen = False

    @staticmethod
    def _print(row: int, text: str):
        if row == 0:
            print(text, end="", flush=True, file=sys.stdout)

    def put(self, ids):
        ids = ids.reshape(ids.shape[0], -1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            self.tokens = [[] for _ in ids]
            self.emitted = [0 for _ in ids]
            if self.skip_prompt:
                return
        for row, new in enumerate(ids):
            self.tokens[row].extend(new)
            self._flush(row, final=False)

    def _flush(self, row: int, final: bool):
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=self.skip_special_tokens)
        if not final:
            text = text[:max(text.rfind(" "), text.rfind("\n")) + 1]
        if len(text) > self.emitted[row]:
            self.on_text(row, text[self.emitted[row]:])
            self.emitted[row] = len(text)

    def end(self):
        for row in range(len(self.tokens)):
            self._flush(row, final=True)
        self._prompt_seen = False  # the next generate() starts with its own prompt
        self.on_end()

    def on_end(self):
        if self.on_text == self._print:
            print(flush=True)


class TextIteratorStreamer(TextStreamer):
    """Iterate over ``(row, new_text)`` pairs while ``generate`` runs in another thread."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 timeout: Optional[float] = None):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens, on_text=self._enqueue)
        self.queue: "queue.Queue" = queue.Queue()
        self.timeout = timeout

    def _enqueue(self, row: int, text: str):
        self.queue.put((row, text))

    def on_end(self):
        self.queue.put(None)

    def __iter__(self):
        while True:
            item = self.queue.get(timeout=self.timeout)
            if item is None:
                return
            yield item
