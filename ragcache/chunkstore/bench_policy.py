"""Replacement policies on Zipf traces of chunk requests: hit rate and saved prefill.

Two trace shapes, each on several seeds: "zipf" keeps one popularity ranking for the
whole trace; "shift" draws a new ranking halfway through, so yesterday's hot chunks
go cold.

    python -m ragcache.chunkstore.bench_policy [--out eval/reports/bench_policy.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ragcache.chunkstore.cost_calibration import COST_MODELS, calibration_record
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import load_model
from ragcache.policy import CostModel, make_policy

SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


def make_trace(
    num_chunks: int,
    num_requests: int,
    zipf_s: float,
    min_tokens: int,
    max_tokens: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(min_tokens), np.log(max_tokens), num_chunks))
    popularity = 1.0 / np.arange(1, num_chunks + 1) ** zipf_s
    popularity /= popularity.sum()
    # Popularity is independent of length: rank r goes to a random chunk.
    chunk_of_rank = rng.permutation(num_chunks)
    requests = chunk_of_rank[rng.choice(num_chunks, size=num_requests, p=popularity)]
    return lengths.astype(np.int64), requests


def make_shift_trace(
    num_chunks: int,
    num_requests: int,
    zipf_s: float,
    min_tokens: int,
    max_tokens: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    half = num_requests // 2
    lengths, first = make_trace(num_chunks, half, zipf_s, min_tokens, max_tokens, seed)
    _, second = make_trace(
        num_chunks, num_requests - half, zipf_s, min_tokens, max_tokens, seed + 1000
    )
    return lengths, np.concatenate([first, second])


TRACES = {"zipf": make_trace, "shift": make_shift_trace}


# Column name -> (policy, PGDSF frequency exponent, PGDSF admission filter).
VARIANTS: dict[str, tuple[str, float, bool]] = {
    "pgdsf": ("pgdsf", 1.0, True),
    "lru": ("lru", 1.0, False),
    "lfu": ("lfu", 1.0, False),
    "pgdsf-noadmit": ("pgdsf", 1.0, False),
    "pgdsf-f2-noadmit": ("pgdsf", 2.0, False),
}


def simulate(
    policy_name: str,
    lengths: np.ndarray,
    requests: np.ndarray,
    capacity: int,
    cost_model: CostModel,
    frequency_exponent: float = 1.0,
    admission: bool = True,
) -> dict[str, float]:
    """One tier driven as ChunkStore drives it: every request is reported, a miss is
    computed and offered to the tier, which evicts only if the policy admits it."""
    policy = make_policy(policy_name, frequency_exponent, admission)
    sizes = lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    costs = [cost_model.seconds(int(n)) for n in lengths]
    cached: set[int] = set()
    frequency: dict[int, int] = {}
    used = hits = rejected = 0
    saved = total = 0.0
    for chunk in requests.tolist():
        frequency[chunk] = frequency.get(chunk, 0) + 1
        total += costs[chunk]
        key = str(chunk)
        policy.on_request(key)
        if chunk in cached:
            hits += 1
            saved += costs[chunk]
            policy.on_access(key, frequency[chunk])
            continue
        size = int(sizes[chunk])
        if size > capacity:
            continue
        if used + size > capacity:
            victims = policy.pick_victims(used + size - capacity)
            assert victims is not None
            if not policy.admits(key, costs[chunk], victims):
                rejected += 1
                continue
            for victim in victims:
                policy.on_evict(victim)
                cached.discard(int(victim))
                used -= int(sizes[int(victim)])
        cached.add(chunk)
        used += size
        policy.on_insert(key, size, costs[chunk], frequency[chunk])
    return {
        "hit_rate": hits / len(requests),
        "saved_prefill_fraction": saved / total,
        "saved_prefill_s": saved,
        "total_prefill_s": total,
        "rejected_admissions": rejected,
    }


def static_best(
    lengths: np.ndarray, requests: np.ndarray, capacity: int, cost_model: CostModel
) -> float:
    """Saved prefill fraction of the best fixed set, chosen knowing the whole trace's
    counts (greedy by count x cost / size) and missed once on each first request. An
    offline reference, not a policy: online policies rarely beat it on a stationary trace.
    """
    costs = np.array([cost_model.seconds(int(n)) for n in lengths])
    sizes = lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    counts = np.bincount(requests, minlength=len(lengths))
    saved = used = 0.0
    for chunk in np.argsort(-(counts * costs / sizes), kind="stable"):
        if counts[chunk] < 2:
            break
        if used + sizes[chunk] <= capacity:
            used += sizes[chunk]
            saved += (counts[chunk] - 1) * costs[chunk]
    return float(saved / costs[requests].sum())


def measured_calibration() -> dict[str, Any]:
    """The embedded SmolLM2's prefill cost on this machine, as the service measures it."""
    loaded = load_model(ModelConfig())
    directory = Path(ModelConfig().cache_dir).expanduser().parent / "calibration"
    return calibration_record(loaded, directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/reports/bench_policy.json")
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--capacity-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shapes", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument(
        "--cost-model",
        default="measured",
        choices=COST_MODELS,
        help="measured: SmolLM2's prefill timed on this machine (once, then cached), as "
        "the service does; default: the fixed coefficients of CostModel()",
    )
    args = parser.parse_args(argv)
    calibration = measured_calibration() if args.cost_model == "measured" else None
    cost_model = CostModel(**calibration["cost_model"]) if calibration else CostModel()
    names = list(VARIANTS)
    columns = [*names, "static-best"]
    runs = []
    print(
        f"{args.chunks} chunks, {args.requests} requests, Zipf({args.zipf}), capacity "
        f"{args.capacity_fraction:.0%} of the working set; saved prefill fraction"
    )
    print(
        f"cost model ({args.cost_model}): {cost_model.per_token:.3g} s/token + "
        f"{cost_model.per_token_pair:.3g} s/token pair + {cost_model.fixed:.3g} s; "
        f"cost/size from 64 to 2048 tokens: {cost_model.seconds(64) / 64:.3g} to "
        f"{cost_model.seconds(2048) / 2048:.3g} s/token\n"
    )
    print("| trace | seed | " + " | ".join(columns) + " | PGDSF-LRU (points) |")
    print("|---|---:|" + "---:|" * (len(columns) + 1))
    for shape in args.shapes:
        for seed in args.seeds:
            lengths, requests = TRACES[shape](args.chunks, args.requests, args.zipf, 64, 2048, seed)
            working_set = int(lengths.sum()) * SMOLLM2_KV_BYTES_PER_TOKEN
            capacity = int(working_set * args.capacity_fraction)
            results = {
                name: simulate(policy, lengths, requests, capacity, cost_model, exponent, admit)
                for name, (policy, exponent, admit) in VARIANTS.items()
            }
            saved = {name: results[name]["saved_prefill_fraction"] for name in names}
            saved["static-best"] = static_best(lengths, requests, capacity, cost_model)
            margin = 100 * (saved["pgdsf"] - saved["lru"])
            print(
                f"| {shape} | {seed} | "
                + " | ".join(f"{saved[name]:.3f}" for name in columns)
                + f" | {margin:+.1f} |"
            )
            runs.append(
                {
                    "shape": shape,
                    "seed": seed,
                    "capacity_bytes": capacity,
                    "working_set_bytes": working_set,
                    "results": results,
                    "pgdsf_minus_lru_saved_points": margin,
                    "lfu_minus_lru_saved_points": 100 * (saved["lfu"] - saved["lru"]),
                    "static_best_saved_fraction": saved["static-best"],
                }
            )
    report = {
        "command": "python -m ragcache.chunkstore.bench_policy "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "trace": {
            "chunks": args.chunks,
            "requests": args.requests,
            "zipf_s": args.zipf,
            "tokens": [64, 2048],
            "capacity_fraction": args.capacity_fraction,
        },
        "cost_model": {
            "source": args.cost_model,
            "per_token": cost_model.per_token,
            "per_token_pair": cost_model.per_token_pair,
            "fixed": cost_model.fixed,
            "calibration": calibration,
        },
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
