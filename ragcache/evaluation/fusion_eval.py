"""Measures every fusion setting against full prefill on MuSiQue-style examples.

Per example: the chunks are encoded once (as if already in the host tier), full
prefill gives the reference greedy answer, then every setting is timed to its first
token and scored by the teacher-forced NLL of the reference answer, 16-token
agreement, first-token agreement, and F1/EM against the gold answers.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.methods import make_method
from ragcache.chunkstore.codecs import CODECS, get_codec
from ragcache.engine.engine import Engine
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.metrics import (
    exact_match,
    f1_score,
    gap_closed,
    mean_nll,
    prefix_agreement,
)
from ragcache.prompt import PromptBuilder, PromptLayout


@dataclass(slots=True)
class Setting:
    label: str
    method: str
    params: dict[str, float] = field(default_factory=dict)
    codec: str = "raw"


def default_sweep() -> list[Setting]:
    sweep = [
        Setting("full_prefill", "full_prefill"),
        Setting("prefix_only", "prefix_only"),
        Setting("full_reuse", "full_reuse"),
    ]
    for ratio in (0.05, 0.1, 0.15, 0.3, 0.5):
        sweep.append(Setting(f"cacheblend-{ratio}", "cacheblend", {"ratio": ratio}))
    for k in (8, 16, 32, 64):
        sweep.append(Setting(f"legolink-{k}", "legolink", {"k": k}))
    return sweep


def parse_settings(specs: Iterable[str]) -> list[Setting]:
    """'cacheblend:ratio=0.15,check_layer=1' -> Setting; a bare name takes defaults.

    ``codec=int8`` stores the chunks' KV through that codec before fusing them.
    """
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        params: dict[str, float] = {}
        codec = "raw"
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            if key == "codec":
                codec = value
            else:
                params[key] = float(value)
        label = name + "".join(f"-{v:g}" for v in params.values())
        label += "" if codec == "raw" else f"-{codec}"
        out.append(Setting(label, name, params, codec))
    return out


def through_codec(chunks: list[ChunkKV], codec_name: str) -> list[ChunkKV]:
    """The chunks as a store with that codec would hand them back."""
    codec = get_codec(codec_name)
    out = []
    for chunk in chunks:
        k = [codec.decode(codec.encode(t), t.dtype, tuple(t.shape)) for t in chunk.k]
        v = [codec.decode(codec.encode(t), t.dtype, tuple(t.shape)) for t in chunk.v]
        out.append(ChunkKV(chunk.token_ids, k, v, chunk.positions))
    return out


@dataclass(slots=True)
class Outcome:
    example: int
    setting: str
    ttft_s: float
    prepare_s: float
    recompute_fraction: float
    answer_ids: list[int]
    answer: str
    nll: float
    agree16: float
    first_token: float
    f1: float
    em: float


class FusionEvaluator:
    def __init__(
        self,
        engine: Engine,
        builder: PromptBuilder,
        max_new_tokens: int = 16,
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.builder = builder
        self.max_new_tokens = max_new_tokens
        self.encoder = ChunkEncoder(self.model, builder.root_ids)

    def layout(self, item: dict[str, Any], passages: int) -> PromptLayout:
        chunks = [
            self.builder.chunk_ids(f"{ctx['title']}\n{ctx['text']}")
            for ctx in item["ctxs"][:passages]
        ]
        return self.builder.layout(chunks, item["question"])

    def _run(
        self, fused: FusedRequest, extra_ids: list[int], params: SamplingParams
    ) -> tuple[list[int], dict[int, float], float]:
        began = time.perf_counter()
        seq = self.engine.add_request(
            fused.prompt_ids + extra_ids,
            params,
            placed=fused.placed,
            use_prefix_cache=fused.use_prefix_cache,
        )
        first: float | None = None
        while self.engine.has_unfinished():
            if self.engine.step() and first is None:
                first = time.perf_counter()
        return seq.output_ids, seq.prompt_logprobs, (first or time.perf_counter()) - began

    def _fuse(self, layout: PromptLayout, chunks: list[ChunkKV], setting: Setting):
        method = make_method(setting.method, **setting.params)
        return fuse(self.model, layout, self.encoder.root, chunks, method, setting.params)

    def evaluate(
        self, index: int, item: dict[str, Any], settings: list[Setting], passages: int
    ) -> list[Outcome]:
        layout = self.layout(item, passages)
        chunks = self.encoder.encode(layout.chunk_ids)
        greedy = SamplingParams(max_tokens=self.max_new_tokens, ignore_eos=False)
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=True)
        reference = self._fuse(layout, chunks, Setting("full_prefill", "full_prefill"))
        ref_ids, _, _ = self._run(reference, [], greedy)
        if ref_ids and ref_ids[-1] in self.engine.eos_ids:
            ref_ids = ref_ids[:-1]
        ref_ids = ref_ids or [(self.engine.eos_ids and min(self.engine.eos_ids)) or 0]
        start = len(layout)
        outcomes = []
        for setting in settings:
            stored = chunks if setting.codec == "raw" else through_codec(chunks, setting.codec)
            fused = self._fuse(layout, stored, setting)
            prepare = fused.report.prepare_s
            ids, _, ttft = self._run(fused, [], greedy)
            _, logprobs, _ = self._run(fused, ref_ids, scoring)
            answer_lp = [logprobs[i] for i in range(start, start + len(ref_ids))]
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=True).strip()
            clean = [t for t in ids if t not in self.engine.eos_ids]
            outcomes.append(
                Outcome(
                    example=index,
                    setting=setting.label,
                    ttft_s=ttft + prepare,
                    prepare_s=prepare,
                    recompute_fraction=fused.report.recompute_fraction,
                    answer_ids=ids,
                    answer=text,
                    nll=mean_nll(answer_lp),
                    agree16=prefix_agreement(clean, ref_ids, 16),
                    first_token=prefix_agreement(clean, ref_ids, 1),
                    f1=f1_score(text, item.get("answers", [])),
                    em=exact_match(text, item.get("answers", [])),
                )
            )
        return outcomes


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    by_setting: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_setting.setdefault(outcome.setting, []).append(outcome)
    summary = {}
    for label, rows in by_setting.items():
        summary[label] = {
            "examples": len(rows),
            "nll": statistics.fmean(r.nll for r in rows),
            "agree16": statistics.fmean(r.agree16 for r in rows),
            "first_token": statistics.fmean(r.first_token for r in rows),
            "f1": statistics.fmean(r.f1 for r in rows),
            "em": statistics.fmean(r.em for r in rows),
            "ttft_s": statistics.median(r.ttft_s for r in rows),
            "recompute_fraction": statistics.fmean(r.recompute_fraction for r in rows),
        }
    _codec_agreement(by_setting, summary)
    full = summary.get("full_prefill")
    reuse = summary.get("full_reuse")
    for row in summary.values():
        if full:
            row["speedup"] = full["ttft_s"] / row["ttft_s"]
        if full and reuse:
            row["gap_closed"] = gap_closed(row["nll"], reuse["nll"], full["nll"])
    return summary


def _codec_agreement(
    by_setting: dict[str, list[Outcome]], summary: dict[str, dict[str, float]]
) -> None:
    """For a '<setting>-<codec>' row, agreement with the same setting on raw KV."""
    for label, rows in by_setting.items():
        base_label, _, codec = label.rpartition("-")
        if codec not in CODECS or codec == "raw" or base_label not in by_setting:
            continue
        base = {r.example: r.answer_ids for r in by_setting[base_label]}
        pairs = [(r.answer_ids, base[r.example]) for r in rows if r.example in base]
        if pairs:
            summary[label]["first_token_vs_raw"] = statistics.fmean(
                prefix_agreement(a, b, 1) for a, b in pairs
            )
            summary[label]["agree16_vs_raw"] = statistics.fmean(
                prefix_agreement(a, b, 16) for a, b in pairs
            )


def load_outcomes(path: Path) -> list[Outcome]:
    if not path.is_file():
        return []
    return [Outcome(**json.loads(line)) for line in path.read_text().splitlines() if line]


def append_outcomes(path: Path, outcomes: list[Outcome]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for outcome in outcomes:
            handle.write(json.dumps(asdict(outcome)) + "\n")
