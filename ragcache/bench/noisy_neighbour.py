"""Noisy-neighbour benchmark: one tenant's queries, alone and beside another tenant's
large ingest and stream of bad requests, on one server.

    ragcache bench noisy_neighbour --out eval/reports/bench_noisy_neighbour.json

It starts ``ragcache serve`` on loopback with API keys for tenants A and B (flags it does
not know go to that server, e.g. ``--service.kv_precompute lazy``), or with ``--url`` it
drives a running server whose ``server.api_keys`` holds
``key-tenant-a=tenant-a,key-tenant-b=tenant-b``. Tenant B uploads the
passages of the first ``--questions`` MuSiQue questions, asks each once to warm up, then
asks them at a steady ``--rate`` for ``--duration`` seconds: the quiet phase. The noisy
phase repeats the same requests while tenant A uploads the passages of the next
``--ingest-questions`` questions and sends bad requests (each must get a 4xx) at
``--bad-rate``. Target: B's p50 latency noisy within ``--target`` x quiet, zero errors
for B. Writes JSON and a Markdown table headed by the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ragcache.bench.noisy_neighbour_report import markdown_page, phase_summary, table_lines
from ragcache.bench.noisy_neighbour_tenant_a import (
    NoiseRecord,
    bad_requests,
    follow_ingest,
    send_bad_requests,
    start_ingest,
)
from ragcache.bench.report import bench_parser
from ragcache.bench.serve_client import RequestSample, run_phase
from ragcache.bench.serve_server import LocalServer, ensure_corpus
from ragcache.bench.serve_workload import MusiqueItem, Workload, corpus_files, load_items
from ragcache.bench.server_bench import run_server_bench

KEYS = {"tenant-a": "key-tenant-a", "tenant-b": "key-tenant-b"}
CORPUS_A, CORPUS_B = "bulk-a", "questions-b"
TARGET_RATIO = 2.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = bench_parser("noisy_neighbour", __doc__, "eval/reports/bench_noisy_neighbour.json")
    parser.epilog = "Other --section.field VALUE flags configure the server this run starts."
    parser.add_argument("--url", help="base URL of a running server (default: start one)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/musique_dev.json"))
    parser.add_argument("--questions", type=int, default=4, help="tenant B's questions")
    parser.add_argument("--ingest-questions", type=int, default=40, help="tenant A's upload")
    parser.add_argument("--rate", type=float, default=0.5, help="tenant B's requests per s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--bad-rate", type=float, default=5.0, help="tenant A's bad req/s")
    parser.add_argument("-k", type=int, default=3, help="chunks retrieved per request")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request limit (s)")
    parser.add_argument("--target", type=float, default=TARGET_RATIO, help="p50 noisy/quiet")
    args, server_flags = parser.parse_known_args(argv)
    if args.url and server_flags:
        parser.error(f"server flags {server_flags} only apply without --url")
    if server_flags and not server_flags[0].startswith("--"):
        parser.error(f"unexpected argument {server_flags[0]!r}")
    if min(args.rate, args.duration, args.bad_rate) <= 0:
        parser.error("--rate, --duration and --bad-rate must be > 0")
    if args.questions < 1 or args.ingest_questions < 1:
        parser.error("--questions and --ingest-questions must be >= 1")
    return args, server_flags


def steady_workload(items: list[MusiqueItem], rate: float, duration_s: float) -> Workload:
    """Requests every 1/rate seconds over ``duration_s``, cycling through the questions."""
    count = max(1, int(duration_s * rate))
    ids = tuple(i % len(items) for i in range(count))
    arrivals = tuple(i / rate for i in range(count))
    return Workload(rate, arrivals, ids, tuple(items[i].question for i in ids))


def query_body(args: argparse.Namespace, question: str) -> dict[str, Any]:
    return {
        "query": question,
        "corpus": CORPUS_B,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def tenant_b_phase(
    url: str, args: argparse.Namespace, workload: Workload
) -> tuple[list[RequestSample], float]:
    return await run_phase(
        url, workload, lambda q: query_body(args, q), args.timeout, headers("tenant-b")
    )


async def noisy_phase(
    url: str, args: argparse.Namespace, workload: Workload, files: list[tuple[str, bytes]]
) -> tuple[list[RequestSample], float, NoiseRecord]:
    """Tenant B's phase while tenant A ingests ``files`` and sends bad requests."""
    record, stop = NoiseRecord(), asyncio.Event()
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, headers=headers("tenant-a"), timeout=timeout) as a:
        began = await start_ingest(a, CORPUS_A, files, record)
        noise = [
            asyncio.create_task(follow_ingest(a, record, began, stop)),
            asyncio.create_task(
                send_bad_requests(a, bad_requests(CORPUS_A, CORPUS_B), args.bad_rate, record, stop)
            ),
        ]
        samples, wall = await tenant_b_phase(url, args, workload)
        stop.set()
        await asyncio.gather(*noise)
    return samples, wall, record


