"""Multi-LoRA benchmark: requests of many adapters in mixed batches against one batch per adapter.

    python -m ragcache.bench.lora --out eval/reports/bench_lora.json

SmolLM2 serves seeded random rank-16 adapters on q, k, v and o, written in the PEFT
format to a temporary folder. The requests (MuSiQue passages cut to a seeded length,
a fixed output length with end-of-sequence ignored) are spread round-robin over the
adapters. In the same run and on the same engine, three schedules serve them all:
every request at once with adapters mixed in each step (the batched-LoRA path); each
adapter's requests as a separate batch run to completion before the next adapter's
(what a server without batched LoRA does); and every request at once on the base model
(the cost of the adapters themselves). Prefix caching is off, so no schedule reuses
another's KV. Greedy outputs of the two adapter schedules must agree token for token.
The schedules run in turn ``--repeats`` times and each reports its fastest run, since
other work on a shared machine only ever slows a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ragcache.bench.engine import (
    MUSIQUE,
    BenchRequest,
    RequestTiming,
    make_workload,
    pool_bytes_for,
    serve,
    serving_metrics,
)
from ragcache.bench.report import (
    add_threads,
    bench_parser,
    end_machine_record,
    page_head,
    report_header,
    set_threads,
    write_report,
)
from ragcache.engine.config import EngineConfig, ModelConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import PACKED_WEIGHTS_MODES
from ragcache.engine.lora import target_slice
from ragcache.engine.lora_config import LoraConfig
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.spec import ModelSpec

TARGET_RATIO = 2.0
SCHEDULES = ("mixed", "per_adapter", "base_only")


def write_peft_adapter(
    folder: Path, spec: ModelSpec, seed: int, rank: int, alpha: float, targets: list[str]
) -> None:
    """A random adapter in the PEFT file format: A as PEFT initialises it, B small and
    non-zero so the adapter changes the output."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for target in targets:
            geometry = target_slice(spec, target)
            bound = 1.0 / geometry.in_features**0.5
            a = (torch.rand(rank, geometry.in_features, generator=generator) * 2 - 1) * bound
            b = torch.randn(geometry.out_features, rank, generator=generator) * 0.02
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def serve_per_adapter(
    engine: Engine, workload: list[BenchRequest], adapters: list[str | None]
) -> tuple[list[RequestTiming], float]:
    """Each adapter's requests as one batch, run to completion before the next adapter's;
    latencies count from t=0, when every request was waiting."""
    start = time.perf_counter()
    timings: list[RequestTiming | None] = [None] * len(workload)
    for name in dict.fromkeys(adapters):
        rows = [i for i, a in enumerate(adapters) if a == name]
        group, _ = serve(engine, [workload[i] for i in rows], [name] * len(rows))
        for row, timing in zip(rows, group, strict=True):
            timing.start = start
            timings[row] = timing
    return [t for t in timings if t is not None], time.perf_counter() - start


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from ragcache.engine.loader import load_model

    set_threads(args.threads)
    load_at_start = list(os.getloadavg())
    loaded = load_model(
        ModelConfig(dtype=args.dtype, device="cpu", packed_weights=args.packed_weights)
    )
    workload = make_workload(
        loaded.tokenizer,
        args.num_requests,
        args.seed,
        (args.min_prompt, args.max_prompt),
        (args.output_tokens, args.output_tokens),
    )
    names = [f"adapter-{i}" for i in range(args.num_adapters)]
    assigned: list[str | None] = [names[i % len(names)] for i in range(len(workload))]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    block_size = EngineConfig().block_size
    config = EngineConfig(
        kv_cache_bytes=pool_bytes_for(loaded, workload, block_size),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        threads=args.threads,
        speculative=SpeculativeConfig(method=args.speculative),
    )
    with tempfile.TemporaryDirectory(prefix="ragcache-bench-lora-") as scratch:
        specs = []
        for number, name in enumerate(names):
            folder = Path(scratch) / name
            alpha = 2.0 * args.rank
            write_peft_adapter(folder, loaded.spec, args.seed + number, args.rank, alpha, targets)
            specs.append(f"{name}={folder}")
        engine = Engine(loaded, config, LoraConfig(adapters=specs, max_loras=len(names)))
        warmup = [r.prompt_ids[:16] for r in workload[: len(names)]]
        engine.generate(warmup, SamplingParams(max_tokens=4, ignore_eos=True), adapter=names)
        runs: dict[str, list[tuple[list[RequestTiming], float]]] = {s: [] for s in SCHEDULES}
        with torch.inference_mode():
            for repeat in range(args.repeats):
                for schedule in SCHEDULES:
                    if schedule == "per_adapter":
                        run = serve_per_adapter(engine, workload, assigned)
                    else:
                        adapters = assigned if schedule == "mixed" else [None] * len(workload)
                        run = serve(engine, workload, adapters)
                    runs[schedule].append(run)
                    print(f"run {repeat + 1}, {schedule}: {run[1]:.1f} s", flush=True)
    report: dict[str, Any] = {
        **report_header("lora", load_at_start),
        "settings": {
            "model": loaded.name,
            "dtype": args.dtype,
            "num_requests": len(workload),
            "num_adapters": len(names),
            "rank": args.rank,
            "target_modules": targets,
            "seed": args.seed,
            "prompt_tokens_range": [args.min_prompt, args.max_prompt],
            "output_tokens": args.output_tokens,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "repeats": args.repeats,
            "speculative": args.speculative,
            "data": str(MUSIQUE),
        },
    }
    for schedule in SCHEDULES:
        timings, duration = min(runs[schedule], key=lambda run: run[1])
        report[schedule] = serving_metrics(timings, duration, concurrent=True)
        report[schedule]["all_durations_s"] = [run[1] for run in runs[schedule]]
    outputs = {s: [[t.token_ids for t in run[0]] for run in runs[s]] for s in SCHEDULES}
    mixed_tokens = outputs["mixed"][0]
    report["identical_outputs"] = all(
        tokens == mixed_tokens for s in ("mixed", "per_adapter") for tokens in outputs[s]
    )
    report["adapters_change_outputs"] = mixed_tokens != outputs["base_only"][0]
    ratio = (
        report["mixed"]["total_token_throughput"] / report["per_adapter"]["total_token_throughput"]
    )
    report["mixed_over_per_adapter"] = ratio
    report["mixed_over_base_only"] = (
        report["mixed"]["total_token_throughput"] / report["base_only"]["total_token_throughput"]
    )
    report["target_ratio"] = TARGET_RATIO
    report["meets_target"] = ratio >= TARGET_RATIO and report["identical_outputs"]
    report["lora_stats"] = {k: v for k, v in engine.stats().items() if k.startswith("lora_")}
    end_machine_record(report)
    write_report(args.out, report, markdown_page(report), table_lines(report))
    return report


