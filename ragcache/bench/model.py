"""Throughput of the engine's own forward pass against transformers on the same weights.

    python -m ragcache.bench.model --out eval/reports/bench_model.json

Both implementations load SmolLM2 from the same converted folder in the same dtype and
run interleaved in one process: prefill tokens/s at several prompt lengths (last-token
logits only on both sides), and batch-1 greedy decode tokens/s. Peak memory and load
times are measured in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ragcache.bench.llama_cpp import greedy_decode, llama_cpp_missing, open_llama, prefill_seconds
from ragcache.bench.model_passes import (
    BLOCK_SIZE,
    corpus_token_ids,
    interleaved,
    ours_greedy_timed,
    ours_prefill,
    pool_for,
    transformers_greedy_timed,
    transformers_prefill,
)
from ragcache.bench.report import bench_parser, end_machine_record, report_header, write_json
from ragcache.engine.config import ModelConfig
from ragcache.engine.linear import Projection
from ragcache.engine.loader import (
    PACKED_WEIGHTS_MODES,
    LoadedModel,
    convert_gguf,
    load_model,
    locate_embedded_gguf,
)

PREFIX_PROBE_LENGTH = 6000


@dataclass(slots=True)
class Row:
    """One point, timed in pairs (ours then transformers, ``repeats`` times). ``ratio``
    is the median over pairs of transformers' seconds / ours, so each ratio compares two
    runs made one right after the other; the tokens/s are from each side's median."""

    dtype: str
    weights: str
    metric: str
    tokens: int
    ours_seconds: list[float]
    transformers_seconds: list[float]
    ours_tokens_per_s: float = field(init=False)
    transformers_tokens_per_s: float = field(init=False)
    ratio: float = field(init=False)
    pair_ratios: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.ours_tokens_per_s = self.tokens / statistics.median(self.ours_seconds)
        self.transformers_tokens_per_s = self.tokens / statistics.median(self.transformers_seconds)
        self.pair_ratios = [
            theirs / ours
            for ours, theirs in zip(self.ours_seconds, self.transformers_seconds, strict=True)
        ]
        self.ratio = statistics.median(self.pair_ratios)


def packed_copy_bytes(loaded: LoadedModel) -> int:
    model = loaded.model
    copies = [m.packed for m in model.modules() if isinstance(m, Projection)]
    copies.append(model.output_packed)
    return sum(copy.nbytes for copy in copies if copy is not None)


def weights_name(loaded: LoadedModel) -> str:
    """Which weights products of a few rows read: how many matrices have a packed copy."""
    model = loaded.model
    matrices = [m for m in model.modules() if isinstance(m, Projection)]
    copies = [m.packed for m in matrices if m.packed is not None]
    if model.output_packed is not None:
        copies.append(model.output_packed)
    if not copies:
        return "as loaded"
    kind = "exact blocks" if copies[0].mode == "exact_blocks" else "int4/bf16"
    return f"{kind}, {len(copies)} of {len(matrices) + 1}"


def bench_prefill(
    loaded: LoadedModel, reference: Any, dtype_name: str, length: int, repeats: int
) -> Row:
    ids = torch.tensor(corpus_token_ids(loaded.tokenizer, length))
    pool = pool_for(loaded.model, length)
    ours_s, theirs_s = interleaved(
        lambda: ours_prefill(loaded.model, pool, ids),
        lambda: transformers_prefill(reference, ids),
        repeats,
    )
    return Row(dtype_name, weights_name(loaded), "prefill", length, ours_s, theirs_s)


def bench_decode(
    loaded: LoadedModel,
    reference: Any,
    dtype_name: str,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
) -> tuple[Row, int]:
    """Decode tokens/s from the first generated token to the last on each side (the
    prompt's prefill is not timed), in pairs, and how many leading greedy tokens the two
    implementations share."""
    ids = torch.tensor(corpus_token_ids(loaded.tokenizer, prompt_len))
    pool = pool_for(loaded.model, prompt_len + new_tokens)
    ours_tokens, _ = ours_greedy_timed(loaded.model, pool, ids, new_tokens)  # warm-up
    theirs_tokens, _ = transformers_greedy_timed(reference, ids, new_tokens)
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(ours_greedy_timed(loaded.model, pool, ids, new_tokens)[1])
        theirs_s.append(transformers_greedy_timed(reference, ids, new_tokens)[1])
    agreeing = next(
        (i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens, strict=True)) if a != b),
        new_tokens,
    )
    # new_tokens - 1 steps between the first token and the last
    row = Row(dtype_name, weights_name(loaded), "decode_b1", new_tokens - 1, ours_s, theirs_s)
    return row, agreeing


