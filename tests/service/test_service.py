"""RagCache as a library: ingest, query, delete, idempotence, bad input, crashes, restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragcache.chunkstore.purge import stored_chunks
from ragcache.config import Config
from ragcache.corpus.manifest import MANIFEST_FILE
from ragcache.engine.sampling_params import SamplingParams
from ragcache.errors import (
    DataDirError,
    InvalidInputError,
    InvalidParameterError,
    NotFoundError,
    PromptTooLongError,
    UnsupportedTypeError,
)
from ragcache.service import RagCache
from ragcache.service.chunk_gc import token_digest
from tests.service_helpers import (
    SAMPLES,
    minilm,
    tiny_config,
    tiny_flags,
    tiny_loaded,
)

Invalid = InvalidParameterError
QUESTION = "What did Lincoln say at Gettysburg about the nation?"
GETTYSBURG = SAMPLES / "gettysburg_address.md"


def open_service(data_dir: Path, **service_fields: object) -> RagCache:
    config = tiny_config(data_dir)
    for name, value in service_fields.items():
        setattr(config.service, name, value)
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


def corpus_snapshot(rag: RagCache, corpus: str) -> tuple[object, ...]:
    """Everything a corpus is on disk: its record, document records and index files."""
    info = rag.get_corpus(corpus)
    documents = sorted(
        (d.doc_id, d.content_hash, tuple(d.chunk_ids)) for d in rag.list_documents(corpus)
    )
    files = sorted(str(p.relative_to(rag.data_dir)) for p in (rag.data_dir / "indexes").rglob("*"))
    return info, documents, files


@pytest.fixture(scope="module")
def rag(tmp_path_factory: pytest.TempPathFactory):
    """One corpus shared by the tests that leave it unchanged (they check that they do)."""
    with open_service(tmp_path_factory.mktemp("shared") / "data") as service:
        service.create_corpus("docs")
        service.ingest([GETTYSBURG, SAMPLES / "tale_of_two_cities_opening.txt"], "docs")
        yield service


def test_ingest_query_delete_round_trip(tmp_path: Path) -> None:
    with open_service(tmp_path / "data") as rag:
        rag.create_corpus("sample")
        result = rag.ingest([SAMPLES], "sample")
        assert len(result.added) == 4 and not result.skipped
        assert result.kv_chunks_computed == result.chunks_added > 0
        info = rag.get_corpus("sample")
        assert (info.num_documents, info.num_chunks) == (4, result.chunks_added)

        answer = rag.query(QUESTION, "sample")
        assert answer.sources and answer.sources[0].source.endswith("gettysburg_address.md")
        assert answer.completion_tokens >= 1 and answer.finish_reason in ("stop", "length")
        assert answer.cache.method == "cacheblend"
        assert answer.cache.tokens_by_tier and answer.cache.computed_tokens == 0
        assert answer.cache.recomputed_tokens > 0
        assert set(answer.timings) >= {"retrieval", "cache_fetch", "fusion", "decode", "ttft"}

        gettysburg = answer.sources[0].doc_id
        rag.delete_document("sample", gettysburg)
        assert rag.get_corpus("sample").num_documents == 3
        assert all(s.doc_id != gettysburg for s in rag.retrieve(QUESTION, "sample", k=10))

        rag.delete_corpus("sample")
        assert rag.list_corpora() == []
        assert not any((rag.data_dir / "indexes").iterdir())


def test_the_store_weighs_chunks_by_the_measured_prefill_cost(rag: RagCache) -> None:
    (record_path,) = (rag.data_dir / "calibration").glob("cost-*.json")
    record = json.loads(record_path.read_text())
    assert record["fingerprint"] == rag.loaded.fingerprint
    measured = record["cost_model"]
    assert rag.cache_stats()["chunks"]["cost_model"] == {
        "per_token_s": measured["per_token"],
        "per_token_pair_s": measured["per_token_pair"],
        "per_call_s": measured["fixed"],
    }


def test_reingesting_the_same_files_adds_nothing(rag: RagCache) -> None:
    before = corpus_snapshot(rag, "docs")
    again = rag.ingest([GETTYSBURG, (GETTYSBURG.read_bytes(), "copy-of-gettysburg.md")], "docs")
    assert again.added == [] and len(again.skipped) == 2 and again.chunks_added == 0
    assert corpus_snapshot(rag, "docs") == before


def test_every_fusion_method_answers(rag: RagCache) -> None:
    for method in (
        "full_prefill",
        "prefix_only",
        "full_reuse",
        "cacheblend",
        "legolink",
        "gradual",
        "cachefocus",
    ):
        result = rag.query(QUESTION, "docs", method=method, k=2)
        assert result.cache.method == method and result.completion_tokens >= 1
    full = rag.query(QUESTION, "docs", method="full_prefill", k=2)
    assert full.cache.reused_tokens == 0 and full.cache.tokens_by_tier == {}


BAD_UPLOADS = {
    "unknown corpus": ([GETTYSBURG], "nope", NotFoundError, "corpus"),
    "empty document": ([(b"  \n ", "empty.txt")], "docs", InvalidInputError, "files"),
    "undecodable": ([(b"\xff\xfe\x00\x9c bad", "bad.txt")], "docs", InvalidInputError, "files"),
    "unsupported type": ([(b"MZ\x90", "tool.exe")], "docs", UnsupportedTypeError, "files"),
    "good then bad": (
        [SAMPLES / "declaration_of_independence.txt", (b"", "empty.md")],
        "docs",
        InvalidInputError,
        "files",
    ),
    "missing path": ([SAMPLES / "missing.txt"], "docs", InvalidInputError, "paths"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_change_nothing(rag: RagCache, case: str) -> None:
    sources, corpus, error, param = BAD_UPLOADS[case]
    before = corpus_snapshot(rag, "docs")
    with pytest.raises(error) as caught:
        rag.ingest(sources, corpus)
    assert caught.value.param == param and caught.value.message
    assert corpus_snapshot(rag, "docs") == before


BAD_QUERIES = {
    "empty question": (dict(text="  "), InvalidInputError, "query"),
    "unknown corpus": (dict(corpus="nope"), NotFoundError, "corpus"),
    "k zero": (dict(k=0), InvalidParameterError, "k"),
    "unknown method": (dict(method="magic"), InvalidParameterError, "method"),
    "check layer": (dict(method_params={"check_layer": 9}), InvalidParameterError, "check_layer"),
    "check layer zero": (
        dict(method_params={"check_layer": 0}),
        InvalidParameterError,
        "check_layer",
    ),
    "check layer past gradual's last": (
        dict(method="gradual", method_params={"check_layer": 3}),
        InvalidParameterError,
        "check_layer",
    ),
    "ratio": (
        dict(method_params={"recompute_ratio": 2.0}),
        InvalidParameterError,
        "recompute_ratio",
    ),
    "max tokens": (
        dict(sampling=SamplingParams(max_tokens=0)),
        InvalidParameterError,
        "max_tokens",
    ),
    "top p": (dict(sampling=SamplingParams(top_p=0.0)), InvalidParameterError, "top_p"),
    "too long": (dict(text="liberty and union " * 2000), PromptTooLongError, "k"),
    "focus keep": (
        dict(method="cachefocus", method_params={"focus_keep": 0.0}),
        InvalidParameterError,
        "focus_keep",
    ),
    "focus order": (
        dict(method="cachefocus", method_params={"focus_order": "shuffled"}),
        InvalidParameterError,
        "focus_order",
    ),
    "focus layers": (
        dict(method="cachefocus", method_params={"focus_layers": 9}),
        InvalidParameterError,
        "focus_layers",
    ),
    "craft insensitive": (
        dict(method="cachecraft", method_params={"craft_insensitive": -0.1}),
        InvalidParameterError,
        "craft_insensitive",
    ),
    "craft contexts": (
        dict(method="cachecraft", method_params={"craft_min_contexts": 0}),
        InvalidParameterError,
        "craft_min_contexts",
    ),
    "deterministic": (
        dict(method_params={"deterministic": "yes"}),
        InvalidParameterError,
        "deterministic",
    ),
    "focus base": (
        dict(method="cachefocus", method_params={"focus_base": "cachefocus"}),
        InvalidParameterError,
        "focus_base",
    ),
}


@pytest.mark.parametrize("case", list(BAD_QUERIES))
def test_bad_queries_name_the_field(rag: RagCache, case: str) -> None:
    overrides, error, param = BAD_QUERIES[case]
    arguments = {"text": QUESTION, "corpus": "docs", **overrides}
    before = corpus_snapshot(rag, "docs")
    with pytest.raises(error) as caught:
        rag.query(arguments.pop("text"), arguments.pop("corpus"), **arguments)
    assert caught.value.param == param
    assert corpus_snapshot(rag, "docs") == before


def test_cachefocus_reports_the_chunks_it_pruned(rag: RagCache) -> None:
    params = {"focus_keep": 0.5, "focus_base": "cacheblend", "recompute_ratio": 0.2}
    focus = rag.query(QUESTION, "docs", k=3, method="cachefocus", method_params=params)
    reuse = rag.query(QUESTION, "docs", k=3, method="full_reuse")
    cache = focus.cache
    assert cache.method == "cachefocus" and cache.pruned_chunks == 1 and cache.pruned_tokens > 0
    assert [s.chunk_id for s in focus.sources] == [s.chunk_id for s in reuse.sources]
    assert sum(s.pruned for s in focus.sources) == 1
    assert focus.prompt_tokens == reuse.prompt_tokens - cache.pruned_tokens
    assert cache.recomputed_tokens > 0 and cache.reused_tokens > 0
    assert sum(cache.tokens_by_tier.values()) == sum(reuse.cache.tokens_by_tier.values())
    assert focus.completion_tokens >= 1


def test_cachefocus_prunes_a_too_long_context_to_fit(rag: RagCache) -> None:
    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES.iterdir())]
    documents = [f"{texts[i - 1]} {texts[i]}" for i in range(len(texts))]
    limit = rag.engine.max_model_len
    with pytest.raises(PromptTooLongError):
        rag.prepare_documents(documents, QUESTION, "full_reuse")
    prepared = rag.prepare_documents(documents, QUESTION, "cachefocus")
    assert len(prepared.prompt_ids) < limit <= len(rag.prompts.encode(" ".join(documents)))
    assert prepared.usage.pruned_chunks == sum(s.pruned for s in prepared.sources) >= 1

    async def answer() -> list[int]:
        return [out async for out in rag.generate(prepared)][-1].token_ids

    assert len(asyncio.run(answer())) >= 1
    with pytest.raises(PromptTooLongError, match="even pruned to its shortest chunk"):
        rag.prepare_documents([" ".join(documents)], QUESTION, "cachefocus")


def test_lazy_mode_computes_chunk_kv_at_the_first_query(tmp_path: Path) -> None:
    with open_service(tmp_path / "data", kv_precompute="lazy") as rag:
        rag.create_corpus("docs")
        assert rag.ingest([GETTYSBURG], "docs").kv_chunks_computed == 0
        first = rag.query(QUESTION, "docs", k=2)
        second = rag.query(QUESTION, "docs", k=2)
    assert first.cache.computed_tokens > 0 and first.cache.tokens_by_tier == {}
    assert second.cache.computed_tokens == 0 and second.cache.tokens_by_tier.get("host", 0) > 0
    assert second.answer == first.answer


def test_restart_gives_the_same_answers_from_the_disk_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_service(data) as rag:
        rag.create_corpus("sample")
        rag.ingest([SAMPLES], "sample")
        before = rag.query(QUESTION, "sample")
    with open_service(data) as rag:
        assert [c.name for c in rag.list_corpora()] == ["sample"]
        after = rag.query(QUESTION, "sample")
        stats = rag.cache_stats()["chunks"]
    assert after.answer == before.answer
    assert [s.chunk_id for s in after.sources] == [s.chunk_id for s in before.sources]
    assert after.cache.computed_tokens == 0 and after.cache.tokens_by_tier.get("disk", 0) > 0
    assert stats["tiers"]["disk"]["hits"] >= len(after.sources)


def test_a_data_dir_of_another_model_is_refused(tmp_path: Path) -> None:
    from tests.conftest import loaded_from_hf, random_hf_model

    data = tmp_path / "data"
    with open_service(data):
        pass
    tokenizer = tiny_loaded().tokenizer
    other = loaded_from_hf(random_hf_model("llama", seed=1, vocab_size=len(tokenizer)), tokenizer)
    with pytest.raises(DataDirError, match="was built for model"):
        RagCache(config=tiny_config(data), loaded=other, embedder=minilm())
    assert json.loads((data / MANIFEST_FILE).read_text())["model_fingerprint"] == (
        tiny_loaded().fingerprint
    )


KILLED_INGEST = """
import json, sys, time
from pathlib import Path
from ragcache.config import load_config
from ragcache.service import RagCache
from ragcache.service.chunk_gc import token_digest

