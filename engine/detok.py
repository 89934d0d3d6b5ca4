"""Incremental detokenization: text deltas from a growing list of token ids.

Only a short window is decoded per step (from `prefix` to the end), never the whole reply. A delta is
held back while the window ends in an incomplete UTF-8 sequence (the tokenizer yields U+FFFD).
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoded context that makes spacing right
        self.read = 0  # ids before this are already emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the new text they complete (may be empty)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
