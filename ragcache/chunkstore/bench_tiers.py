"""Read throughput of a SmolLM2-shaped chunk from the host and a warm LMDB tier,
against a plain numpy copy of the same bytes in the same run.

    python -m ragcache.chunkstore.bench_tiers [--out eval/reports/bench_tiers.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ragcache.chunkstore.codecs import get_codec
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.store import ChunkStore

LAYERS, HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 600


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    action()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return float(np.median(timings))


def make_chunk() -> ChunkEntry:
    context = KeyContext("smollm2-135m", "float16")
    tokens = list(range(TOKENS))
    shape = (TOKENS, HEADS, HEAD_DIM)
    layers = [(torch.randn(shape).half(), torch.randn(shape).half()) for _ in range(LAYERS)]
    return ChunkEntry(chunk_key(context, [], tokens), tokens, tokens, layers, [], context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/reports/bench_tiers.json")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    entry = make_chunk()
    nbytes = entry.nbytes
    flat = np.frombuffer(np.random.bytes(nbytes), dtype=np.uint8)
    rows: dict[str, float] = {"numpy copy": best_seconds(flat.copy, args.repeats)}
    with tempfile.TemporaryDirectory() as directory:
        for verify in ("once", "always"):
            config = ChunkStoreConfig(host_bytes=1 << 30, disk_verify=verify)
            store = ChunkStore(config, Path(directory) / verify)
            store.put(entry)
            if verify == "once":
                rows["host tier get"] = best_seconds(
                    lambda s=store: s.get(entry.key, entry.token_ids), args.repeats
                )
            disk = store.tiers[-1]
            rows[f"lmdb warm get (verify {verify})"] = best_seconds(
                lambda d=disk: d.get(entry.key), args.repeats
            )
            rows[f"lmdb warm layer stream (verify {verify})"] = best_seconds(
                lambda d=disk: list(d.iter_layers(entry.key, range(LAYERS))), args.repeats
            )
            store.close()
    copy_bandwidth = nbytes / rows["numpy copy"]
    print(f"chunk: {TOKENS} tokens x {LAYERS} layers x {HEADS} KV heads x {HEAD_DIM}, fp16, "
          f"{nbytes / 1e6:.2f} MB (K and V)")
    print(f"{'read':<38}{'ms':>9}{'GB/s':>9}{'vs copy':>9}")
    report_rows = {}
    for name, seconds in rows.items():
        bandwidth = nbytes / seconds
        report_rows[name] = {"seconds": seconds, "gb_per_s": bandwidth / 1e9,
                             "ratio_to_copy": bandwidth / copy_bandwidth}
        print(f"{name:<38}{seconds * 1e3:>9.3f}{bandwidth / 1e9:>9.2f}"
              f"{bandwidth / copy_bandwidth:>9.2f}")
    shape = (TOKENS, HEADS, HEAD_DIM)
    int8_ratio = get_codec("int8").encoded_size(shape, torch.float16) / get_codec(
        "raw"
    ).encoded_size(shape, torch.float16)
    print(f"int8 codec bytes / raw bytes: {int8_ratio:.3f}")
    report = {"chunk": {"tokens": TOKENS, "layers": LAYERS, "kv_heads": HEADS,
                        "head_dim": HEAD_DIM, "dtype": "float16", "bytes": nbytes},
              "repeats": args.repeats, "reads": report_rows, "int8_bytes_ratio": int8_ratio}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