flags, stage, marker = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def progress(name, done, total):
    if name == stage:
        marker.write_text(name)
        time.sleep(600)

rag = RagCache(config=load_config(flags=flags, environ={}))
rag.ingest(sys.argv[4:], "docs", progress=progress)
"""


@pytest.mark.parametrize("stage", ["chunk", "embed", "kv", "commit"])
def test_an_ingest_killed_midway_leaves_the_corpus_as_before(tmp_path: Path, stage: str) -> None:
    data = tmp_path / "data"
    with open_service(data) as rag:
        rag.create_corpus("docs")
        rag.ingest([GETTYSBURG], "docs")
        before = corpus_snapshot(rag, "docs")
    script = tmp_path / "ingest.py"
    script.write_text(KILLED_INGEST)
    marker = tmp_path / "reached"
    others = [str(p) for p in sorted(SAMPLES.iterdir()) if p != GETTYSBURG]
    child = subprocess.Popen(
        [sys.executable, str(script), json.dumps(tiny_flags(data)), stage, str(marker), *others],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, "the ingest process ended before the kill point"
            assert time.monotonic() < deadline, "the ingest process never reached the kill point"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with open_service(data) as rag:
        assert corpus_snapshot(rag, "docs") == before
        # The start-up collection removed the chunk KV the killed ingest computed.
        assert rag.corpora.pending() == []
        cached = {token_digest(chunk.token_ids) for chunk in stored_chunks(rag.store)}
        assert cached == rag.collector.live_digests("")
        assert rag.query(QUESTION, "docs", k=2).sources
        assert len(rag.ingest(others, "docs").added) == len(others)


def test_unknown_kv_precompute_mode_is_refused(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path))
    config.service.kv_precompute = "sometimes"
    with pytest.raises(InvalidParameterError, match="kv_precompute"):
        RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


@pytest.mark.slow
def test_smollm2_answers_from_the_sample_corpus(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"))
    config.service.max_tokens = 24
    with RagCache(config=config, embedder=minilm()) as rag:
        rag.ingest([SAMPLES], "sample", create=True)
        cold = rag.query(QUESTION, "sample")
        full = rag.query(QUESTION, "sample", method="full_prefill")
    assert cold.sources[0].source.endswith("gettysburg_address.md")
    assert cold.answer.strip() and full.answer.strip()
    assert cold.cache.tokens_by_tier.get("host", 0) > 0 and cold.cache.computed_tokens == 0
    print(f"cacheblend: {cold.answer!r} ttft {cold.timings['ttft']:.3f} s")
    print(f"full prefill: {full.answer!r} ttft {full.timings['ttft']:.3f} s")