@contextmanager
def server_url(args: argparse.Namespace, flags: list[str]) -> Iterator[str]:
    """The running server of ``--url``, or one started here with ``flags``."""
    if args.url:
        yield args.url.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="ragcache-bench-noisy-") as folder:
        print("starting ragcache serve on loopback ...", flush=True)
        with LocalServer(Path(folder) / "data", flags) as server:
            yield server.url


def run_benchmark(
    args: argparse.Namespace, server_flags: list[str], command: str
) -> dict[str, Any]:
    began = time.perf_counter()
    items = load_items(args.data, args.questions + args.ingest_questions)
    mine, theirs = items[: args.questions], items[args.questions :]
    workload = steady_workload(mine, args.rate, args.duration)
    keys = ",".join(f"{key}={tenant}" for tenant, key in KEYS.items())
    flags = ["--server.api_keys", keys, *server_flags]
    load_start = [round(x, 2) for x in os.getloadavg()]
    with server_url(args, flags) as url:
        with httpx.Client(base_url=url, headers=headers("tenant-b"), timeout=600) as b:
            print(f"tenant B uploads {args.questions} questions' passages ...", flush=True)
            corpus = ensure_corpus(b, CORPUS_B, corpus_files(mine))
            for item in mine:
                body = {**query_body(args, item.question), "stream": False}
                b.post("/v1/query", json=body).raise_for_status()
        print(f"quiet phase: {len(workload)} requests of tenant B ...", flush=True)
        quiet, quiet_wall = asyncio.run(tenant_b_phase(url, args, workload))
        print("noisy phase: the same requests beside tenant A's ingest ...", flush=True)
        noisy, noisy_wall, noise = asyncio.run(
            noisy_phase(url, args, workload, corpus_files(theirs))
        )
    summaries = {
        "quiet": phase_summary(quiet, quiet_wall),
        "noisy": phase_summary(noisy, noisy_wall),
    }
    return {
        "command": command,
        "settings": {
            key: value if not isinstance(value, Path) else str(value)
            for key, value in vars(args).items()
            if key != "out"
        },
        "server": {"url": args.url, "flags": []} if args.url else {"flags": flags},
        "corpus_b": corpus,
        "phases": summaries,
        "tenant_a": noise.to_dict(),
        "verdict": verdict(summaries, noise, args.target),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": time.perf_counter() - began,
        "samples": {
            "quiet": [s.to_dict() for s in quiet],
            "noisy": [s.to_dict() for s in noisy],
        },
    }


def verdict(summaries: dict[str, dict[str, Any]], noise: NoiseRecord, target: float) -> dict:
    quiet, noisy = summaries["quiet"], summaries["noisy"]
    ratio = None
    if quiet["e2e_p50_s"] and noisy["e2e_p50_s"] is not None:
        ratio = noisy["e2e_p50_s"] / quiet["e2e_p50_s"]
    p95_ratio = None
    if quiet["e2e_p95_s"] and noisy["e2e_p95_s"] is not None:
        p95_ratio = noisy["e2e_p95_s"] / quiet["e2e_p95_s"]
    errors_b = quiet["errors"] + noisy["errors"]
    return {
        "target_p50_ratio": target,
        "e2e_p50_ratio": ratio,
        "e2e_p95_ratio": p95_ratio,
        "errors_b": errors_b,
        "bad_requests_not_4xx": len(noise.bad_not_4xx),
        "meets_target": ratio is not None and ratio <= target and errors_b == 0,
    }


def main(argv: list[str] | None = None) -> int:
    return run_server_bench(
        "noisy_neighbour", argv, parse_args, run_benchmark, markdown_page, table_lines
    )


if __name__ == "__main__":
    raise SystemExit(main())