def table_lines(report: dict[str, Any]) -> list[str]:
    titles = {
        "mixed": "adapters mixed in each batch",
        "per_adapter": "one batch per adapter",
        "base_only": "base model, no adapter",
    }
    lines = [
        "| schedule | duration (s) | output tok/s | total tok/s | TTFT mean (ms) | E2E mean (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for schedule in SCHEDULES:
        run = report[schedule]
        lines.append(
            f"| {titles[schedule]} | {run['duration_s']:.1f} | "
            f"{run['output_token_throughput']:.1f} | {run['total_token_throughput']:.1f} | "
            f"{run['ttft']['mean_ms']:.0f} | {run['e2e']['mean_ms']:.0f} |"
        )
    lines.append(
        f"\nmixed batches / one batch per adapter: {report['mixed_over_per_adapter']:.2f}x "
        f"total token throughput (target >= {report['target_ratio']:.0f}x); mixed / base "
        f"only: {report['mixed_over_base_only']:.2f}x; identical greedy outputs of the two "
        f"adapter schedules: {report['identical_outputs']}"
    )
    return lines


def markdown_page(report: dict[str, Any]) -> list[str]:
    settings = report["settings"]
    low, high = settings["prompt_tokens_range"]
    markdown = [
        *page_head(
            "Multi-LoRA benchmark: mixed-adapter batches against one batch per adapter", report
        ),
        f"{settings['num_requests']} requests spread round-robin over "
        f"{settings['num_adapters']} random rank-{settings['rank']} adapters on "
        f"{', '.join(t.removesuffix('_proj') for t in settings['target_modules'])}, prompts "
        f"of {low}-{high} MuSiQue tokens, {settings['output_tokens']} output tokens each, "
        f"{settings['model']} in {settings['dtype']}, torch threads: "
        f"{report['machine']['threads']}, prefix caching off, speculative decoding: "
        f"{settings['speculative']}. Every request is queued at "
        f"t=0; latencies count from then. Each schedule ran {settings['repeats']} times in "
        "turn; the table shows its fastest run (all durations are in the JSON).",
        "",
        *table_lines(report),
        "",
    ]
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("lora", __doc__, "eval/reports/bench_lora.json")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--min-prompt", type=int, default=48, help="shortest prompt (tokens)")
    parser.add_argument("--max-prompt", type=int, default=96, help="longest prompt (tokens)")
    parser.add_argument("--output-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each schedule; the fastest counts"
    )
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig().max_num_seqs)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens
    )
    parser.add_argument(
        "--speculative",
        default=SpeculativeConfig().method,
        choices=("ngram", "off"),
        help="speculative decoding in every schedule (the engine default, or off to time "
        "adapter batching alone)",
    )
    parser.add_argument(
        "--packed-weights",
        default=ModelConfig().packed_weights,
        choices=PACKED_WEIGHTS_MODES,
        help="model.packed_weights: block copies for products of few rows (auto, the "
        "default) speed up small batches, so they shrink what batching adapters together "
        "gains; off times every schedule on fp32 weights",
    )
    add_threads(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.min_prompt <= args.max_prompt or args.output_tokens < 1:
        parser.error("need 1 <= --min-prompt <= --max-prompt and --output-tokens >= 1")
    if args.repeats < 1:
        parser.error("need --repeats >= 1")
    if not 1 <= args.num_adapters <= args.num_requests or not 1 <= args.rank <= 64:
        parser.error("need 1 <= --num-adapters <= --num-requests and 1 <= --rank <= 64")
    return args


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