def bench_llama_cpp(loaded: LoadedModel, rows: list[Row], args: argparse.Namespace) -> dict:
    """llama.cpp on the embedded GGUF file with this process's thread count, right after
    our rows: prefill of the same token ids and greedy decode after the same prompt.
    ``ratio`` is llama.cpp's median seconds / ours (above 1: ours is faster)."""
    missing = llama_cpp_missing()
    if missing is not None:
        print(missing, flush=True)
        return {"skipped": missing}
    threads = torch.get_num_threads()
    lengths = [n for n in args.prefill_lengths if n <= 2048]
    context = max([*lengths, args.decode_prompt + args.decode_tokens]) + 16
    llama = open_llama(locate_embedded_gguf(), threads, context)
    result: dict[str, Any] = {"threads": threads, "prefill": {}, "decode_b1": {}}
    for length in lengths:
        ids = corpus_token_ids(loaded.tokenizer, length)
        prefill_seconds(llama, ids)
        seconds = [prefill_seconds(llama, ids) for _ in range(args.repeats)]
        ours = next(r for r in rows if r.metric == "prefill" and r.tokens == length)
        result["prefill"][str(length)] = llama_cpp_point(length, seconds, ours)
    ids = corpus_token_ids(loaded.tokenizer, args.decode_prompt)
    greedy_decode(llama, ids, args.decode_tokens)
    seconds = [greedy_decode(llama, ids, args.decode_tokens)[1] for _ in range(args.repeats)]
    ours = next(r for r in rows if r.metric == "decode_b1")
    result["decode_b1"] = llama_cpp_point(args.decode_tokens - 1, seconds, ours)
    for name, point in [*result["prefill"].items(), ("decode", result["decode_b1"])]:
        print(
            f"llama.cpp {name}: {point['llama_cpp_tokens_per_s']:.1f} tok/s, "
            f"ours {point['ours_tokens_per_s']:.1f}, ratio {point['ratio']:.2f}",
            flush=True,
        )
    return result


def llama_cpp_point(tokens: int, seconds: list[float], ours: Row) -> dict[str, float]:
    theirs = statistics.median(seconds)
    mine = statistics.median(ours.ours_seconds)
    return {
        "tokens": tokens,
        "llama_cpp_seconds": seconds,
        "llama_cpp_tokens_per_s": tokens / theirs,
        "ours_tokens_per_s": tokens / mine,
        "ratio": theirs / mine,
    }


# ---- fresh-process probes ---------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; ``ru_maxrss`` keeps
    the forking parent's peak, which here holds several models."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_memory(dtype_name: str, implementation: str, packed: str = "off") -> dict[str, float]:
    """Peak RSS after loading, then after one 6000-token prefill (this process only)."""
    if implementation == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = convert_gguf(locate_embedded_gguf(), Path(ModelConfig().cache_dir).expanduser())
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype_name))
        ids = torch.tensor(
            corpus_token_ids(AutoTokenizer.from_pretrained(source), PREFIX_PROBE_LENGTH)
        )
        after_load = peak_rss_mib()
        with torch.inference_mode():
            transformers_prefill(reference.eval(), ids)
    else:
        loaded = load_model(ModelConfig(dtype=dtype_name, device="cpu", packed_weights=packed))
        ids = torch.tensor(corpus_token_ids(loaded.tokenizer, PREFIX_PROBE_LENGTH))
        after_load = peak_rss_mib()
        with torch.inference_mode():
            ours_prefill(loaded.model, pool_for(loaded.model, PREFIX_PROBE_LENGTH), ids)
    return {"peak_rss_after_load_mib": after_load, "peak_rss_after_prefill_mib": peak_rss_mib()}


def probe_load(dtype_name: str, cache_dir: str) -> dict[str, float]:
    start = time.perf_counter()
    load_model(ModelConfig(dtype=dtype_name, device="cpu", cache_dir=cache_dir))
    return {"load_seconds": time.perf_counter() - start}


