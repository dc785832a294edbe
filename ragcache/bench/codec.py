"""Answer quality of int8 chunk KV against raw chunk KV on MuSiQue questions.

Per question and passage count: every passage is encoded once after the root prompt;
the raw KV is used as computed, the int8 KV goes through an LMDB tier with the int8
codec (written, then read back with its checksum checked). Both are fused with full
reuse (only the question is computed) and decoded greedily, so the only difference
between the two answers is the codec.

    python -m ragcache.bench.codec --data ../shared/data/musique_dev.json \
        [--passages 2 4] [--out eval/reports/bench_codec.json]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ragcache.bench.report import bench_parser, command_line, write_json
from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import fuse
from ragcache.blending.prompt import PromptBuilder, PromptLayout
from ragcache.blending.registry import make_method
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.lmdb_tier import LMDBTier
from ragcache.engine.config import ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.examples import load_examples, passage_text
from ragcache.evaluation.fusion_eval import evaluation_engine
from ragcache.evaluation.metrics import agreeing_prefix


@dataclass(slots=True)
class Pair:
    question: int
    passages: int
    prompt_tokens: int
    raw_ids: list[int]
    int8_ids: list[int]
    kv_max_error: float
    """Largest |int8 - raw| over all K and V elements, relative to the largest |raw|."""

    @property
    def first_token_agrees(self) -> bool:
        return self.raw_ids[:1] == self.int8_ids[:1]

    @property
    def answer_agrees(self) -> bool:
        return self.raw_ids == self.int8_ids

    @property
    def agreeing_prefix(self) -> int:
        return agreeing_prefix(self.raw_ids, self.int8_ids)


class CodecComparison:
    def __init__(self, engine: Engine, builder: PromptBuilder, max_tokens: int, disk: LMDBTier):
        self.engine = engine
        self.builder = builder
        self.encoder = ChunkEncoder(engine.model, builder.root_ids)
        self.method = make_method("full_reuse")
        self.params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.disk = disk

    def _answer(self, layout: PromptLayout, chunks: list[ChunkKV]) -> list[int]:
        fused = fuse(self.engine.model, layout, self.encoder.root, chunks, self.method)
        seq = self.engine.add_request(
            fused.prompt_ids, self.params, placed=fused.placed, use_prefix_cache=False
        )
        while self.engine.has_unfinished():
            self.engine.step()
        return list(seq.output_ids)

    def _through_disk(self, chunk: ChunkKV, name: str) -> ChunkKV:
        entry = ChunkEntry(
            name, chunk.token_ids, chunk.positions, list(zip(chunk.k, chunk.v, strict=True))
        )
        self.disk.put(self.disk.prepare(entry))
        stored = self.disk.get(name)
        self.disk.delete(name)
        assert stored is not None
        k, v = zip(*stored.layers, strict=True)
        return ChunkKV(chunk.token_ids, list(k), list(v), chunk.positions)

    def compare(self, index: int, item: dict, passages: int) -> Pair:
        chunk_ids = [self.builder.chunk_ids(passage_text(c)) for c in item["ctxs"][:passages]]
        layout = self.builder.layout(chunk_ids, item["question"])
        raw = self.encoder.encode(layout.chunk_ids)
        int8 = [self._through_disk(c, f"q{index}-p{i}") for i, c in enumerate(raw)]
        error = max(
            float((b.float() - a.float()).abs().max() / a.float().abs().max())
            for raw_chunk, int8_chunk in zip(raw, int8, strict=True)
            for a, b in zip(
                (*raw_chunk.k, *raw_chunk.v), (*int8_chunk.k, *int8_chunk.v), strict=True
            )
        )
        return Pair(
            index,
            passages,
            len(layout),
            self._answer(layout, raw),
            self._answer(layout, int8),
            error,
        )


def summarize(pairs: list[Pair]) -> dict[str, float]:
    return {
        "questions": len(pairs),
        "prompt_tokens_mean": statistics.fmean(p.prompt_tokens for p in pairs),
        "first_token_agreement": statistics.fmean(p.first_token_agrees for p in pairs),
        "answer16_agreement": statistics.fmean(p.answer_agrees for p in pairs),
        "agreeing_prefix_mean": statistics.fmean(p.agreeing_prefix for p in pairs),
        "kv_max_relative_error": max(p.kv_max_error for p in pairs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("codec", __doc__, "eval/reports/bench_codec.json")
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON with passages")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--questions", type=int, default=0, help="first N questions (0: all)")
    parser.add_argument("--passages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    command = command_line("codec", argv)
    examples = load_examples(args.data)
    examples = examples[: args.questions] if args.questions else examples
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    engine = evaluation_engine(loaded)
    began = time.perf_counter()
    pairs: list[Pair] = []
    kv_dtype = str(engine.model.dtype).removeprefix("torch.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_report() -> dict[str, dict[str, float]]:
        """Rewritten after every question, so a stopped run leaves what it measured."""
        counts = sorted({p.passages for p in pairs})
        rows = {str(n): summarize([p for p in pairs if p.passages == n]) for n in counts}
        rows["all"] = summarize(pairs)
        report = {
            "command": command,
            "model": loaded.name,
            "kv_dtype": kv_dtype,
            "method": "full_reuse",
            "max_tokens": args.max_tokens,
            "seconds": time.perf_counter() - began,
            "summary": rows,
            "pairs": [asdict(p) for p in pairs],
        }
        write_json(out, report)
        return rows

    with tempfile.TemporaryDirectory() as directory:
        disk = LMDBTier(Path(directory), ChunkStoreConfig(disk_codec="int8"))
        comparison = CodecComparison(engine, PromptBuilder(loaded.tokenizer), args.max_tokens, disk)
        for passages in args.passages:
            for index, item in enumerate(examples):
                pairs.append(comparison.compare(index, item, passages))
                write_report()
                agreed = sum(p.first_token_agrees for p in pairs)
                print(
                    f"{passages} passages, question {index}: first tokens agree on "
                    f"{agreed} of {len(pairs)}",
                    file=sys.stderr,
                    flush=True,
                )
        disk.close()
    rows = write_report()
    print(f"int8 vs raw chunk KV, full reuse, greedy {args.max_tokens} tokens, KV {kv_dtype}")
    print(
        "| passages | questions | prompt tokens | first token | 16-token answer | "
        "agreeing prefix | max KV error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['questions']} | {row['prompt_tokens_mean']:.0f} | "
            f"{row['first_token_agreement']:.1%} | {row['answer16_agreement']:.1%} | "
            f"{row['agreeing_prefix_mean']:.2f} | {row['kv_max_relative_error']:.4f} |"
        )


if __name__ == "__main__":
    main()
