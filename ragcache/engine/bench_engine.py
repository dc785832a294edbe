"""Serving benchmark: the engine's continuous batching against transformers, one request at a time.

    python -m ragcache.engine.bench_engine --out eval/reports/bench_engine.json

The workload follows vLLM's benchmark_serving: every request is submitted at t=0 with
a prompt of real MuSiQue passages cut to a seeded random length and a seeded output
length (end-of-sequence ignored, so lengths are exact). The engine serves all of them
with continuous batching; per-request TTFT, TPOT, inter-token latencies and end-to-end
latency come from the time each step returned. In the same run, transformers'
``generate`` (greedy, the same output length) serves the same prompts one after another
on the same weights in the same dtype. With ``--baseline-requests N`` only the first N
are timed and its full-workload time is extrapolated from its measured prefill time per
prompt token and decode time per output token; the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcache.engine.bench_machine import machine_record
from ragcache.engine.config import EngineConfig, ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.sampling_params import SamplingParams

MUSIQUE = Path("/work/shared/data/musique_dev.json")
TARGET_RATIO = 4.0


@dataclass(slots=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


@dataclass(slots=True)
class RequestTiming:
    """When a request started and when each of its output tokens became available."""

    prompt_len: int
    start: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between the steps that returned tokens, as a stream would deliver them:
        tokens kept together from one speculative step arrive as one chunk (vLLM's
        benchmark_serving counts one inter-token latency per streamed chunk)."""
        arrivals = sorted(set(self.token_times))
        return [b - a for a, b in itertools.pairwise(arrivals)]


def make_workload(
    tokenizer: Any,
    num_requests: int,
    seed: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
) -> list[BenchRequest]:
    """Each prompt comes from a different question's passages, so no prefixes are shared."""
    records = json.loads(MUSIQUE.read_text())
    rng = random.Random(seed)
    order = rng.sample(range(len(records)), len(records))
    workload: list[BenchRequest] = []
    for index in order:
        if len(workload) == num_requests:
            break
        record = records[index]
        text = "\n\n".join(f"{c['title']}\n{c['text']}".strip() for c in record["ctxs"])
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompt_len = rng.randint(*prompt_range)
        if len(ids) < prompt_len:
            continue
        workload.append(BenchRequest(ids[:prompt_len], rng.randint(*output_range)))
    if len(workload) < num_requests:
        raise ValueError(
            f"{MUSIQUE} gave {len(workload)} prompts of {prompt_range[0]}-{prompt_range[1]} "
            f"tokens; {num_requests} were asked for"
        )
    return workload


def pool_bytes_for(loaded: LoadedModel, workload: list[BenchRequest], block_size: int) -> int:
    """A KV pool that holds every request at once, so nothing is preempted."""
    blocks = sum(
        (len(r.prompt_ids) + r.output_len + block_size - 1) // block_size for r in workload
    )
    element_bytes = torch.finfo(loaded.dtype).bits // 8
    return (blocks + 16) * block_size * loaded.spec.kv_bytes_per_token * element_bytes


def run_engine(
    loaded: LoadedModel, workload: list[BenchRequest], config: EngineConfig
) -> tuple[list[RequestTiming], float, dict[str, float]]:
    engine = Engine(loaded, config)
    warmup = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request(workload[0].prompt_ids[:32], warmup, use_prefix_cache=False)
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    timings: dict[str, RequestTiming] = {}
    for request in workload:
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        seq = engine.add_request(request.prompt_ids, params)
        timings[seq.request_id] = RequestTiming(len(request.prompt_ids), start)
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            timing = timings[output.request_id]
            timing.token_times.extend(now for _ in output.new_token_ids)
            timing.token_ids.extend(output.new_token_ids)
    duration = time.perf_counter() - start
    ordered = list(timings.values())
    for timing, request in zip(ordered, workload, strict=True):
        if len(timing.token_ids) != request.output_len:
            raise RuntimeError(
                f"a request produced {len(timing.token_ids)} tokens, not {request.output_len}"
            )
    return ordered, duration, engine.stats()


class TokenClock:
    """A transformers streamer that stamps the time each generated token arrives."""

    def __init__(self, timing: RequestTiming) -> None:
        self.timing = timing
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        tokens = value.reshape(-1).tolist()
        self.timing.token_times.extend(now for _ in tokens)
        self.timing.token_ids.extend(int(t) for t in tokens)

    def end(self) -> None:
        return None


