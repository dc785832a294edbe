"""Serving benchmark: chunk caching on and off under the same Poisson load, over HTTP.

    python -m ragcache.bench.serve --out eval/reports/bench_serve.json
    ragcache bench serve --url http://127.0.0.1:8000 --rates 0.05,0.1,0.15

Without ``--url`` it starts ``ragcache serve`` on loopback with a temporary data
directory (flags it does not know are passed to that server, e.g.
``--engine.kv_cache_bytes 1000000000``) and uploads the passages of the first
``--questions`` MuSiQue questions as a corpus. At each arrival rate the same seeded load
(Zipf-popular questions, Poisson arrivals) runs twice against the same server: chunk
caching on (CacheBlend over cached chunk KV) and off (full prefill of every prompt).
Without ``--rates`` the rates are fractions of the measured single-request capacity with
caching off. Writes JSON and a Markdown table headed by the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ragcache.bench.report import bench_parser
from ragcache.bench.serve_client import run_phase
from ragcache.bench.serve_report import markdown_page, table_lines
from ragcache.bench.serve_server import LocalServer, ensure_corpus
from ragcache.bench.serve_summary import RateComparison, summarize_phase, verdict
from ragcache.bench.serve_workload import (
    MusiqueItem,
    build_workload,
    corpus_files,
    load_items,
)
from ragcache.bench.server_bench import run_server_bench

CALIBRATED_FRACTIONS = (1 / 3, 2 / 3, 1.0)
DEFAULT_SERVER_FLAGS = ("--service.kv_precompute", "lazy")
TARGET_RATIO = 3.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = bench_parser("serve", __doc__, "eval/reports/bench_serve.json")
    parser.epilog = "Other --section.field VALUE flags configure the server this run starts."
    parser.add_argument("--url", help="base URL of a running server (default: start one)")
    parser.add_argument("--api-key", help="bearer key for a server with server.api_keys")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/musique_dev.json"))
    parser.add_argument("--questions", type=int, default=6, help="MuSiQue questions (corpus)")
    parser.add_argument("--corpus", default="musique-serve", help="corpus name on the server")
    parser.add_argument(
        "--rates", help="comma-separated arrival rates in req/s (default: calibrated)"
    )
    parser.add_argument("--requests", type=int, default=40, help="most requests per phase")
    parser.add_argument("--duration", type=float, default=90.0, help="arrival window (s)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=3, help="chunks retrieved per request")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request")
    parser.add_argument("--method", default="cacheblend", help="fusion method with caching on")
    parser.add_argument("--recompute-ratio", type=float, default=0.15)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request limit (s)")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask every question once in on mode before timing",
    )
    parser.add_argument(
        "--calibration-requests",
        type=int,
        default=2,
        help="sequential full-prefill requests timed to pick the default rates",
    )
    parser.add_argument("--target", type=float, default=TARGET_RATIO, help="p50 TTFT ratio")
    args, server_flags = parser.parse_known_args(argv)
    if args.url and server_flags:
        parser.error(f"server flags {server_flags} only apply without --url")
    if any(not flag.startswith("--") for flag in server_flags[:1]):
        parser.error(f"unexpected argument {server_flags[0]!r}")
    if args.rates:
        try:
            args.rates = [float(rate) for rate in args.rates.split(",")]
        except ValueError:
            parser.error(f"--rates {args.rates!r}: give numbers separated by commas")
        if any(rate <= 0 for rate in args.rates):
            parser.error("--rates must all be > 0")
    if args.calibration_requests < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("need --calibration-requests >= 1, --requests >= 1 and --duration > 0")
    return args, server_flags


def query_body(args: argparse.Namespace, question: str, caching: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": question,
        "corpus": args.corpus,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if caching:
        body.update(method=args.method, recompute_ratio=args.recompute_ratio)
    else:
        body.update(method="full_prefill")
    return body


@contextmanager
def server_under_test(args: argparse.Namespace, flags: list[str]) -> Iterator[dict[str, Any]]:
    if args.url:
        yield {"started_here": False, "url": args.url.rstrip("/"), "flags": []}
        return
    with tempfile.TemporaryDirectory(prefix="ragcache-bench-serve-") as folder:
        flags = [*DEFAULT_SERVER_FLAGS, *flags]
        print("starting ragcache serve on loopback ...", flush=True)
        with LocalServer(Path(folder) / "data", flags) as server:
            yield {"started_here": True, "url": server.url, "flags": flags}


def _flag_value(flags: list[str], name: str) -> str | None:
    value = None
    for index, flag in enumerate(flags):
        if flag == name and index + 1 < len(flags):
            value = flags[index + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def _post(client: httpx.Client, body: dict[str, Any], timeout: float) -> float:
    """Sends one whole (not streamed) query; returns its client-side latency."""
    began = time.perf_counter()
    response = client.post("/v1/query", json={**body, "stream": False}, timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"query failed: HTTP {response.status_code} {response.text[:300]}")
    return time.perf_counter() - began


def warm_up(client: httpx.Client, args: argparse.Namespace, items: list[MusiqueItem]) -> float:
    began = time.perf_counter()
    for item in items:
        body = {**query_body(args, item.question, caching=True), "max_tokens": 1}
        _post(client, body, args.timeout)
    return time.perf_counter() - began


def calibrate(
    client: httpx.Client, args: argparse.Namespace, items: list[MusiqueItem]
) -> dict[str, Any]:
    latencies = [
        _post(client, query_body(args, items[i % len(items)].question, False), args.timeout)
        for i in range(args.calibration_requests)
    ]
    capacity = 1 / statistics.median(latencies)
    return {
        "requests": len(latencies),
        "latencies_s": latencies,
        "capacity_rps": capacity,
        "fractions": list(CALIBRATED_FRACTIONS),
        "rates": [float(f"{capacity * f:.3g}") for f in CALIBRATED_FRACTIONS],
    }


def run_rate(
    args: argparse.Namespace, url: str, items: list[MusiqueItem], rate: float
) -> tuple[RateComparison, dict[str, Any]]:
    workload = build_workload(items, rate, args.requests, args.duration, args.zipf, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    summaries, samples = {}, {}
    for mode, caching in (("on", True), ("off", False)):
        print(f"rate {rate:.3f} req/s, caching {mode}: {len(workload)} requests", flush=True)
        phase, wall = asyncio.run(
            run_phase(
                url,
                workload,
                lambda question, caching=caching: query_body(args, question, caching),
                args.timeout,
                headers,
            )
        )
        summaries[mode] = summarize_phase(mode, rate, phase, wall)
        samples[mode] = [sample.to_dict() for sample in phase]
    return RateComparison(rate, summaries["on"], summaries["off"]), samples


def run_benchmark(args: argparse.Namespace, server_flags: list[str], command: str) -> dict:
    began = time.perf_counter()
    items = load_items(args.data, args.questions)
    load_start = [round(x, 2) for x in os.getloadavg()]
    with server_under_test(args, server_flags) as server:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=server["url"], headers=headers, timeout=120) as client:
            server["model"] = client.get("/health").json().get("model")
            server["kv_precompute"] = (
                (_flag_value(server["flags"], "--service.kv_precompute") or "eager")
                if server["started_here"]
                else "as the running server is configured"
            )
            print(f"uploading corpus {args.corpus!r} ...", flush=True)
            corpus = ensure_corpus(client, args.corpus, corpus_files(items))
            warmup = {"requests": 0, "seconds": 0.0}
            if args.warmup:
                print(f"warm-up: {len(items)} questions in on mode ...", flush=True)
                warmup = {"requests": len(items), "seconds": warm_up(client, args, items)}
            calibration = None
            rates = args.rates
            if rates is None:
                print("calibrating with full-prefill requests ...", flush=True)
                calibration = calibrate(client, args, items)
                rates = calibration["rates"]
        comparisons, samples = [], []
        for rate in rates:
            comparison, rate_samples = run_rate(args, server["url"], items, rate)
            comparisons.append(comparison)
            samples.append({"rate": rate, **rate_samples})
    report: dict[str, Any] = {
        "command": command,
        "settings": {
            "questions": args.questions,
            "data": str(args.data),
            "max_requests": args.requests,
            "duration_s": args.duration,
            "zipf_exponent": args.zipf,
            "seed": args.seed,
            "k": args.k,
            "max_tokens": args.max_tokens,
            "method": args.method,
            "recompute_ratio": args.recompute_ratio,
            "timeout_s": args.timeout,
        },
        "server": server,
        "corpus": corpus,
        "warmup": warmup,
        "calibration": calibration,
        "rates": [c.to_dict() for c in comparisons],
        "verdict": verdict(comparisons, args.target).to_dict(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": time.perf_counter() - began,
        "samples": samples,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    return run_server_bench("serve", argv, parse_args, run_benchmark, markdown_page, table_lines)


if __name__ == "__main__":
    raise SystemExit(main())
