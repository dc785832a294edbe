"""Scheduling where the service meets the engine: overlap and cache-aware order, measured.

Overlap: time to first token of RAG queries whose retrieved chunks are half on the LMDB
tier and half missing, with service.overlap_kv off and on (each run on a fresh copy of
the same data directory, so both start from the same cache state), and where the time
goes (retrieval, chunk reads, chunk encoding, fusion, engine prefill).

Order: a burst of warm queries (every chunk cached on the LMDB tier) and cold queries
(no chunk cached) sent at fixed gaps into one service, under engine.scheduling_policy
fcfs and cache_aware at each waiting bound (cache_aware orders both the service's model
calls and the engine's waiting queue); client-side time to first token per query.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ragcache.bench.report import (
    bench_parser,
    end_machine_record,
    page_head,
    report_header,
    write_report,
)
from ragcache.config import Config
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.retriever.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.service import RagCache

MUSIQUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "musique_dev.json"
STAGES = ("retrieval", "cache_fetch", "kv_compute", "fusion", "prefill", "ttft")


def write_corpus(data: Path, questions: int, folder: Path) -> list[str]:
    """The passages of the first ``questions`` MuSiQue questions as one JSONL file."""
    examples = json.loads(data.read_text())[:questions]
    lines = [
        json.dumps({"id": f"q{q}-p{p}", "text": ctx["text"]})
        for q, example in enumerate(examples)
        for p, ctx in enumerate(example["ctxs"])
    ]
    (folder / "passages.jsonl").write_text("\n".join(lines) + "\n")
    return [example["question"] for example in examples]


def open_service(
    data_dir: Path,
    loaded: LoadedModel,
    embedder: Embedder,
    overlap: bool,
    policy: str,
    starvation_s: float = 2.0,
) -> RagCache:
    config = Config()
    config.data_dir = str(data_dir)
    config.service.kv_precompute = "lazy"
    config.service.overlap_kv = overlap
    config.engine.scheduling_policy = policy
    config.engine.starvation_s = starvation_s
    return RagCache(config=config, loaded=loaded, embedder=embedder)


def arm_name(bound: float | None) -> str:
    return "fcfs" if bound is None else f"cache_aware, bound {bound:g} s"


def median_mean(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "p50": statistics.median(values)}


def overlap_runs(
    base: Path,
    work: Path,
    loaded: LoadedModel,
    embedder: Embedder,
    questions: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Each question at k chunks, its top k/2 chunks on LMDB and the rest missing."""
    half = work / "half-cached"
    shutil.copytree(base, half)
    with open_service(half, loaded, embedder, False, "fcfs") as rag:
        for question in questions:
            rag.query(question, "bench", k=args.k // 2, sampling=SamplingParams(max_tokens=1))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for repeat in range(args.repeats):
        modes = ("off", "on") if repeat % 2 == 0 else ("on", "off")
        for mode in modes:
            copy = work / f"overlap-{mode}-{repeat}"
            shutil.copytree(half, copy)
            with open_service(copy, loaded, embedder, mode == "on", "fcfs") as rag:
                for question in questions:
                    result = rag.query(question, "bench", k=args.k, sampling=sampling)
                    runs[mode].append(
                        {
                            "question": question,
                            "answer": result.answer,
                            "tokens_by_tier": result.cache.tokens_by_tier,
                            "computed_tokens": result.cache.computed_tokens,
                            **{stage: result.timings.get(stage) for stage in STAGES},
                        }
                    )
            shutil.rmtree(copy)
    shutil.rmtree(half)
    summary: dict[str, Any] = {}
    for mode, rows in runs.items():
        summary[mode] = {
            stage: median_mean([row[stage] for row in rows if row[stage] is not None])
            for stage in STAGES
        }
    identical = sum(
        a["answer"] == b["answer"] for a, b in zip(runs["off"], runs["on"], strict=True)
    )
    first = runs["on"][0]
    return {
        "queries_per_mode": len(runs["on"]),
        "identical_answers": identical,
        "example_cache_state": {
            "tokens_by_tier": first["tokens_by_tier"],
            "computed_tokens": first["computed_tokens"],
        },
        "summary": summary,
        "ttft_off_over_on": {
            key: summary["off"]["ttft"][key] / summary["on"]["ttft"][key] for key in ("mean", "p50")
        },
        "runs": runs,
    }


async def burst(
    rag: RagCache,
    plan: list[tuple[str, str]],
    gap_s: float,
    k: int,
    max_tokens: int,
    pool: ThreadPoolExecutor,
) -> list[dict[str, Any]]:
    """Send the planned (kind, question) queries ``gap_s`` apart; client-side TTFT each."""
    loop = asyncio.get_running_loop()
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(index: int, kind: str, question: str) -> dict[str, Any]:
        await asyncio.sleep(index * gap_s)
        sent = time.perf_counter()
        prepared = await loop.run_in_executor(
            pool, rag.prepare_corpus, question, "bench", k, None, {}, sampling
        )
        first: float | None = None
        tokens: list[int] = []
        async for out in rag.generate(prepared):
            if first is None and out.token_ids:
                first = time.perf_counter()
            tokens = out.token_ids
        assert first is not None
        return {"kind": kind, "question": question, "ttft": first - sent, "tokens": tokens}

    return list(await asyncio.gather(*(one(i, *item) for i, item in enumerate(plan))))


def order_runs(
    base: Path,
    work: Path,
    loaded: LoadedModel,
    embedder: Embedder,
    warm: list[str],
    cold: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    plan: list[tuple[str, str]] = []
    warm_left, cold_left = list(warm), list(cold)
    while warm_left or cold_left:
        if cold_left:
            plan.append(("cold", cold_left.pop(0)))
        plan.extend(("warm", warm_left.pop(0)) for _ in range(2) if warm_left)
    warmed = work / "warm-cached"
    shutil.copytree(base, warmed)
    with open_service(warmed, loaded, embedder, True, "fcfs") as rag:
        for question in warm:
            rag.query(question, "bench", k=args.k, sampling=SamplingParams(max_tokens=1))
    arms: list[float | None] = [None, *args.bounds]
    runs: dict[str, list[dict[str, Any]]] = {arm_name(arm): [] for arm in arms}
    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        for repeat in range(args.repeats):
            shift = repeat % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                copy = work / f"order-{repeat}"
                shutil.copytree(warmed, copy)
                policy = "fcfs" if arm is None else "cache_aware"
                bound = 2.0 if arm is None else arm
                with open_service(copy, loaded, embedder, True, policy, bound) as rag:
                    runs[arm_name(arm)].extend(
                        asyncio.run(burst(rag, plan, args.gap, args.k, args.max_tokens, pool))
                    )
                shutil.rmtree(copy)
    shutil.rmtree(warmed)
    summary: dict[str, Any] = {}
    for name, rows in runs.items():
        summary[name] = {
            kind: median_mean([r["ttft"] for r in rows if kind in ("all", r["kind"])])
            for kind in ("all", "warm", "cold")
        }
    fcfs = runs["fcfs"]
    return {
        "plan": [kind for kind, _ in plan],
        "gap_s": args.gap,
        "queries_per_arm": len(fcfs),
        "identical_answers_to_fcfs": {
            name: sum(a["tokens"] == b["tokens"] for a, b in zip(fcfs, rows, strict=True))
            for name, rows in runs.items()
        },
        "summary": summary,
        "ttft_fcfs_over_arm": {
            name: {
                key: summary["fcfs"]["all"][key] / summary[name]["all"][key]
                for key in ("mean", "p50")
            }
            for name in runs
        },
        "runs": runs,
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_start = list(os.getloadavg())
    began = time.perf_counter()
    loaded = load_model(ModelConfig(path=args.model, dtype="float32", device="cpu"))
    embedder = SentenceTransformerEmbedder()
    overlap_count, warm_count, cold_count = args.questions, args.warm, args.cold
    total = max(overlap_count, warm_count + cold_count)
    with tempfile.TemporaryDirectory(prefix="ragcache-bench-sched-") as tmp:
        work = Path(tmp)
        questions = write_corpus(args.data, total, work)
        base = work / "ingested"
        with open_service(base, loaded, embedder, False, "fcfs") as rag:
            rag.create_corpus("bench")
            ingest = rag.ingest([work / "passages.jsonl"], "bench")
        report: dict[str, Any] = {
            **report_header("scheduling", load_start),
            "settings": {
                "model": loaded.name,
                "k": args.k,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                "passages": ingest.chunks_added,
                "questions": total,
            },
        }
        report["overlap"] = overlap_runs(
            base, work, loaded, embedder, questions[:overlap_count], args
        )
        report["order"] = order_runs(
            base,
            work,
            loaded,
            embedder,
            questions[:warm_count],
            questions[warm_count : warm_count + cold_count],
            args,
        )
    end_machine_record(report)
    report["seconds"] = time.perf_counter() - began
    write_report(args.out, report, markdown_page(report), table_lines(report))
    return report


def table_lines(report: dict[str, Any]) -> list[str]:
    overlap = report["overlap"]["summary"]
    lines = [
        "| overlap_kv | " + " | ".join(f"{s} mean (ms)" for s in STAGES) + " | TTFT p50 (ms) |",
        "|---|" + "---:|" * (len(STAGES) + 1),
    ]
    for mode in ("off", "on"):
        cells = " | ".join(f"{overlap[mode][s]['mean'] * 1000:.0f}" for s in STAGES)
        lines.append(f"| {mode} | {cells} | {overlap[mode]['ttft']['p50'] * 1000:.0f} |")
    order = report["order"]
    lines += [
        "",
        "| policy | TTFT mean, all (ms) | TTFT p50, all (ms) | warm mean (ms) | warm p50 (ms) "
        "| cold mean (ms) | cold p50 (ms) | mean fcfs/this | identical to fcfs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in order["summary"].items():
        lines.append(
            f"| {name} | {row['all']['mean'] * 1000:.0f} | {row['all']['p50'] * 1000:.0f} "
            f"| {row['warm']['mean'] * 1000:.0f} | {row['warm']['p50'] * 1000:.0f} "
            f"| {row['cold']['mean'] * 1000:.0f} | {row['cold']['p50'] * 1000:.0f} "
            f"| {order['ttft_fcfs_over_arm'][name]['mean']:.2f}x "
            f"| {order['identical_answers_to_fcfs'][name]}/{order['queries_per_arm']} |"
        )
    return lines


def markdown_page(report: dict[str, Any]) -> list[str]:
    settings, overlap, order = report["settings"], report["overlap"], report["order"]
    state = overlap["example_cache_state"]
    ratio_o = overlap["ttft_off_over_on"]
    machine = report["machine"]
    markdown = [
        *page_head("Scheduling: overlapped chunk KV and cache-aware order", report),
        f"{settings['model']} (float32, CPU), corpus of {settings['passages']} chunks from the "
        f"passages of {settings['questions']} MuSiQue questions, CacheBlend, k="
        f"{settings['k']}, greedy, at most {settings['max_tokens']} answer tokens; torch "
        f"threads {machine['threads']}; load average {machine['load_average_at_start'][0]:.1f}"
        f" at the start, {machine['load_average_at_end'][0]:.1f} at the end; "
        f"{report['seconds']:.0f} s in all.",
        "",
        "## Overlap: cached chunks read while missing chunks are encoded",
        "",
        f"Each query's top {settings['k'] // 2} chunks are on the LMDB tier, the others "
        f"missing (first query: {state['tokens_by_tier']} tokens read, "
        f"{state['computed_tokens']} computed). {overlap['queries_per_mode']} queries per "
        "mode, the modes alternating on fresh copies of one data directory. Stage times are "
        "the service's own: with overlap on, cache_fetch and kv_compute run at the same time.",
        "",
        *table_lines(report)[:4],
        "",
        f"TTFT off/on: {ratio_o['mean']:.3f}x mean, {ratio_o['p50']:.3f}x p50; identical "
        f"answers {overlap['identical_answers']}/{overlap['queries_per_mode']}.",
        "",
        "## Order: warm and cold queries in one burst",
        "",
        f"Send order {' '.join(order['plan'])}, {order['gap_s']} s apart, into a service "
        "just started; warm: every chunk cached (on the LMDB tier: asked once in an earlier "
        "run on the same data directory), cold: no chunk cached. Client-side TTFT "
        f"(sending to first token), {order['queries_per_arm']} queries per policy. The "
        "bound is engine.starvation_s: a query waiting longer goes before all that have "
        "waited less.",
        "",
        *table_lines(report)[5:],
        "",
    ]
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("scheduling", __doc__, "eval/reports/bench_scheduling.json")
    parser.add_argument("--data", type=Path, default=MUSIQUE, help="MuSiQue JSON file")
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local HF folder")
    parser.add_argument("--questions", type=int, default=6, help="overlap: questions asked")
    parser.add_argument("--warm", type=int, default=6, help="order: warm queries per burst")
    parser.add_argument("--cold", type=int, default=3, help="order: cold queries per burst")
    parser.add_argument("--gap", type=float, default=0.25, help="order: seconds between sends")
    parser.add_argument(
        "--bounds",
        type=lambda text: [float(b) for b in text.split(",") if b],
        default=[2.0, 10.0],
        help="order: cache_aware waiting bounds to run (seconds, comma-separated)",
    )
    parser.add_argument("--k", type=int, default=4, help="chunks per query (even)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    args = parser.parse_args(argv)
    if args.k < 2 or args.k % 2:
        parser.error("--k must be an even number >= 2")
    if min(args.questions, args.warm, args.cold, args.repeats) < 1:
        parser.error("--questions, --warm, --cold and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
