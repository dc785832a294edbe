"""Peak memory of a fused query, from placement through the first token, per method.

    python -m ragcache.bench.fusion_memory --data ../shared/data/musique_dev.json \
        [--offset 50] [--questions 5] [--passages 4] [--methods full_reuse cacheblend:ratio=0.15]

Each question's chunks are encoded once (their KV is the host tier's, not the query's);
then, per method, the profiler records every allocation torch makes from the start of
placement to the first sampled token (fusion, the engine writing the placed KV into its
paged blocks, the prefill of the tokens it computes). The engine's block pool exists
before and is not counted. Full prefill, the baseline of the same run, allocates only
the prefill's working memory; a fused query should add its selection passes to that,
and no buffer the size of the context's KV over every layer (``paged KV`` in the table:
the prompt's share of the blocks).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ragcache.bench.report import (
    add_threads,
    bench_parser,
    end_machine_record,
    page_head,
    report_header,
    set_threads,
    write_report,
)
from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.fuser import fuse
from ragcache.blending.prompt import PromptBuilder
from ragcache.blending.registry import make_method
from ragcache.config import Config
from ragcache.engine.config import ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.examples import load_examples, passage_text
from ragcache.evaluation.fusion_eval import evaluation_engine, parse_settings

MIB = 1 << 20
DEFAULT_METHODS = ["full_reuse", "legolink:k=32", "cacheblend:ratio=0.15", "queryblend:ratio=0.15"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("fusion_memory", __doc__, "eval/reports/bench_fusion_memory.json")
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON or JSONL")
    parser.add_argument("--offset", type=int, default=50, help="first question")
    parser.add_argument("--questions", type=int, default=5, help="questions measured")
    parser.add_argument("--passages", type=int, default=4, help="passages per question")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="settings as ragcache eval takes them (cacheblend:ratio=0.15)",
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local HF folder")
    add_threads(parser)
    return parser.parse_args(argv)


def peak_and_largest(events: Sequence[Any]) -> tuple[int, int]:
    """Peak of the bytes live at once above the start, and the largest allocation,
    from the profiler's memory events (CPU allocations, in time order)."""
    sizes = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = peak = largest = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
        largest = max(largest, nbytes)
    return peak, largest


def first_token(engine: Engine, prompt_ids: list[int], placed: Any) -> None:
    seq = engine.add_request(
        prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), placed=placed
    )
    while not seq.is_finished:
        engine.step()


@torch.inference_mode()
def measure(engine: Engine, layout: Any, root: Any, chunks: list[Any], spec: str) -> dict[str, int]:
    setting = parse_settings([spec])[0]
    method = make_method(setting.method, **setting.params)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if setting.method == "full_prefill":
            first_token(engine, layout.prompt_ids, None)
        else:
            fused = fuse(engine.model, layout, root, chunks, method, setting.params)
            first_token(engine, fused.prompt_ids, fused.placed)
            del fused
    peak, largest = peak_and_largest(prof.profiler.kineto_results.events())
    return {"peak_bytes": peak, "largest_bytes": largest}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    report = report_header("fusion_memory")
    loaded = load_model(ModelConfig(path=args.model, dtype="float32", device="cpu"))
    builder = PromptBuilder(loaded.tokenizer, Config().service.system_prompt)
    engine = evaluation_engine(loaded)
    spec = loaded.spec
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    items = load_examples(args.data)[args.offset : args.offset + args.questions]
    specs = ["full_prefill", *args.methods]
    rows: dict[str, list[dict[str, int]]] = {name: [] for name in specs}
    prompts: list[int] = []
    for item in items:
        texts = [passage_text(ctx) for ctx in item["ctxs"][: args.passages]]
        layout = builder.layout([builder.chunk_ids(t) for t in texts], item["question"])
        encoder = ChunkEncoder(loaded.model, layout.root_ids)
        chunks = encoder.encode(layout.chunk_ids)
        prompts.append(len(layout))
        for name in specs:
            row = measure(engine, layout, encoder.root, chunks, name)
            row["paged_kv_bytes"] = per_token * len(layout)
            rows[name].append(row)
    summary = {
        name: {
            "peak_mib": max(r["peak_bytes"] for r in got) / MIB,
            "largest_mib": max(r["largest_bytes"] for r in got) / MIB,
            "paged_kv_mib": max(r["paged_kv_bytes"] for r in got) / MIB,
            "peak_over_paged_kv": max(r["peak_bytes"] / r["paged_kv_bytes"] for r in got),
            "peak_over_full_prefill": max(
                r["peak_bytes"] / base["peak_bytes"]
                for r, base in zip(got, rows["full_prefill"], strict=True)
            ),
        }
        for name, got in rows.items()
    }
    report.update(
        {
            "questions": len(items),
            "offset": args.offset,
            "passages": args.passages,
            "prompt_tokens": prompts,
            "layers": spec.num_layers,
            "per_question": rows,
            "summary": summary,
        }
    )
    end_machine_record(report)
    lines = [
        f"Prompts of {min(prompts)} to {max(prompts)} tokens, {spec.num_layers} layers; "
        "the largest figure over the questions.",
        "",
        "| setting | peak allocated | largest allocation | paged KV of the prompt "
        "| peak / paged KV | peak / full prefill's |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['peak_mib']:.1f} MiB | {s['largest_mib']:.1f} MiB "
            f"| {s['paged_kv_mib']:.1f} MiB | {s['peak_over_paged_kv']:.2f} "
            f"| {s['peak_over_full_prefill']:.2f} |"
        )
    page = page_head("Fusion: peak memory of a fused query", report)
    write_report(Path(args.out), report, page + lines, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
