"""Command line of the fusion sweep: resumable per-example results, a table and JSON.

    python -m ragcache.evaluation.run_fusion --data ../shared/data/musique_dev.json \
        --questions 12 --passages 4 --out eval/reports/fusion_musique.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ragcache.engine.config import EngineConfig, ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import load_model
from ragcache.evaluation.fusion_eval import (
    FusionEvaluator,
    append_outcomes,
    default_sweep,
    load_outcomes,
    parse_settings,
    summarize,
)
from ragcache.prompt import PromptBuilder

COLUMNS = ("nll", "gap_closed", "agree16", "first_token", "f1", "ttft_s", "speedup")


def format_table(summary: dict[str, dict[str, float]]) -> str:
    header = f"| setting | recompute | {' | '.join(COLUMNS)} |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, row in summary.items():
        cells = [f"{row.get(c, float('nan')):.3f}" for c in COLUMNS]
        lines.append(f"| {label} | {row['recompute_fraction']:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON (list of items)")
    parser.add_argument("--questions", type=int, default=12, help="examples to evaluate")
    parser.add_argument("--passages", type=int, default=10, help="passages per example")
    parser.add_argument("--settings", nargs="*", help="e.g. full_reuse cacheblend:ratio=0.15")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example order")
    parser.add_argument("--shuffle", action="store_true", help="draw examples at random")
    parser.add_argument("--out", default="eval/reports/fusion_musique.json")
    parser.add_argument("--results", help="per-example JSONL (resumable); default beside --out")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    items = json.loads(Path(args.data).read_text())
    order = list(range(len(items)))
    if args.shuffle:
        random.Random(args.seed).shuffle(order)
    order = order[: args.questions]
    settings = parse_settings(args.settings) if args.settings else default_sweep()
    if settings[0].method != "full_prefill":
        settings = parse_settings(["full_prefill"]) + settings
    out = Path(args.out)
    results = Path(args.results) if args.results else out.with_suffix(".jsonl")
    done = load_outcomes(results)
    finished = {o.example for o in done}

    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    # No engine prefix cache: every setting must use its own KV, never a previous run's.
    engine = Engine(
        loaded,
        EngineConfig(
            kv_cache_bytes=1 << 30, max_num_batched_tokens=8192, enable_prefix_caching=False
        ),
    )
    evaluator = FusionEvaluator(engine, PromptBuilder(loaded.tokenizer), args.max_new_tokens)
    warm = items[order[0]]
    evaluator.evaluate(-1, warm, settings[:1], min(args.passages, 2))
    for index in tqdm(order, desc="examples", file=sys.stderr):
        if index in finished:
            continue
        outcomes = evaluator.evaluate(index, items[index], settings, args.passages)
        append_outcomes(results, outcomes)
        done.extend(outcomes)
    summary = summarize([o for o in done if o.example in set(order)])
    table = format_table(summary)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python -m ragcache.evaluation.run_fusion " + " ".join(argv or sys.argv[1:]),
        "model": loaded.name,
        "dtype": args.dtype,
        "questions": len(order),
        "passages": args.passages,
        "summary": summary,
    }
    out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
