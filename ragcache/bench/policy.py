"""Replacement policies on Zipf traces of chunk requests: hit rate and saved prefill.

Two trace shapes, each on several seeds: "zipf" keeps one popularity ranking for the
whole trace; "shift" draws a new ranking halfway through, so yesterday's hot chunks
go cold.

    python -m ragcache.bench.policy [--out eval/reports/bench_policy.json]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragcache.bench.policy_traces import (
    SMOLLM2_KV_BYTES_PER_TOKEN,
    TRACES,
    Trace,
    TraceShape,
    chunk_costs,
    popularity_oracle,
    static_best,
)
from ragcache.bench.report import bench_parser, command_line, write_json
from ragcache.chunkstore.cost_calibration import COST_MODELS, calibration_record
from ragcache.chunkstore.policy import CostModel, make_policy
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import load_model

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
    trace: Trace,
    capacity: int,
    cost_model: CostModel,
    frequency_exponent: float = 1.0,
    admission: bool = True,
) -> dict[str, float]:
    """One tier driven as ChunkStore drives it: every request is reported, a miss is
    computed and offered to the tier, which evicts only if the policy admits it."""
    policy = make_policy(policy_name, frequency_exponent, admission)
    requests = trace.requests
    sizes = trace.lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    costs = chunk_costs(trace.lengths, cost_model).tolist()
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


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per trace shape: mean and worst PGDSF and oracle margins over LRU, and the share
    of the oracle's gain that PGDSF reaches (summed margins over summed margins)."""
    summary = {}
    for shape in dict.fromkeys(run["shape"] for run in runs):
        rows = [run for run in runs if run["shape"] == shape]
        pgdsf = [run["pgdsf_minus_lru_saved_points"] for run in rows]
        oracle = [run["oracle_minus_lru_saved_points"] for run in rows]
        summary[shape] = {
            "pgdsf_minus_lru_mean": sum(pgdsf) / len(rows),
            "pgdsf_minus_lru_min": min(pgdsf),
            "oracle_minus_lru_mean": sum(oracle) / len(rows),
            "oracle_minus_lru_min": min(oracle),
            "pgdsf_share_of_oracle_gain": sum(pgdsf) / sum(oracle) if sum(oracle) else 0.0,
        }
    return summary


def measured_calibration() -> dict[str, Any]:
    """The embedded SmolLM2's prefill cost on this machine, as the service measures it."""
    loaded = load_model(ModelConfig())
    directory = Path(ModelConfig().cache_dir).expanduser().parent / "calibration"
    return calibration_record(loaded, directory)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("policy", __doc__, "eval/reports/bench_policy.json")
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--min-tokens", type=int, default=64, help="shortest chunk")
    parser.add_argument("--max-tokens", type=int, default=2048, help="longest chunk")
    parser.add_argument("--capacity-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--shapes", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument(
        "--cost-model",
        default="measured",
        choices=COST_MODELS,
        help="measured: SmolLM2's prefill timed on this machine (once, then cached), as "
        "the service does; default: the fixed coefficients of CostModel()",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error(
            f"need 1 <= --min-tokens <= --max-tokens, got {args.min_tokens}, {args.max_tokens}"
        )
    trace_shape = TraceShape(
        args.chunks, args.requests, args.zipf, args.min_tokens, args.max_tokens
    )
    calibration = measured_calibration() if args.cost_model == "measured" else None
    cost_model = CostModel(**calibration["cost_model"]) if calibration else CostModel()
    names = list(VARIANTS)
    columns = [*names, "oracle", "static-best"]
    runs = []
    print(
        f"{args.chunks} chunks of {args.min_tokens}-{args.max_tokens} tokens, {args.requests} "
        f"requests, Zipf({args.zipf}), capacity "
        f"{args.capacity_fraction:.0%} of the working set; saved prefill fraction"
    )
    print(
        f"cost model ({args.cost_model}): {cost_model.per_token:.3g} s/token + "
        f"{cost_model.per_token_pair:.3g} s/token pair + {cost_model.fixed:.3g} s; "
        f"cost/size from {args.min_tokens} to {args.max_tokens} tokens: "
        f"{cost_model.seconds(args.min_tokens) / args.min_tokens:.3g} to "
        f"{cost_model.seconds(args.max_tokens) / args.max_tokens:.3g} s/token\n"
    )
    print(
        "| trace | seed | " + " | ".join(columns) + " | PGDSF-LRU (points) | oracle-LRU (points) |"
    )
    print("|---|---:|" + "---:|" * (len(columns) + 2))
    for shape in args.shapes:
        for seed in args.seeds:
            trace = TRACES[shape](trace_shape, seed)
            working_set = int(trace.lengths.sum()) * SMOLLM2_KV_BYTES_PER_TOKEN
            capacity = int(working_set * args.capacity_fraction)
            results = {
                name: simulate(policy, trace, capacity, cost_model, exponent, admit)
                for name, (policy, exponent, admit) in VARIANTS.items()
            }
            saved = {name: results[name]["saved_prefill_fraction"] for name in names}
            saved["oracle"] = popularity_oracle(trace, capacity, cost_model)
            saved["static-best"] = static_best(trace, capacity, cost_model)
            margin = 100 * (saved["pgdsf"] - saved["lru"])
            ceiling = 100 * (saved["oracle"] - saved["lru"])
            print(
                f"| {shape} | {seed} | "
                + " | ".join(f"{saved[name]:.3f}" for name in columns)
                + f" | {margin:+.1f} | {ceiling:+.1f} |"
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
                    "oracle_minus_lru_saved_points": ceiling,
                    "oracle_saved_fraction": saved["oracle"],
                    "static_best_saved_fraction": saved["static-best"],
                }
            )
    print("\nhit rate\n\n| trace | seed | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for run in runs:
        hit_rates = " | ".join(f"{run['results'][name]['hit_rate']:.3f}" for name in names)
        print(f"| {run['shape']} | {run['seed']} | {hit_rates} |")
    summary = summarize(runs)
    print()
    for shape, row in summary.items():
        print(
            f"{shape}: PGDSF-LRU mean {row['pgdsf_minus_lru_mean']:+.1f} points "
            f"(min {row['pgdsf_minus_lru_min']:+.1f}); oracle-LRU mean "
            f"{row['oracle_minus_lru_mean']:+.1f} (min {row['oracle_minus_lru_min']:+.1f}); "
            f"PGDSF reaches {row['pgdsf_share_of_oracle_gain']:.0%} of the oracle's gain"
        )
    report = {
        "command": command_line("policy", argv),
        "trace": {
            "chunks": args.chunks,
            "requests": args.requests,
            "zipf_s": args.zipf,
            "tokens": [args.min_tokens, args.max_tokens],
            "capacity_fraction": args.capacity_fraction,
        },
        "cost_model": {
            "source": args.cost_model,
            "per_token": cost_model.per_token,
            "per_token_pair": cost_model.per_token_pair,
            "fixed": cost_model.fixed,
            "calibration": calibration,
        },
        "summary": summary,
        "runs": runs,
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