def run_probe(*args: str) -> dict[str, float]:
    command = [sys.executable, "-m", "ragcache.bench.model", "--probe", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_process_costs(dtype_name: str) -> dict[str, Any]:
    memory = {
        "ours": run_probe("memory", dtype_name, "ours", "auto"),
        "ours_fp32_weights_only": run_probe("memory", dtype_name, "ours", "off"),
        "transformers": run_probe("memory", dtype_name, "transformers"),
    }
    with tempfile.TemporaryDirectory(prefix="ragcache-bench-cache-") as cache_dir:
        cold = run_probe("load", dtype_name, cache_dir)["load_seconds"]
        warm = run_probe("load", dtype_name, cache_dir)["load_seconds"]
    return {
        "dtype": dtype_name,
        "memory_6000_prefill": memory,
        "cold_load_seconds": cold,
        "warm_load_seconds": warm,
    }


# ---- report -----------------------------------------------------------------------------


def print_table(rows: list[Row], costs: list[dict[str, Any]]) -> None:
    print(
        f"{'dtype':9} {'weights':24} {'metric':10} {'tokens':>6} {'ours tok/s':>11} "
        f"{'hf tok/s':>10} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r.dtype:9} {r.weights:24} {r.metric:10} {r.tokens:6d} {r.ours_tokens_per_s:11.1f} "
            f"{r.transformers_tokens_per_s:10.1f} {r.ratio:6.2f}"
        )
    for c in costs:
        mem = c["memory_6000_prefill"]
        print(
            f"{c['dtype']}: peak RSS load+6000 prefill ours "
            f"{mem['ours']['peak_rss_after_prefill_mib']:.0f} MiB (without block copies "
            f"{mem['ours_fp32_weights_only']['peak_rss_after_prefill_mib']:.0f}), transformers "
            f"{mem['transformers']['peak_rss_after_prefill_mib']:.0f} MiB; "
            f"cold load {c['cold_load_seconds']:.1f} s, warm load {c['warm_load_seconds']:.1f} s"
        )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every point, rewriting ``args.out`` after each so a long run leaves results."""
    from transformers import AutoModelForCausalLM

    rows: list[Row] = []
    report: dict[str, Any] = {
        **report_header("model"),
        "settings": {
            "block_size": BLOCK_SIZE,
            "repeats": args.repeats,
            "decode_prompt_tokens": args.decode_prompt,
            "decode_new_tokens": args.decode_tokens,
        },
        "rows": [],
        "greedy_tokens_identical": {},
        "greedy_leading_tokens_identical": {},
        "packed_copy_mib": {},
        "process_costs": [],
    }
    for dtype_name in args.dtypes:
        models = {
            mode: load_model(ModelConfig(dtype=dtype_name, device="cpu", packed_weights=mode))
            for mode in args.packed_weights
        }
        loaded = models[args.packed_weights[0]]
        reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=loaded.dtype).eval()
        with torch.inference_mode():
            for length in args.prefill_lengths:
                repeats = args.repeats if length <= 2048 else max(1, args.repeats - 1)
                rows.append(bench_prefill(loaded, reference, dtype_name, length, repeats))
                print(rows[-1].metric, dtype_name, length, f"{rows[-1].ratio:.2f}", flush=True)
                write_report(args.out, report, rows)
            for mode, decoded in models.items():
                row, agreeing = bench_decode(
                    decoded,
                    reference,
                    dtype_name,
                    args.decode_prompt,
                    args.decode_tokens,
                    args.repeats,
                )
                rows.append(row)
                key = f"{dtype_name}, packed_weights={mode}"
                report["greedy_tokens_identical"][key] = agreeing == args.decode_tokens
                report["greedy_leading_tokens_identical"][key] = agreeing
                report["packed_copy_mib"][key] = packed_copy_bytes(decoded) / 2**20
                print(row.metric, dtype_name, mode, f"{row.ratio:.2f}", agreeing, flush=True)
                write_report(args.out, report, rows)
        if args.llama_cpp and dtype_name == args.dtypes[0]:
            report["llama_cpp"] = bench_llama_cpp(loaded, rows, args)
            write_report(args.out, report, rows)
        del loaded, models, reference
    if args.process_costs:
        for dtype_name in args.dtypes:
            report["process_costs"].append(bench_process_costs(dtype_name))
            write_report(args.out, report, rows)
    print_table(rows, report["process_costs"])
    end_machine_record(report)
    write_report(args.out, report, rows)
    return report


def write_report(path: Path, report: dict[str, Any], rows: list[Row]) -> None:
    report["rows"] = [asdict(r) for r in rows]
    write_json(path, report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("model", __doc__, "eval/reports/bench_model.json")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prefill-lengths", nargs="+", type=int, default=[512, 2048, 6000])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed pairs per point (median of pair ratios)"
    )
    parser.add_argument(
        "--packed-weights",
        nargs="+",
        default=["auto", "off"],
        choices=list(PACKED_WEIGHTS_MODES),
        help="model.packed_weights settings to decode with (prefill uses the first)",
    )
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument(
        "--no-process-costs",
        dest="process_costs",
        action="store_false",
        help="skip the subprocess memory and load-time probes",
    )
    parser.add_argument(
        "--no-llama-cpp",
        dest="llama_cpp",
        action="store_false",
        help="skip llama.cpp on the same GGUF file (timed when llama-cpp-python is installed)",
    )
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        kind, *rest = args.probe
        result = probe_memory(*rest) if kind == "memory" else probe_load(*rest)
        print(json.dumps(result))
        return
    run_benchmark(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
