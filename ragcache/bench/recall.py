"""Retrieval recall on MuSiQue: every passage of every question forms one corpus.

    python -m ragcache.bench.recall --data ../shared/data/musique_dev.json \
        --out eval/reports/retrieval_musique.json

For each question, recall@k is the fraction of its own (deduplicated) passages found in
the top k of the whole corpus; hit@k says whether at least one of them is there. A
question owns about ten passages, so recall@1 is at most about 0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragcache.bench.report import bench_parser, command_line, write_report
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.embedder import SentenceTransformerEmbedder
from ragcache.retriever.retriever import Retriever

CUTOFFS = (1, 5, 10)


@dataclass(slots=True)
class Corpus:
    passages: list[str]
    questions: list[str]
    owned: list[set[int]]
    num_listed: int


def load_corpus(path: Path) -> Corpus:
    """Passages embedded as 'title\\ntext'; identical passages share one id."""
    items = json.loads(path.read_text(encoding="utf-8"))
    ids: dict[str, int] = {}
    questions, owned, num_listed = [], [], 0
    for item in items:
        own = set()
        for context in item["ctxs"]:
            title, text = context.get("title", "").strip(), context["text"].strip()
            passage = f"{title}\n{text}" if title else text
            own.add(ids.setdefault(passage, len(ids)))
            num_listed += 1
        questions.append(item["question"])
        owned.append(own)
    return Corpus(list(ids), questions, owned, num_listed)


def run(args: argparse.Namespace) -> dict[str, object]:
    corpus = load_corpus(Path(args.data))
    threshold = {"auto": RetrieverConfig().hnsw_threshold, "flat": 2**62, "hnsw": 0}[args.index]
    config = RetrieverConfig(
        embedder=args.embedder,
        embed_batch_size=args.batch_size,
        show_progress=not args.no_progress,
        hnsw_threshold=threshold,
    )
    embedder = SentenceTransformerEmbedder.from_config(config)
    started = time.perf_counter()
    embedder.embed(["warm-up"])
    load_seconds = time.perf_counter() - started
    retriever = Retriever(embedder, config=config)

    started = time.perf_counter()
    vectors = embedder.embed(corpus.passages, batch_size=args.batch_size)
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    retriever.index.add(np.arange(len(corpus.passages)), vectors)
    index_seconds = time.perf_counter() - started

    depth = max(CUTOFFS)
    started = time.perf_counter()
    rankings = [[hit.chunk_id for hit in retriever.retrieve(q, depth)] for q in corpus.questions]
    query_seconds = time.perf_counter() - started

    recall = {k: [] for k in CUTOFFS}
    hit = {k: [] for k in CUTOFFS}
    for ranking, own in zip(rankings, corpus.owned, strict=True):
        for k in CUTOFFS:
            found = len(own.intersection(ranking[:k]))
            recall[k].append(found / len(own))
            hit[k].append(float(found > 0))
    return {
        "command": command_line("recall"),
        "data": str(args.data),
        "questions": len(corpus.questions),
        "passages_listed": corpus.num_listed,
        "passages_unique": len(corpus.passages),
        "embedder": config.embedder,
        "dim": embedder.dim,
        "index_kind": retriever.index.kind,
        **{f"recall@{k}": round(float(np.mean(recall[k])), 4) for k in CUTOFFS},
        **{f"hit@{k}": round(float(np.mean(hit[k])), 4) for k in CUTOFFS},
        "model_load_s": round(load_seconds, 2),
        "embed_s": round(embed_seconds, 2),
        "index_add_s": round(index_seconds, 4),
        "index_build_s": round(embed_seconds + index_seconds, 2),
        "passages_per_s": round(len(corpus.passages) / embed_seconds, 1),
        "queries_per_s": round(len(corpus.questions) / query_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
    }


def table(report: dict[str, object]) -> str:
    rows = [
        ("questions", report["questions"]),
        ("passages listed / unique", f"{report['passages_listed']} / {report['passages_unique']}"),
        ("embedder (dim)", f"{report['embedder']} ({report['dim']})"),
        ("index", report["index_kind"]),
        *((f"recall@{k}", f"{report[f'recall@{k}']:.4f}") for k in CUTOFFS),
        *((f"hit@{k}", f"{report[f'hit@{k}']:.4f}") for k in CUTOFFS),
        ("index build s (embed + add)", report["index_build_s"]),
        ("passages embedded/s", report["passages_per_s"]),
        ("queries/s (embed + search, one at a time)", report["queries_per_s"]),
        ("machine", report["machine"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def markdown(report: dict[str, object]) -> str:
    return (
        f"    {report['command']}\n\n"
        "# Retrieval recall on MuSiQue (100 dev questions)\n\n"
        "All passages of all questions form one corpus (identical passages deduplicated); "
        "each question is searched against the whole corpus. recall@k: fraction of the "
        "question's own passages in the top k. hit@k: at least one of them in the top k. "
        "A question owns about ten passages, so recall@1 cannot exceed about 0.1.\n\n"
        f"{table(report)}\n\n"
        "The ten passages of a question were retrieved for it and share its topic, while "
        "the questions cover unrelated topics, so scores near 1 show that ingestion, "
        "embedding and search are sound; they do not separate good embedders from better "
        "ones. Throughput figures are from a shared 2-core CPU machine and vary with its "
        "load.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("recall", __doc__, None)
    parser.add_argument("--data", required=True, help="MuSiQue JSON: [{question, answers, ctxs}]")
    parser.add_argument("--embedder", default=RetrieverConfig().embedder)
    parser.add_argument("--index", choices=("auto", "flat", "hnsw"), default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    report = run(args)
    write_report(Path(args.out), report, markdown(report).splitlines(), table(report).splitlines())


if __name__ == "__main__":
    main()
