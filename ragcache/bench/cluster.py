"""Time to first token with the chunk KV from the host tier, from the shared Redis tier
(raw, int8 and cachegen records) and computed anew, on MuSiQue passages and the packaged model.

Per question, ``--passages`` passages are encoded once; each source then serves them to
the same fused full-reuse answer (only the question is prefilled) and the time from the
first chunk read to the first answer token is taken. The sources take turns, so load from
other processes falls on all alike. Redis is a local ``redis-server`` on loopback, and
the remote stores have no memory tier, so every read goes to Redis and is checked.

    python -m ragcache.bench.cluster --data ../shared/data/musique_dev.json \
        [--questions 5 --passages 4 --repeats 3 --out eval/reports/bench_cluster.json]

``ragcache bench cluster routing ...`` runs cluster_routing.py instead: cache-aware
routing against round robin over replicas on Ray Serve, and throughput at 1 and 2 replicas.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ragcache.bench.codec_cachegen import CodecBench
from ragcache.bench.report import bench_parser, machine_record, write_json, write_markdown
from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.prompt import PromptBuilder
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.store import ChunkStore
from ragcache.cluster.redis_server import LocalRedis
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import load_model
from ragcache.evaluation.examples import load_examples, passage_text
from ragcache.evaluation.fusion_eval import evaluation_engine

SOURCES = ("recompute", "host", "remote raw", "remote int8", "remote cachegen")


def store_for(source: str, redis_url: str) -> ChunkStore:
    """Host only, or Redis only (no memory tier to promote into: every read is remote)."""
    if source == "host":
        return ChunkStore(ChunkStoreConfig(device_bytes=0, write_through=False))
    codec = source.removeprefix("remote ")
    return ChunkStore(
        ChunkStoreConfig(
            device_bytes=0,
            host_bytes=0,
            remote_url=redis_url,
            remote_codec=codec,
            remote_namespace=f"bench-{codec}-{os.getpid()}",
        )
    )


def fetched(store: ChunkStore, keys: list[str], chunks: list[ChunkKV]) -> list[ChunkKV]:
    out = []
    for key, chunk in zip(keys, chunks, strict=True):
        entry = store.get(key, chunk.token_ids)
        assert entry is not None, f"{key} missing from the store under test"
        k, v = zip(*entry.layers, strict=True)
        out.append(ChunkKV(chunk.token_ids, list(k), list(v), chunk.positions))
    return out


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["routing"]:
        from ragcache.bench.cluster_routing import main as routing_main

        routing_main(arguments[1:])
        return
    parser = bench_parser("cluster", __doc__, "eval/reports/bench_cluster.json")
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON with passages")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    command = "python -m ragcache.bench.cluster " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    machine = machine_record()
    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    bench = CodecBench(evaluation_engine(loaded), PromptBuilder(loaded.tokenizer), 1)
    context = KeyContext(loaded.fingerprint, str(loaded.dtype))
    examples = load_examples(args.data)[: args.questions]
    times: dict[str, list[float]] = {source: [] for source in SOURCES}
    tokens = 0
    with LocalRedis() as redis_server:
        stores = {s: store_for(s, redis_server.url) for s in SOURCES if s != "recompute"}
        for index, item in enumerate(examples):
            ids = [bench.builder.chunk_ids(passage_text(c)) for c in item["ctxs"][: args.passages]]
            layout = bench.builder.layout(ids, item["question"])
            chunks = bench.encoder.encode(layout.chunk_ids)
            tokens += sum(chunk.num_tokens for chunk in chunks)
            keys = [chunk_key(context, [f"q{index}"], chunk.token_ids) for chunk in chunks]
            for store in stores.values():
                for key, chunk in zip(keys, chunks, strict=True):
                    layers = list(zip(chunk.k, chunk.v, strict=True))
                    entry = ChunkEntry(key, chunk.token_ids, chunk.positions, layers)
                    assert store.put(entry)
            serve: dict[str, Callable[[], list[ChunkKV]]] = {
                "recompute": lambda layout=layout: bench.encoder.encode(layout.chunk_ids),
                **{
                    source: lambda store=store, keys=keys, chunks=chunks: fetched(
                        store, keys, chunks
                    )
                    for source, store in stores.items()
                },
            }
            for _ in range(args.repeats):
                for source, read in serve.items():
                    began = time.perf_counter()
                    bench.answer(layout, read())
                    times[source].append(time.perf_counter() - began)
            print(f"question {index} done", file=sys.stderr, flush=True)
        for store in stores.values():
            store.close()
    medians = {source: statistics.median(values) for source, values in times.items()}
    rows = {
        source: {
            "ttft_median_s": medians[source],
            "over_host": medians[source] / medians["host"],
            "recompute_over_this": medians["recompute"] / medians[source],
            "samples": len(times[source]),
        }
        for source in SOURCES
    }
    report = {
        "command": command,
        "machine": {**machine, "cores": os.cpu_count()},
        "model": loaded.name,
        "kv_dtype": str(loaded.dtype).removeprefix("torch."),
        "passages": args.passages,
        "context_tokens_mean": tokens / max(len(examples), 1),
        "rows": rows,
        "times_s": times,
    }
    write_json(args.out, report)
    lines = [
        f"TTFT of a {args.passages}-passage full-reuse answer by where the chunk KV comes "
        f"from ({loaded.name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "",
        "| source | TTFT median (ms) | / host | recompute / this |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {source} | {1e3 * row['ttft_median_s']:.0f} | {row['over_host']:.2f}x | "
        f"{row['recompute_over_this']:.1f}x |"
        for source, row in rows.items()
    ]
    write_markdown(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
