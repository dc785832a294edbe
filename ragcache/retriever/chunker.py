"""Cut documents into chunks measured in model tokens, at the most natural boundary.

A chunk ends at a paragraph end when one leaves the chunk at least ``min_fill`` full,
else at a sentence end, else where the next piece no longer fits; a sentence longer than
the target is cut between tokens. Every chunk is tokenized alone, so its token ids are
the same in every prompt it joins.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.documents import Document

HARD, SENTENCE, PARAGRAPH = 0, 1, 2
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bNo)(?<!\bvs)(?<!\b[A-Z])"
    r"[.!?…]+[\"'”’)\]]*(?=\s)|\n"
)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(slots=True)
class Chunk:
    doc_id: str
    index: int
    char_start: int
    char_end: int
    text: str
    token_ids: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def vector_id(self) -> int:
        """Stable non-negative int64 naming this chunk in a vector index."""
        digest = hashlib.blake2b(f"{self.doc_id}\x00{self.index}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") >> 1


@dataclass(slots=True)
class _Piece:
    start: int
    end: int
    tokens: int
    boundary: int


class Chunker:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_tokens: int = 512,
        overlap: int = 0,
        min_fill: float = 0.5,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 <= overlap < chunk_tokens:
            raise ValueError(f"overlap must be in [0, chunk_tokens={chunk_tokens}), got {overlap}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.min_fill = min_fill

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, config: RetrieverConfig) -> Chunker:
        return cls(tokenizer, config.chunk_tokens, config.chunk_overlap, config.chunk_min_fill)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chunk(self, document: Document) -> list[Chunk]:
        chunks = []
        for index, (start, end) in enumerate(self.spans(document.text)):
            text = document.text[start:end]
            metadata = {**document.metadata, "source": document.source}
            chunks.append(
                Chunk(document.doc_id, index, start, end, text, self.encode(text), metadata)
            )
        return chunks

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the chunks of ``text``, in order."""
        pieces = list(self._pieces(text))
        spans: list[tuple[int, int]] = []
        current: list[_Piece] = []
        for piece in pieces:
            current.append(piece)
            while self._estimate(current) > self.chunk_tokens:
                cut = self._emit(text, current[:-1], spans)
                current = self._overlap_tail(current[:cut], current[cut:])
        while current:
            cut = self._emit(text, current, spans)
            current = current[cut:]
        return spans

    def _emit(self, text: str, pieces: list[_Piece], spans: list[tuple[int, int]]) -> int:
        """Append the span of the best leading run of ``pieces``; return how many it took."""
        limit = len(pieces)
        while True:
            cut = self._best_cut(pieces[:limit])
            # Estimates add pieces counted alone; the exact count of the joined text decides.
            if cut == 1 or self._exact(text, pieces[:cut]) <= self.chunk_tokens:
                break
            limit = cut - 1
        spans.append((pieces[0].start, pieces[cut - 1].end))
        return cut

    def _best_cut(self, pieces: list[_Piece]) -> int:
        floor = self.min_fill * self.chunk_tokens
        for boundary in (PARAGRAPH, SENTENCE):
            for cut in range(len(pieces), 0, -1):
                if pieces[cut - 1].boundary >= boundary:
                    if self._estimate(pieces[:cut]) >= floor:
                        return cut
                    break
        return len(pieces)

    def _overlap_tail(self, emitted: list[_Piece], rest: list[_Piece]) -> list[_Piece]:
        tail: list[_Piece] = []
        for piece in reversed(emitted):
            if self._estimate([piece, *tail]) > self.overlap:
                break
            tail.insert(0, piece)
        while tail and self._estimate(tail + rest) > self.chunk_tokens:
            tail.pop(0)
        if len(tail) == len(emitted):
            tail = tail[1:]  # the next chunk must start past the previous one's start
        return tail + rest

    def _estimate(self, pieces: Sequence[_Piece]) -> int:
        return sum(piece.tokens for piece in pieces)

    def _exact(self, text: str, pieces: Sequence[_Piece]) -> int:
        return len(self.encode(text[pieces[0].start : pieces[-1].end]))

    def _pieces(self, text: str) -> Iterator[_Piece]:
        """Sentences (or token-cut parts of long ones), each stripped of outer whitespace."""
        for para_start, para_end in _split(text, 0, len(text), _PARAGRAPH_BREAK):
            sentences = list(_split(text, para_start, para_end, _SENTENCE_END))
            for number, (start, end) in enumerate(sentences):
                parts = self._token_cut(text, start, end)
                last_sentence = number == len(sentences) - 1
                for part_number, (part_start, part_end, tokens) in enumerate(parts):
                    if part_number < len(parts) - 1:
                        boundary = HARD
                    else:
                        boundary = PARAGRAPH if last_sentence else SENTENCE
                    yield _Piece(part_start, part_end, tokens, boundary)

    def _token_cut(self, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
        """(start, end, tokens) parts of text[start:end], each at most chunk_tokens long."""
        parts = []
        while start < end:
            tokens = len(self.encode(text[start:end]))
            if tokens <= self.chunk_tokens:
                parts.append((start, end, tokens))
                break
            cut = self._longest_fitting_end(text, start, end)
            parts.append((start, cut, len(self.encode(text[start:cut]))))
            start = _skip_space(text, cut, end)
        return parts

    def _longest_fitting_end(self, text: str, start: int, end: int) -> int:
        starts = self._token_starts(text[start:end])
        if starts is not None:
            for count in range(self.chunk_tokens, 0, -1):
                cut = start + len(text[start : start + starts[count]].rstrip())
                if cut > start and self._fits(text[start:cut]):
                    return cut
        # No offsets: the largest end whose span still fits, by bisection on characters.
        low, high = start + 1, end - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(text[start:middle].rstrip()):
                low = middle
            else:
                high = middle - 1
        fitted = text[start:low].rstrip()
        if not self._fits(fitted):
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens} is smaller than the tokens of one "
                f"character ({fitted!r})"
            )
        return start + len(fitted)

    def _fits(self, text: str) -> bool:
        return len(self.encode(text)) <= self.chunk_tokens

    def _token_starts(self, text: str) -> list[int] | None:
        """Character start of every token of ``text``, when the tokenizer gives offsets."""
        if not callable(self.tokenizer):
            return None
        try:
            encoding = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
            offsets = encoding["offset_mapping"]
        except (TypeError, KeyError, NotImplementedError, ValueError):
            return None
        if len(offsets) <= self.chunk_tokens:
            return None
        return [int(offset[0]) for offset in offsets]


def _split(
    text: str, start: int, end: int, separator: re.Pattern[str]
) -> Iterator[tuple[int, int]]:
    """Non-blank spans of text[start:end] between separator matches, stripped."""
    position = start
    for match in separator.finditer(text, start, end):
        yield from _stripped(text, position, match.end())
        position = match.end()
    yield from _stripped(text, position, end)


def _stripped(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    segment = text[start:end]
    left = len(segment) - len(segment.lstrip())
    right = len(segment.rstrip())
    if left < right:
        yield start + left, start + right


def _skip_space(text: str, position: int, end: int) -> int:
    while position < end and text[position].isspace():
        position += 1
    return position
