"""Cache-aware routing against round robin on a Zipf workload over generator replicas on
Ray Serve, and answer throughput at 1 and 2 replicas; the packaged model, MuSiQue passages,
a real redis-server on loopback for the shared chunk tier and the corpus log.

Routing: each request answers one MuSiQue question over its first ``--passages``
passages (documents given, no retrieval), with one answer token, so the time to its
answer is its time to first token. The questions are drawn by Zipf(``--zipf``) from the
first ``--questions``; both routers serve the same sequence one request at a time, each
on its own application (its own Redis namespaces and replica directories) on one Ray,
and each request goes to both in turn, so load from other processes falls on both alike.
Replicas keep chunk KV in host memory capped at ``--host-mb`` (no local disk tier) and
share Redis (``--remote-codec``, int8 by default: the fastest remote hit measured,
which favours round robin, and a quarter of raw's memory).

Throughput: ``--concurrency`` requests in flight over the same kind of workload with
``--max-tokens`` answer tokens; 1 replica gets every core, 2 replicas one share each.

    python -m ragcache.bench.cluster_routing --data ../shared/data/musique_dev.json \
        [--questions 16 --requests 48 --passages 2 --host-mb 200 --out ...]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np

from ragcache.bench.report import (
    bench_parser,
    command_line,
    machine_record,
    write_json,
    write_markdown,
)
from ragcache.cluster.redis_server import LocalRedis, free_port
from ragcache.config import Config, load_config
from ragcache.evaluation.examples import load_examples, passage_text

MEMORY_TIERS = ("device", "host")
BOOTSTRAP_SAMPLES = 2000


def zipf_sequence(count: int, population: int, exponent: float, seed: int) -> list[int]:
    """``count`` draws of 0..population-1, item i with weight 1 / (i + 1) ** exponent."""
    weights = 1.0 / np.arange(1, population + 1) ** exponent
    generator = np.random.default_rng(seed)
    return generator.choice(population, size=count, p=weights / weights.sum()).tolist()


def cluster_config(args: Any, redis_url: str, data_root: Path) -> Config:
    config = load_config(None, {"model.path": args.model, "model.dtype": args.dtype}, environ={})
    config.data_dir = str(data_root / "unused")
    store = config.chunkstore
    store.remote_url = redis_url
    store.remote_namespace = f"bench-routing-{uuid.uuid4().hex[:8]}"
    store.host_bytes = args.host_mb << 20
    store.disk_bytes = 0
    store.device_bytes = 0
    store.cost_model = "default"
    store.remote_codec = args.remote_codec
    config.engine.kv_cache_bytes = args.engine_kv_mb << 20
    return config


class Cluster:
    """A local Ray with Serve; applications are deployed by name and torn down on close."""

    def __init__(self, num_cpus: int) -> None:
        import ray
        from ray import serve

        self.ray, self.serve = ray, serve
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

    def deploy(
        self, name: str, config: Config, data_root: Path, replicas: int, routing: str, cpus: float
    ) -> Any:
        from ragcache.cluster.deployments import ClusterSpec, build_app

        spec = ClusterSpec(
            config,
            str(data_root),
            generators=replicas,
            corpus_namespace=f"bench-corpora-{uuid.uuid4().hex[:8]}",
            generator_cpus=cpus,
            routing=routing,
            stats_period_s=0.2,
        )
        handle = self.serve.run(build_app(spec), name=name, route_prefix=None)
        answer(handle, ["warm-up"], "warm up", 1)
        return handle

    def remove(self, name: str) -> None:
        self.serve.delete(name)

    def close(self) -> None:
        self.serve.shutdown()
        self.ray.shutdown()


def answer(
    handle: Any, documents: list[str], question: str, max_tokens: int, method: str | None = None
) -> dict[str, Any]:
    call = handle.answer.remote(documents, question, max_tokens=max_tokens, method=method)
    return call.result()


def workload(args: Any) -> list[tuple[list[str], str]]:
    examples = load_examples(args.data)[args.offset : args.offset + args.questions]
    return [
        ([passage_text(c) for c in item["ctxs"][: args.passages]], item["question"])
        for item in examples
    ]


def run_routing(args: Any, redis_url: str, sequence: list[int]) -> dict[str, Any]:
    """Both routers side by side on one Ray, each its own application and Redis
    namespaces; every request goes to both in turn (alternating which goes first), so
    load from other processes falls on both alike."""
    items = workload(args)
    modes = ("round_robin", "cache_aware")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    tiers: dict[str, list[str]] = {mode: [] for mode in modes}
    replicas: dict[str, list[str]] = {mode: [] for mode in modes}
    threads: set[int] = set()
    with TemporaryDirectory(prefix="ragcache-bench-") as folder:
        root = Path(folder)
        cluster = Cluster(num_cpus=8)
        try:
            handles = {
                mode: cluster.deploy(
                    mode, cluster_config(args, redis_url, root), root / mode, 2, mode, 1.0
                )
                for mode in modes
            }
            for step, index in enumerate(sequence):
                documents, question = items[index]
                for mode in modes if step % 2 == 0 else modes[::-1]:
                    began = time.perf_counter()
                    result = answer(handles[mode], documents, question, 1, args.method)
                    times[mode].append(time.perf_counter() - began)
                    tiers[mode].extend(str(tier) for tier in result["chunk_tiers"])
                    replicas[mode].append(result["replica"])
                    threads.add(result["torch_threads"])
                time.sleep(args.stats_wait_s)  # the routers see the replicas' new memory
                print(f"request {step}: {[times[m][-1] for m in modes]}", file=sys.stderr)
        finally:
            cluster.close()
    rows = {}
    for mode in modes:
        in_memory = sum(tiers[mode].count(tier) for tier in MEMORY_TIERS)
        rows[mode] = {
            "ttft_s": times[mode],
            "p50_s": statistics.median(times[mode]),
            "mean_s": statistics.fmean(times[mode]),
            "chunk_sources": {tier: tiers[mode].count(tier) for tier in sorted(set(tiers[mode]))},
            "memory_share": in_memory / max(len(tiers[mode]), 1),
            "requests_per_replica": sorted(replicas[mode].count(r) for r in set(replicas[mode])),
            "torch_threads_per_replica": sorted(threads),
        }
    return rows


def p50_ratio_interval(slow: list[float], fast: list[float], seed: int) -> list[float]:
    """95% paired bootstrap interval of median(slow) / median(fast) over the requests."""
    generator = np.random.default_rng(seed)
    slow_array, fast_array = np.asarray(slow), np.asarray(fast)
    ratios = []
    for _ in range(BOOTSTRAP_SAMPLES):
        picked = generator.integers(0, len(slow_array), len(slow_array))
        ratios.append(np.median(slow_array[picked]) / np.median(fast_array[picked]))
    return np.percentile(ratios, [2.5, 97.5]).tolist()


def run_throughput(args: Any, redis_url: str, replicas: int, sequence: list[int]) -> dict:
    items = workload(args)
    cores = os.cpu_count() or 1
    cpus = max(cores // replicas, 1)
    with TemporaryDirectory(prefix="ragcache-bench-") as folder:
        root = Path(folder)
        cluster = Cluster(num_cpus=cores + 2)
        try:
            config = cluster_config(args, redis_url, root)
            handle = cluster.deploy("throughput", config, root, replicas, "cache_aware", cpus)
            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(
                    pool.map(lambda index: answer(handle, *items[index], args.max_tokens), sequence)
                )
            seconds = time.perf_counter() - began
        finally:
            cluster.close()
    tokens = sum(result["completion_tokens"] for result in results)
    return {
        "replicas": replicas,
        "torch_threads_per_replica": sorted({result["torch_threads"] for result in results}),
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "requests_per_s_per_replica": len(results) / seconds / replicas,
        "completion_tokens_per_s": tokens / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("cluster_routing", __doc__, "eval/reports/bench_cluster_routing.json")
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON with passages")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--offset", type=int, default=0, help="first question used")
    parser.add_argument("--questions", type=int, default=16, help="distinct questions")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--passages", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-mb", type=int, default=200, help="host tier cap per replica")
    parser.add_argument("--method", help="fusion method of the routing run (default: service's)")
    parser.add_argument("--remote-codec", default="int8", help="codec of the Redis tier")
    parser.add_argument("--engine-kv-mb", type=int, default=256, help="engine KV pool each")
    parser.add_argument("--stats-wait-s", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--throughput-requests", type=int, default=24)
    parser.add_argument("--skip", choices=("routing", "throughput"), action="append", default=[])
    args = parser.parse_args(argv)
    command = command_line("cluster_routing", argv)
    sequence = zipf_sequence(args.requests, args.questions, args.zipf, args.seed)
    report: dict[str, Any] = {
        "command": command,
        "machine": {**machine_record(), "cores": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "sequence": sequence,
    }
    lines: list[str] = []
    with LocalRedis() as redis_server:
        if "routing" not in args.skip:
            modes = run_routing(args, redis_server.url, sequence)
            slow, fast = modes["round_robin"], modes["cache_aware"]
            report["routing"] = modes
            report["p50_ratio"] = slow["p50_s"] / fast["p50_s"]
            report["p50_ratio_interval95"] = p50_ratio_interval(
                slow["ttft_s"], fast["ttft_s"], args.seed
            )
            lines += [
                f"Zipf({args.zipf}) over {args.questions} questions, {args.requests} requests, "
                f"{args.passages} passages, 2 replicas, host tier {args.host_mb} MB each, "
                f"fusion {args.method or 'the service default'}",
                "",
                "| routing | p50 TTFT (ms) | mean (ms) | chunks from replica memory | sources |",
                "|---|---:|---:|---:|---|",
            ]
            lines += [
                f"| {mode} | {1e3 * row['p50_s']:.0f} | {1e3 * row['mean_s']:.0f} | "
                f"{100 * row['memory_share']:.0f}% | {row['chunk_sources']} |"
                for mode, row in modes.items()
            ]
            low, high = report["p50_ratio_interval95"]
            lines += ["", f"round robin / cache-aware p50: {report['p50_ratio']:.2f}x "
                      f"(95% interval {low:.2f} to {high:.2f})", ""]  # fmt: skip
        if "throughput" not in args.skip:
            drawn = zipf_sequence(
                args.throughput_requests, args.questions, args.zipf, args.seed + 1
            )
            runs = [run_throughput(args, redis_server.url, n, drawn) for n in (1, 2)]
            report["throughput"] = runs
            lines += [
                f"Throughput, {args.concurrency} requests in flight, {args.max_tokens} answer "
                f"tokens, {os.cpu_count()} cores shared by the replicas",
                "",
                "| replicas | torch threads each | requests/s | per replica | tokens/s |",
                "|---:|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {run['replicas']} | {run['torch_threads_per_replica'][0]} | "
                f"{run['requests_per_s']:.3f} | {run['requests_per_s_per_replica']:.3f} | "
                f"{run['completion_tokens_per_s']:.2f} |"
                for run in runs
            ]
    write_json(args.out, report)
    write_markdown(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
