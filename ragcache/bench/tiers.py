"""Read throughput of a SmolLM2-shaped chunk from the host and a warm LMDB tier,
against a plain numpy copy of the same bytes in the same run. LMDB reads verify
every layer's checksum on every read (the default) or only on a record's first read.
"get" and "layer stream" copy the entry out into new memory the caller owns; "view"
verifies the layers in place and hands out views of the map, and "view + copy out"
then copies them into a buffer the caller already holds, as a reader filling its own
KV buffers would.

    python -m ragcache.bench.tiers [--out eval/reports/bench_tiers.json]
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ragcache.bench.report import bench_parser, command_line, write_json
from ragcache.chunkstore.codecs import get_codec
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.lmdb_tier import LMDBTier
from ragcache.chunkstore.store import ChunkStore

LAYERS, HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 600


def median_seconds(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each action; the actions take turns, so load from other
    processes falls on all of them alike and their ratios stay comparable."""
    timings: dict[str, list[float]] = {name: [] for name in actions}
    for action in actions.values():
        action()
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            timings[name].append(time.perf_counter() - start)
    return {name: float(np.median(times)) for name, times in timings.items()}


def view(disk: LMDBTier, key: str, destination: torch.Tensor | None) -> None:
    with disk.view(key) as entry:
        assert entry is not None
        if destination is not None:
            for layer, (k, v) in enumerate(entry.layers):
                destination[layer, 0].copy_(k)
                destination[layer, 1].copy_(v)


def make_chunk() -> ChunkEntry:
    context = KeyContext("smollm2-135m", "float16")
    tokens = list(range(TOKENS))
    shape = (TOKENS, HEADS, HEAD_DIM)
    layers = [(torch.randn(shape).half(), torch.randn(shape).half()) for _ in range(LAYERS)]
    return ChunkEntry(chunk_key(context, [], tokens), tokens, tokens, layers, [], context)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("tiers", __doc__, "eval/reports/bench_tiers.json")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="report the median over runs")
    args = parser.parse_args(argv)
    # Every read is one thread, as the numpy copy is: torch's thread pool would only
    # add contention on a shared machine.
    torch.set_num_threads(1)
    entry = make_chunk()
    nbytes = entry.nbytes
    flat = np.frombuffer(np.random.bytes(nbytes), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as directory:
        stores = {
            verify: ChunkStore(
                ChunkStoreConfig(host_bytes=1 << 30, disk_verify=verify),
                Path(directory) / verify,
            )
            for verify in ("always", "once")
        }
        for store in stores.values():
            store.put(entry)
        actions: dict[str, Callable[[], object]] = {
            "numpy copy": flat.copy,
            "host tier get": lambda: stores["once"].get(entry.key, entry.token_ids),
        }
        for verify, store in stores.items():
            disk = store.tiers[-1]
            actions[f"lmdb warm get (verify {verify})"] = lambda d=disk: d.get(entry.key)
            actions[f"lmdb warm layer stream (verify {verify})"] = lambda d=disk: list(
                d.iter_layers(entry.key, range(LAYERS))
            )
        always = stores["always"].tiers[-1]
        destination = torch.empty(LAYERS, 2, TOKENS, HEADS, HEAD_DIM, dtype=torch.float16)
        destination.fill_(0)
        actions["lmdb warm view (verify always)"] = lambda: view(always, entry.key, None)
        actions["lmdb warm view + copy out (verify always)"] = lambda: view(
            always, entry.key, destination
        )
        runs = [median_seconds(actions, args.repeats) for _ in range(args.runs)]
        rows = {name: float(np.median([run[name] for run in runs])) for name in actions}
        for store in stores.values():
            store.close()
    copy_bandwidth = nbytes / rows["numpy copy"]
    print(
        f"chunk: {TOKENS} tokens x {LAYERS} layers x {HEADS} KV heads x {HEAD_DIM}, fp16, "
        f"{nbytes / 1e6:.2f} MB (K and V)"
    )
    print("\n| read | ms | GB/s | vs copy |\n|---|---:|---:|---:|")
    report_rows = {}
    for name, seconds in rows.items():
        bandwidth = nbytes / seconds
        report_rows[name] = {
            "seconds": seconds,
            "gb_per_s": bandwidth / 1e9,
            "ratio_to_copy": bandwidth / copy_bandwidth,
        }
        print(
            f"| {name} | {seconds * 1e3:.3f} | {bandwidth / 1e9:.2f} | "
            f"{bandwidth / copy_bandwidth:.2f} |"
        )
    shape = (TOKENS, HEADS, HEAD_DIM)
    int8_ratio = get_codec("int8").encoded_size(shape, torch.float16) / get_codec(
        "raw"
    ).encoded_size(shape, torch.float16)
    print(f"\nint8 codec bytes / raw bytes: {int8_ratio:.3f}")
    report = {
        "command": command_line("tiers", argv),
        "chunk": {
            "tokens": TOKENS,
            "layers": LAYERS,
            "kv_heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "float16",
            "bytes": nbytes,
        },
        "repeats": args.repeats,
        "runs": args.runs,
        "reads": report_rows,
        "int8_bytes_ratio": int8_ratio,
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
