"""Turning a growing list of token ids into text pieces that are safe to send.

Two small state machines, one per request, neither thread-safe nor needing to be:
`IncrementalDecoder` emits text only once it decodes cleanly (a byte-level token can be
half of a UTF-8 character), and `StopMatcher` holds back just enough text that nothing
sent can later turn out to be part of a stop sequence. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
"""What a decoder produces for bytes that are not (yet) a whole UTF-8 character."""
MAX_CHARACTER_BYTES = 4
"""The longest UTF-8 sequence: a character still missing bytes began in the last three
tokens, since each token adds at least one byte."""
HELD_TOKENS = MAX_CHARACTER_BYTES + 4
"""The most tokens `IncrementalDecoder` holds back. A few more than a character's bytes, so
that a token without text in between does not cut a character; a longer run that still
decodes to U+FFFD is invalid bytes, which are released as such."""


class IncrementalDecoder:
    """Decodes one token at a time, emitting only text that will not change.

    `decode` turns a list of ids into text, as `tokenizer.decode` does. Each `push`
    re-decodes a short window starting at the last clean boundary and returns the text
    the new token completed, or "" while the window ends in U+FFFD (a character still
    missing bytes) or the token added no text (a skipped special token). It never holds
    more than `HELD_TOKENS` tokens: past that, all but the last few are released, invalid
    bytes as U+FFFD, so a run of them costs each push a bounded window, not the whole run.
    `flush` returns whatever is still held, replacement characters included, at the end
    of a stream.
    Decoding from the last clean boundary keeps tokenizers whose pieces depend on the
    previous token (SentencePiece's leading spaces) right.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded for context
        self._read = 0  # end of the text already emitted, in ids

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(emitted) and not window.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(emitted) :]
        if len(self._ids) - self._read <= HELD_TOKENS:
            return ""
        # Too long to be one character missing bytes: release all but the tokens that
        # could still begin one.
        end = len(self._ids) - (MAX_CHARACTER_BYTES - 1)
        released = self._decode(self._ids[self._prefix : end])
        self._prefix, self._read = self._read, end
        return released[len(emitted) :]

    def flush(self) -> str:
        """Return the text still held back, even if it ends in an incomplete character."""
        if self._read == len(self._ids):
            return ""
        emitted = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return window[len(emitted) :]


class StopMatcher:
    """Cuts a text stream before the first stop string to appear.

    "First" is the one whose last character arrives first, as if the text came one
    character at a time (generation would have ended there); among stops completed by
    the same character, the one starting earliest. So the result does not depend on
    how the text was split into pieces.

    `feed` takes the next piece of text and returns `(safe, stopped)`: `safe` is text
    that can be sent now; once `stopped` is true the stream is over and later calls
    return `("", True)`. Until then the last `len(longest stop) - 1` characters are held
    back, since they might be the start of a stop string; `flush` releases them at the
    end. A stop string can only start in held-back text, so searching that is enough.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return what may be sent and whether a stop string was reached."""
        if self._stopped:
            return "", True
        before = len(self._pending)
        self._pending += text
        cut = self._first_stop(before)
        if cut is not None:
            safe, self._pending, self._stopped = self._pending[:cut], "", True
            return safe, True
        split = len(self._pending) - min(self._hold, len(self._pending))
        safe, self._pending = self._pending[:split], self._pending[split:]
        return safe, False

    def flush(self) -> str:
        """Release the held-back text at the end of a stream that did not stop."""
        safe, self._pending = self._pending, ""
        return safe

    def _first_stop(self, before: int) -> int | None:
        """Start of the stop string that ends first in the pending text, if any.

        No stop ended within the first `before` characters (the last feed would have
        stopped), so each occurrence ends in the new text; for one stop string the
        leftmost such occurrence also ends first.
        """
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = self._pending.find(stop, max(0, before - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]
