"""Incremental detokenization with stop strings, one `RequestDetokenizer` per request.

Token ids become text through tokenizers' `DecodeStream`, which holds back bytes until they form whole
UTF-8 characters, so a streamed delta never contains half a character. Stop strings are matched on the
text: text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


@dataclass
class DetokResult:
    text: str  # new text to stream now
    stopped: bool = False  # a stop string matched; text ends just before it


@dataclass
class RequestDetokenizer:
    tokenizer: Tokenizer
    stop: list[str] = field(default_factory=list)
    stream: DecodeStream = field(init=False)
    held: str = field(init=False, default="")  # decoded text not yet sent: may be the start of a stop string
    stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in self.stop if s]

    def feed(self, token_ids: list[int]) -> DetokResult:
        if self.stopped:
            return DetokResult("", stopped=True)
        pieces = [self.held]
        for tid in token_ids:
            piece = self.stream.step(self.tokenizer, tid)
            if piece:
                pieces.append(piece)
        text = "".join(pieces)
        if not self.stop:
            self.held = ""
            return DetokResult(text)
        # Earliest complete stop string wins.
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return DetokResult(text[:cut], stopped=True)
        keep = self._partial_stop_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return DetokResult(text[: len(text) - keep])

    def flush(self) -> str:
        """At the end of the request: whatever was held back is plain text after all."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
