"""Serving benchmark: the engine's continuous batching against transformers, one request at a time.

    python -m ragcache.bench.engine --out eval/reports/bench_engine.json

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
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from ragcache.bench.engine_metrics import (
    extrapolated_duration,
    greedy_agreement,
    serving_metrics,
    speculation_summary,
)
from ragcache.bench.engine_records import BenchRequest, RequestTiming
from ragcache.bench.engine_report import markdown_page, table_lines
from ragcache.bench.llama_server import (
    BUILD_HINT,
    UNKNOWN_TOKEN,
    locate_llama_server,
    serve_with_llama_server,
)
from ragcache.bench.report import (
    add_threads,
    bench_parser,
    end_machine_record,
    report_header,
    set_threads,
    write_report,
)
from ragcache.engine.config import EngineConfig, ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel, load_model, locate_embedded_gguf
from ragcache.engine.sampling_params import SamplingParams

MUSIQUE = Path("/work/shared/data/musique_dev.json")
TARGET_RATIO = 4.0
LLAMA_SERVER_TARGET_RATIO = 1.5


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


def serve(
    engine: Engine, workload: list[BenchRequest], adapters: list[str | None] | None = None
) -> tuple[list[RequestTiming], float]:
    """Submits every request at t=0 (each with its adapter) and steps until all finish."""
    start = time.perf_counter()
    timings: dict[str, RequestTiming] = {}
    for index, request in enumerate(workload):
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        adapter = adapters[index] if adapters else None
        seq = engine.add_request(request.prompt_ids, params, adapter=adapter)
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
    return list(timings.values()), time.perf_counter() - start


def run_engine(
    loaded: LoadedModel, workload: list[BenchRequest], config: EngineConfig
) -> tuple[list[RequestTiming], float, dict[str, float]]:
    engine = Engine(loaded, config)
    warmup = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request(workload[0].prompt_ids[:32], warmup, use_prefix_cache=False)
    while engine.has_unfinished():
        engine.step()
    ordered, duration = serve(engine, workload)
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


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    set_threads(args.threads)
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
        **report_header("engine"),
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
    report["llama_server"] = llama_server_comparison(args, config, workload, ours, report)
    end_machine_record(report)
    write_report(args.out, report, markdown_page(report), table_lines(report))
    return report


def llama_server_comparison(
    args: argparse.Namespace,
    config: EngineConfig,
    workload: list[BenchRequest],
    ours: list[RequestTiming],
    report: dict[str, Any],
) -> dict[str, Any]:
    """llama-server with as many slots as the engine's batch serves the same workload on
    the same GGUF file and threads, after the engine (the machine's other load alike)."""
    if not args.llama_server_run:
        return {"skipped": "--no-llama-server"}
    binary = locate_llama_server(args.llama_server)
    if binary is None:
        print(BUILD_HINT, flush=True)
        return {"skipped": BUILD_HINT}
    threads = torch.get_num_threads()
    slots = min(config.max_num_seqs, len(workload))
    try:
        timings, duration = serve_with_llama_server(
            binary, locate_embedded_gguf(), workload, slots, threads
        )
    except RuntimeError as failure:  # the engine's figures stand without the baseline
        print(f"llama-server baseline failed: {failure}", flush=True)
        return {"skipped": f"llama-server failed: {failure}"}
    print(f"llama-server ({slots} slots): {len(workload)} requests in {duration:.1f} s", flush=True)
    metrics = serving_metrics(timings, duration, concurrent=True)
    ratio = report["engine"]["total_token_throughput"] / metrics["total_token_throughput"]
    return {
        "binary": str(binary),
        "slots": slots,
        "threads": threads,
        "metrics": metrics,
        "total_token_throughput_ratio": ratio,
        "target_ratio": LLAMA_SERVER_TARGET_RATIO,
        "meets_target": ratio >= LLAMA_SERVER_TARGET_RATIO,
        "greedy_agreement": greedy_agreement(ours, timings),
        "tokens_unsent_by_stream": sum(t.token_ids.count(UNKNOWN_TOKEN) for t in timings),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("engine", __doc__, "eval/reports/bench_engine.json")
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
    add_threads(parser, "torch CPU threads for both implementations; 0 keeps torch's default")
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
    parser.add_argument(
        "--llama-server",
        help="llama-server binary (default: $RAGCACHE_LLAMA_SERVER, then the build script's)",
    )
    parser.add_argument(
        "--llama-server-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve the workload with llama-server on the same GGUF file where found",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_output <= args.max_output:
        parser.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-output <= --max-output")
    return args


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