def transformers_generate(reference: Any, prompt_ids: list[int], output_len: int) -> RequestTiming:
    ids = torch.tensor([prompt_ids])
    timing = RequestTiming(len(prompt_ids), time.perf_counter())
    reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        pad_token_id=reference.generation_config.pad_token_id or 0,
        streamer=TokenClock(timing),
    )
    return timing


def run_transformers(
    reference: Any, workload: list[BenchRequest]
) -> tuple[list[RequestTiming], float]:
    transformers_generate(reference, workload[0].prompt_ids[:32], 4)
    start = time.perf_counter()
    timings = [transformers_generate(reference, r.prompt_ids, r.output_len) for r in workload]
    return timings, time.perf_counter() - start


def latency_summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    values = np.asarray(seconds) * 1000.0
    return {
        "mean_ms": float(values.mean()),
        "median_ms": float(np.median(values)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def serving_metrics(
    timings: list[RequestTiming], duration: float, concurrent: bool
) -> dict[str, Any]:
    """vLLM's serving numbers; sequential runs report each request's own service time."""
    prompt_tokens = sum(t.prompt_len for t in timings)
    output_tokens = sum(len(t.token_ids) for t in timings)
    return {
        "latency_clock": "from t=0 (all submitted together)"
        if concurrent
        else "from the start of each request's own generate call",
        "completed": len(timings),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(timings) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "ttft": latency_summary([t.ttft for t in timings]),
        "tpot": latency_summary([t.tpot for t in timings if t.tpot is not None]),
        "itl": latency_summary([gap for t in timings for gap in t.itls]),
        "e2e": latency_summary([t.e2e for t in timings]),
    }


def extrapolated_duration(measured: list[RequestTiming], workload: list[BenchRequest]) -> float:
    """Sequential time for the whole workload at the measured per-token prefill and decode cost."""
    prefill_per_token = sum(t.ttft for t in measured) / sum(t.prompt_len for t in measured)
    decode_steps = sum(len(t.token_ids) - 1 for t in measured)
    decode_per_token = sum(t.e2e - t.ttft for t in measured) / max(decode_steps, 1)
    return sum(
        prefill_per_token * len(r.prompt_ids) + decode_per_token * (r.output_len - 1)
        for r in workload
    )


def greedy_agreement(ours: list[RequestTiming], theirs: list[RequestTiming]) -> dict[str, Any]:
    """How far the two greedy outputs agree (transformers' min_new_tokens masks EOS)."""
    common = [
        next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
            min(len(a.token_ids), len(b.token_ids)),
        )
        for a, b in zip(ours, theirs, strict=False)
    ]
    return {
        "compared_requests": len(theirs),
        "identical_requests": sum(
            a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=False)
        ),
        "mean_identical_leading_tokens": float(np.mean(common)) if common else 0.0,
    }


