"""Replacement policies on a Zipf trace of chunk requests: hit rate and saved prefill.

    python -m ragcache.chunkstore.bench_policy [--out eval/reports/bench_policy.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ragcache.policy import POLICIES, CostModel, make_policy

SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


def make_trace(
    num_chunks: int, num_requests: int, zipf_s: float, min_tokens: int, max_tokens: int,
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


def simulate(
    policy_name: str, lengths: np.ndarray, requests: np.ndarray, capacity: int,
    cost_model: CostModel, frequency_exponent: float = 1.0,
) -> dict[str, float]:
    policy = make_policy(policy_name, frequency_exponent)
    sizes = lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    costs = [cost_model.seconds(int(n)) for n in lengths]
    cached: set[int] = set()
    frequency: dict[int, int] = {}
    used = hits = 0
    saved = total = 0.0
    for chunk in requests.tolist():
        frequency[chunk] = frequency.get(chunk, 0) + 1
        total += costs[chunk]
        key = str(chunk)
        if chunk in cached:
            hits += 1
            saved += costs[chunk]
            policy.on_access(key, frequency[chunk])
            continue
        size = int(sizes[chunk])
        if size > capacity:
            continue
        while used + size > capacity:
            victim = policy.pick_victim()
            assert victim is not None
            policy.on_evict(victim)
            cached.discard(int(victim))
            used -= int(sizes[int(victim)])
        cached.add(chunk)
        used += size
        policy.on_insert(key, size, costs[chunk], frequency[chunk])
    return {"hit_rate": hits / len(requests), "saved_prefill_fraction": saved / total,
            "saved_prefill_s": saved, "total_prefill_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/reports/bench_policy.json")
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--capacity-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cost_model = CostModel()
    lengths, requests = make_trace(args.chunks, args.requests, args.zipf, 64, 2048, args.seed)
    working_set = int(lengths.sum()) * SMOLLM2_KV_BYTES_PER_TOKEN
    capacity = int(working_set * args.capacity_fraction)
    results = {name: simulate(name, lengths, requests, capacity, cost_model) for name in POLICIES}
    results["pgdsf-f2"] = simulate("pgdsf", lengths, requests, capacity, cost_model, 2.0)
    print(f"{args.chunks} chunks, {args.requests} requests, Zipf({args.zipf}), "
          f"capacity {capacity / 2**30:.2f} GiB = {args.capacity_fraction:.0%} of "
          f"{working_set / 2**30:.2f} GiB, seed {args.seed}")
    print(f"{'policy':<8}{'hit rate':>10}{'saved prefill':>16}")
    for name, result in results.items():
        print(f"{name:<8}{result['hit_rate']:>10.3f}{result['saved_prefill_fraction']:>16.3f}")
    lru = results["lru"]["saved_prefill_fraction"]
    margin = results["pgdsf"]["saved_prefill_fraction"] - lru
    margin_f2 = results["pgdsf-f2"]["saved_prefill_fraction"] - lru
    print(f"PGDSF - LRU saved prefill: {100 * margin:+.1f} points "
          f"(frequency**2: {100 * margin_f2:+.1f})")
    report = {
        "trace": {"chunks": args.chunks, "requests": args.requests, "zipf_s": args.zipf,
                  "tokens": [64, 2048], "seed": args.seed, "capacity_bytes": capacity,
                  "working_set_bytes": working_set},
        "cost_model": {"per_token": cost_model.per_token,
                       "per_token_pair": cost_model.per_token_pair, "fixed": cost_model.fixed},
        "results": results,
        "pgdsf_minus_lru_saved_points": 100 * margin,
        "pgdsf_f2_minus_lru_saved_points": 100 * margin_f2,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
