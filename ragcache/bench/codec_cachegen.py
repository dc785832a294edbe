"""Chunk KV codecs on real KV of the packaged model: bytes per token, reconstruction error,
encode and decode time, and whether the answer stays the raw KV's answer.

Per MuSiQue question, the first ``--passages`` passages are encoded once after the root
prompt (raw KV, the reference). Every codec writes each chunk as a tier record
(``encode_record``, the bytes the disk and remote tiers hold) and reads it back with every
layer's checksum checked; the decoded KV is fused with full reuse (only the question is
computed) and decoded greedily, so the only difference between answers is the codec.
A codec spec is a registered name or ``cachegen:K0,K1,K2/V0,V1,V2`` (steps of K and V per
layer group, in channel standard deviations; the registered cachegen is
0.5,0.25,0.5/0.3,2,2, chosen on questions 50-79 with ``--first 50``).

    python -m ragcache.bench.codec_cachegen --data ../shared/data/musique_dev.json \
        --questions 50 --passages 4 [--codecs raw int8 cachegen cachegen:0.5,0.7,0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import fuse
from ragcache.blending.prompt import PromptBuilder, PromptLayout
from ragcache.blending.registry import make_method
from ragcache.chunkstore.codec_cachegen import CacheGenPlan
from ragcache.chunkstore.codecs import Codec, cachegen_codec, get_codec
from ragcache.chunkstore.entry import ChunkEntry, decode_header, decode_layers, encode_record
from ragcache.engine.config import ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.examples import load_examples, passage_text
from ragcache.evaluation.fusion_eval import evaluation_engine
from ragcache.evaluation.metrics import agreeing_prefix


def codec_from_spec(spec: str) -> Codec:
    """A registered codec name, or ``cachegen:K0,K1,.../V0,V1,...`` (``cachegen:S0,...``:
    the same steps for K and V) for another plan over equal layer groups."""
    name, _, steps = spec.partition(":")
    if not steps:
        return get_codec(name)
    if name != "cachegen":
        raise ValueError(f"codec spec {spec!r}: only cachegen takes steps (cachegen:0.6,0.4/1,2)")
    key_text, _, value_text = steps.partition("/")
    key_steps = tuple(float(step) for step in key_text.split(","))
    value_steps = tuple(float(step) for step in (value_text or key_text).split(","))
    ends = tuple((i + 1) / len(key_steps) for i in range(len(key_steps)))
    # The name stays "cachegen": records name their codec, and decoding needs no plan.
    return cachegen_codec("cachegen", CacheGenPlan(ends, key_steps, value_steps))


@dataclass(slots=True)
class Sample:
    """One codec on one question: every chunk through a tier record and back."""

    codec: str
    question: int
    tokens: int
    record_bytes: int
    squared_error: float
    squared_norm: float
    max_error: float
    max_value: float
    encode_s: float
    decode_s: float
    answer_ids: list[int] = field(default_factory=list)
    raw_ids: list[int] = field(default_factory=list)

    @property
    def first_token_agrees(self) -> bool:
        return self.answer_ids[:1] == self.raw_ids[:1]

    @property
    def answer_agrees(self) -> bool:
        return self.answer_ids == self.raw_ids

    @property
    def agreeing_prefix(self) -> int:
        return agreeing_prefix(self.answer_ids, self.raw_ids)


class CodecBench:
    def __init__(self, engine: Engine, builder: PromptBuilder, max_tokens: int) -> None:
        self.engine = engine
        self.builder = builder
        self.encoder = ChunkEncoder(engine.model, builder.root_ids)
        self.method = make_method("full_reuse")
        self.params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def answer(self, layout: PromptLayout, chunks: list[ChunkKV]) -> list[int]:
        fused = fuse(self.engine.model, layout, self.encoder.root, chunks, self.method)
        seq = self.engine.add_request(
            fused.prompt_ids, self.params, placed=fused.placed, use_prefix_cache=False
        )
        while self.engine.has_unfinished():
            self.engine.step()
        return list(seq.output_ids)

    def through_codec(
        self, spec: str, codec: Codec, question: int, raw: list[ChunkKV]
    ) -> tuple[Sample, list[ChunkKV]]:
        sample = Sample(spec, question, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        decoded: list[ChunkKV] = []
        for index, chunk in enumerate(raw):
            layers = list(zip(chunk.k, chunk.v, strict=True))
            entry = ChunkEntry(f"q{question}-p{index}", chunk.token_ids, chunk.positions, layers)
            began = time.perf_counter()
            record = encode_record(entry, codec)
            encoded = time.perf_counter()
            header = decode_header(record)
            kv = decode_layers(record, header, range(header.num_layers), verify=True)
            sample.decode_s += time.perf_counter() - encoded
            sample.encode_s += encoded - began
            sample.tokens += chunk.num_tokens
            sample.record_bytes += len(record)
            for (k, v), (k_ref, v_ref) in zip(kv, layers, strict=True):
                for got, want in ((k, k_ref), (v, v_ref)):
                    difference = (got.float() - want.float()).abs()
                    sample.squared_error += float(difference.square().sum())
                    sample.squared_norm += float(want.float().square().sum())
                    sample.max_error = max(sample.max_error, float(difference.max()))
                    sample.max_value = max(sample.max_value, float(want.abs().max()))
            k_out, v_out = zip(*kv, strict=True)
            decoded.append(ChunkKV(chunk.token_ids, list(k_out), list(v_out), chunk.positions))
        return sample, decoded

    def run(
        self, question: int, item: dict, passages: int, codecs: dict[str, Codec]
    ) -> list[Sample]:
        chunk_ids = [self.builder.chunk_ids(passage_text(c)) for c in item["ctxs"][:passages]]
        layout = self.builder.layout(chunk_ids, item["question"])
        raw = self.encoder.encode(layout.chunk_ids)
        raw_ids = self.answer(layout, raw)
        samples = []
        for spec, codec in codecs.items():
            sample, decoded = self.through_codec(spec, codec, question, raw)
            sample.raw_ids = raw_ids
            sample.answer_ids = self.answer(layout, decoded)
            samples.append(sample)
        return samples


def summarize(samples: list[Sample], int8_bytes_per_token: float | None) -> dict[str, float]:
    tokens = sum(s.tokens for s in samples)
    bytes_per_token = sum(s.record_bytes for s in samples) / tokens
    return {
        "questions": len(samples),
        "bytes_per_token": bytes_per_token,
        "int8_over_this": (int8_bytes_per_token or float("nan")) / bytes_per_token,
        "relative_l2_error": (
            sum(s.squared_error for s in samples) / sum(s.squared_norm for s in samples)
        )
        ** 0.5,
        "max_error_over_max_value": max(s.max_error / s.max_value for s in samples),
        "first_token_agreement": statistics.fmean(s.first_token_agrees for s in samples),
        "answer_agreement": statistics.fmean(s.answer_agrees for s in samples),
        "agreeing_prefix_mean": statistics.fmean(s.agreeing_prefix for s in samples),
        "encode_ms_per_token": 1e3 * sum(s.encode_s for s in samples) / tokens,
        "decode_ms_per_token": 1e3 * sum(s.decode_s for s in samples) / tokens,
    }


def machine() -> dict[str, object]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            platform.processor(),
        )
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def print_table(rows: dict[str, dict[str, float]], passages: int, max_tokens: int) -> None:
    print(f"chunk KV codecs, {passages} passages a question, full reuse, greedy {max_tokens}")
    print(
        "| codec | questions | bytes/token | int8 / this | rel. L2 error | first token | "
        f"{max_tokens}-token answer | agreeing prefix | encode ms/token | decode ms/token |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, row in rows.items():
        print(
            f"| {spec} | {row['questions']} | {row['bytes_per_token']:.0f} | "
            f"{row['int8_over_this']:.2f}x | {row['relative_l2_error']:.4f} | "
            f"{row['first_token_agreement']:.1%} | {row['answer_agreement']:.1%} | "
            f"{row['agreeing_prefix_mean']:.2f} | "
            f"{row['encode_ms_per_token']:.3f} | {row['decode_ms_per_token']:.3f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON with passages")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--questions", type=int, default=50, help="N questions (0: all)")
    parser.add_argument(
        "--first", type=int, default=0, help="index of the first question (tune on a later slice)"
    )
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--codecs", nargs="+", default=["raw", "int8", "cachegen"])
    parser.add_argument("--out", default="eval/reports/codec_cachegen.json")
    args = parser.parse_args(argv)
    command = "python -m ragcache.bench.codec_cachegen " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    codecs = {spec: codec_from_spec(spec) for spec in args.codecs}
    examples = load_examples(args.data)[args.first :]
    examples = examples[: args.questions] if args.questions else examples
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    bench = CodecBench(evaluation_engine(loaded), PromptBuilder(loaded.tokenizer), args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    began = time.perf_counter()

    def write_report() -> dict[str, dict[str, float]]:
        """Rewritten after every question, so a stopped run leaves what it measured."""
        by_codec = {spec: [s for s in samples if s.codec == spec] for spec in codecs}
        int8 = by_codec.get("int8")
        int8_bytes = (
            sum(s.record_bytes for s in int8) / sum(s.tokens for s in int8) if int8 else None
        )
        rows = {spec: summarize(found, int8_bytes) for spec, found in by_codec.items() if found}
        report = {
            "command": command,
            "machine": machine(),
            "model": loaded.name,
            "kv_dtype": str(loaded.dtype).removeprefix("torch."),
            "passages": args.passages,
            "max_tokens": args.max_tokens,
            "seconds": time.perf_counter() - began,
            "summary": rows,
            "samples": [{**asdict(s), "first_token_agrees": s.first_token_agrees} for s in samples],
        }
        out.write_text(json.dumps(report, indent=1) + "\n")
        return rows

    for index, item in enumerate(examples, start=args.first):
        samples += bench.run(index, item, args.passages, codecs)
        rows = write_report()
        progress = ", ".join(
            f"{spec} {row['first_token_agreement']:.0%}" for spec, row in rows.items()
        )
        print(f"question {index}: first token agrees: {progress}", file=sys.stderr, flush=True)
    print_table(write_report(), args.passages, args.max_tokens)


if __name__ == "__main__":
    main()