def speculation_summary(config: EngineConfig, stats: dict[str, float]) -> dict[str, Any]:
    spec = config.speculative
    return {
        "method": spec.method,
        "num_speculative_tokens": spec.num_speculative_tokens,
        "disable_by_batch_size": spec.disable_by_batch_size,
        "acceptance_rate": stats.get("spec_acceptance_rate", 0.0),
        "decode_tokens_per_step": stats.get("decode_tokens_per_step", 1.0),
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(dtype=args.dtype, device="cpu"))
    workload = make_workload(
        loaded.tokenizer,
        args.num_requests,
        args.seed,
        (args.min_prompt, args.max_prompt),
        (args.min_output, args.max_output),
    )
    block_size = EngineConfig().block_size
    kv_bytes = (
        args.kv_cache_mib << 20
        if args.kv_cache_mib
        else pool_bytes_for(loaded, workload, block_size)
    )
    config = EngineConfig(
        kv_cache_bytes=kv_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        threads=args.threads,
        block_placement=args.block_placement,
    )
    report: dict[str, Any] = {
        "command": " ".join(["python -m ragcache.engine.bench_engine", *sys.argv[1:]]),
        "machine": machine_record(),
        "settings": {
            "model": loaded.name,
            "dtype": args.dtype,
            "num_requests": args.num_requests,
            "seed": args.seed,
            "prompt_tokens_range": [args.min_prompt, args.max_prompt],
            "output_tokens_range": [args.min_output, args.max_output],
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_bytes": kv_bytes,
            "block_size": block_size,
            "block_placement": args.block_placement,
        },
    }
    reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=loaded.dtype).eval()
    plain: tuple[list[RequestTiming], float, dict[str, float]] | None = None
    with torch.inference_mode():
        ours, ours_duration, stats = run_engine(loaded, workload, config)
        print(f"engine: {len(workload)} requests in {ours_duration:.1f} s", flush=True)
        if args.speculation_off_run and config.speculative.method != "off":
            plain_config = dataclasses.replace(
                config, speculative=dataclasses.replace(config.speculative, method="off")
            )
            plain = run_engine(loaded, workload, plain_config)
            print(f"engine, speculation off: {plain[1]:.1f} s", flush=True)
        baseline_count = min(args.baseline_requests or len(workload), len(workload))
        theirs, theirs_duration = run_transformers(reference, workload[:baseline_count])
        print(f"transformers: {baseline_count} requests in {theirs_duration:.1f} s", flush=True)
    report["engine"] = serving_metrics(ours, ours_duration, concurrent=True)
    report["engine"]["num_preemptions"] = stats["num_preemptions"]
    report["engine"]["num_steps"] = stats["num_steps"]
    report["engine"]["prefix_cache_hits"] = stats["prefix_cache_hits"]
    report["engine"]["speculation"] = speculation_summary(config, stats)
    if plain is not None:
        report["engine_speculation_off"] = serving_metrics(plain[0], plain[1], concurrent=True)
        report["engine_speculation_off"]["num_steps"] = plain[2]["num_steps"]
    measured = serving_metrics(theirs, theirs_duration, concurrent=False)
    extrapolated = baseline_count < len(workload)
    baseline: dict[str, Any] = {"measured_requests": baseline_count, "extrapolated": extrapolated}
    if extrapolated:
        full_duration = extrapolated_duration(theirs, workload)
        total_tokens = report["engine"]["prompt_tokens"] + report["engine"]["output_tokens"]
        baseline["extrapolation"] = (
            f"timed the first {baseline_count} of {len(workload)} requests; the full workload's "
            "sequential time is their mean prefill seconds per prompt token times all prompt "
            "tokens plus their mean decode seconds per output token times all later tokens"
        )
        baseline["estimated_duration_s"] = full_duration
        baseline["request_throughput"] = len(workload) / full_duration
        baseline["output_token_throughput"] = report["engine"]["output_tokens"] / full_duration
        baseline["total_token_throughput"] = total_tokens / full_duration
    else:
        for key in ("request_throughput", "output_token_throughput", "total_token_throughput"):
            baseline[key] = measured[key]
    baseline["measured"] = measured
    report["transformers"] = baseline
    ratio = report["engine"]["total_token_throughput"] / baseline["total_token_throughput"]
    report["total_token_throughput_ratio"] = ratio
    report["target_ratio"] = TARGET_RATIO
    report["meets_target"] = ratio >= TARGET_RATIO
    report["greedy_agreement"] = greedy_agreement(ours[:baseline_count], theirs)
    if plain is not None:
        off = report["engine_speculation_off"]
        report["speculation_off_ratio"] = (
            off["total_token_throughput"] / baseline["total_token_throughput"]
        )
        report["speculation_off_greedy_agreement"] = greedy_agreement(
            plain[0][:baseline_count], theirs
        )
        report["speculation_on_off_identical_requests"] = sum(
            a.token_ids == b.token_ids for a, b in zip(ours, plain[0], strict=True)
        )
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    print_table(report)
    write_report(args.out, report)
    return report


def print_table(report: dict[str, Any]) -> None:
    for line in table_lines(report):
        print(line)


def table_lines(report: dict[str, Any]) -> list[str]:
    ours, baseline = report["engine"], report["transformers"]
    theirs = baseline["measured"]
    off = report.get("engine_speculation_off")
    note = " (extrapolated)" if baseline["extrapolated"] else ""
    off_head = " ragcache engine, speculation off |" if off else ""

    def row(label: str, mine: str, plain: str, other: str) -> str:
        return f"| {label} | {mine} |" + (f" {plain} |" if off else "") + f" {other} |"

    def rate(metrics: dict[str, Any], key: str, digits: int) -> str:
        return f"{metrics[key]:.{digits}f}"

    lines = [
        f"| metric | ragcache engine |{off_head} transformers, sequential{note} |",
        "|---|---:|" + ("---:|" if off else "") + "---:|",
        row(
            "requests",
            str(ours["completed"]),
            str(off["completed"]) if off else "",
            f"{baseline['measured_requests']} timed",
        ),
    ]
    for label, key, digits in (
        ("request throughput (req/s)", "request_throughput", 3),
        ("output token throughput (tok/s)", "output_token_throughput", 1),
        ("total token throughput (tok/s)", "total_token_throughput", 1),
    ):
        lines.append(
            row(
                label,
                rate(ours, key, digits),
                rate(off, key, digits) if off else "",
                rate(baseline, key, digits),
            )
        )
    for name in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean_ms", "median_ms", "p99_ms"):
            lines.append(
                row(
                    f"{name.upper()} {stat.removesuffix('_ms')} (ms)",
                    f"{ours[name][stat]:.1f}",
                    f"{off[name][stat]:.1f}" if off else "",
                    f"{theirs[name][stat]:.1f}",
                )
            )
    spec = ours.get("speculation")
    agreement = report.get("greedy_agreement")
    if agreement:
        lines.append(
            f"\ngreedy outputs identical to transformers' on {agreement['identical_requests']} "
            f"of the {agreement['compared_requests']} requests timed on both sides"
        )
    lines.append(
        f"\ntotal token throughput ratio: {report['total_token_throughput_ratio']:.2f}x "
        f"(target >= {report['target_ratio']:.0f}x); engine latencies count from t=0 with "
        "every request queued at once, transformers latencies from each request's own start"
    )
    if spec:
        lines.append(
            f"\nspeculation ({spec['method']}, up to {spec['num_speculative_tokens']} drafts): "
            f"acceptance {spec['acceptance_rate']:.2f}, {spec['decode_tokens_per_step']:.2f} "
            "tokens per decode step"
        )
    if off:
        lines.append(
            f"\nwith speculation off: {report['speculation_off_ratio']:.2f}x; "
            f"{report['speculation_on_off_identical_requests']} of {ours['completed']} outputs "
            "identical with and without speculation"
        )
    return lines


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    settings = report["settings"]
    markdown = [
        "# Serving benchmark: continuous batching against transformers",
        "",
        f"`{report['command']}`",
        "",
        f"{settings['num_requests']} requests submitted at t=0, prompts of "
        f"{settings['prompt_tokens_range'][0]}-{settings['prompt_tokens_range'][1]} MuSiQue "
        f"tokens, outputs of {settings['output_tokens_range'][0]}-"
        f"{settings['output_tokens_range'][1]} tokens, {settings['model']} in "
        f"{settings['dtype']}, torch threads: {report['machine']['threads']}, KV block "
        f"placement: {settings['block_placement']}.",
        "",
        *table_lines(report),
        "",
    ]
    if report["transformers"]["extrapolated"]:
        markdown += [f"Baseline: {report['transformers']['extrapolation']}.", ""]
    path.with_suffix(".md").write_text("\n".join(markdown))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("eval/reports/bench_engine.json"))
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--min-prompt", type=int, default=256, help="shortest prompt (tokens)")
    parser.add_argument("--max-prompt", type=int, default=1024, help="longest prompt (tokens)")
    parser.add_argument("--min-output", type=int, default=64, help="shortest output (tokens)")
    parser.add_argument("--max-output", type=int, default=256, help="longest output (tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig().max_num_seqs)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens
    )
    parser.add_argument(
        "--block-placement",
        default=EngineConfig().block_placement,
        choices=("contiguous", "fifo"),
        help="where the engine puts each sequence's KV blocks",
    )
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        default=0,
        help="KV pool size; 0 sizes it to hold every request at once",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for both implementations; 0 keeps torch's default",
    )
    parser.add_argument(
        "--speculation-off-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve the workload with speculative decoding off and report it",
    )
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=0,
        help="time transformers on only the first N requests and extrapolate (0 = all)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_output <= args.max_output:
        parser.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-output <= --max-output")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_benchmark(args)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
