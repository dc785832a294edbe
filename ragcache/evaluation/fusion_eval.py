"""Measures every fusion setting against full prefill on MuSiQue-style examples.

Per example: the chunks are encoded once and stored in the chosen tier (host memory,
LMDB raw or LMDB int8), full prefill gives the reference greedy answer, then every
setting is timed to its first token and to its last, from before its first tier read:
the read, the codec's decode, the move to the engine, selection and every pass count.
Each is scored by the teacher-forced NLL of the reference answer, 16-token agreement,
first-token agreement, and F1/EM/containment against the gold answers. The
`transformers` setting runs the same prompt through plain transformers generate, the
baseline a reader would otherwise use.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.blending.methods import MethodParam
from ragcache.blending.prompt import PromptBuilder, PromptLayout
from ragcache.blending.registry import METHOD_NAMES, TEXT_PARAMS, make_method
from ragcache.chunkstore.codecs import CODECS, get_codec
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.chunk_tier import CHUNK_TIERS, ChunkTier
from ragcache.evaluation.examples import passage_text
from ragcache.evaluation.hf_baseline import BASELINE_LABEL, TransformersBaseline
from ragcache.evaluation.metrics import (
    answer_contains,
    exact_match,
    f1_score,
    mean_nll,
    prefix_agreement,
)
from ragcache.evaluation.outcomes import Outcome

LOADS = ("layers", "whole")


@dataclass(slots=True)
class Setting:
    label: str
    method: str
    params: dict[str, MethodParam] = field(default_factory=dict)
    codec: str = "raw"
    tier: str | None = None  # where its chunks are read from; None: the run's --chunk-tier
    load: str = "layers"  # layers: streamed while fusion computes; whole: read first


def evaluation_engine(loaded: LoadedModel) -> Engine:
    """The engine fidelity runs use: no prefix cache (every setting uses its own KV,
    never a previous run's) and no drafts (end-to-end times compare fusion alone)."""
    return Engine(
        loaded,
        EngineConfig(
            kv_cache_bytes=1 << 30,
            max_num_batched_tokens=8192,
            enable_prefix_caching=False,
            speculative=SpeculativeConfig(method="off"),
        ),
    )


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
    sweep.append(Setting("gradual-0.15", "gradual", {"ratio": 0.15}))
    sweep.append(Setting("gradual_weighted-0.15", "gradual_weighted", {"ratio": 0.15}))
    sweep.append(Setting("queryblend-0.15", "queryblend", {"ratio": 0.15}))
    return sweep


def parse_settings(specs: Iterable[str]) -> list[Setting]:
    """'cacheblend:ratio=0.15,check_layer=1' -> Setting; a bare name takes defaults.

    ``codec=int8`` stores the chunks' KV through that codec before fusing them;
    ``tier=lmdb`` reads them from that tier (host, lmdb, lmdb-int8) instead of the run's;
    ``load=whole`` reads every entry whole before fusing (default: layer by layer); the
    parameters in ``TEXT_PARAMS`` take names (``cachefocus:order=relevance``).
    """
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        if name not in METHOD_NAMES and name != BASELINE_LABEL:
            known = ", ".join((*METHOD_NAMES, BASELINE_LABEL))
            raise ValueError(f"setting {spec!r}: unknown method {name!r}; use one of {known}")
        params: dict[str, MethodParam] = {}
        codec = "raw"
        tier: str | None = None
        load = "layers"
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            if not value:
                raise ValueError(f"setting {spec!r}: {pair!r} is not key=value")
            if key == "codec":
                if value not in CODECS:
                    raise ValueError(
                        f"setting {spec!r}: codec {value!r} is not one of {sorted(CODECS)}"
                    )
                codec = value
            elif key == "tier":
                if value not in CHUNK_TIERS:
                    raise ValueError(
                        f"setting {spec!r}: tier {value!r} is not one of {', '.join(CHUNK_TIERS)}"
                    )
                tier = value
            elif key == "load":
                if value not in LOADS:
                    raise ValueError(
                        f"setting {spec!r}: load {value!r} is not one of {', '.join(LOADS)}"
                    )
                load = value
            elif key in TEXT_PARAMS:
                if value not in TEXT_PARAMS[key]:
                    choices = ", ".join(TEXT_PARAMS[key])
                    raise ValueError(f"setting {spec!r}: {key}={value!r} is not one of {choices}")
                params[key] = value
            else:
                try:
                    params[key] = float(value)
                except ValueError:
                    raise ValueError(f"setting {spec!r}: {key}={value!r} is not a number") from None
        label = name + "".join(
            f"-{v}" if isinstance(v, str) else f"-{v:g}" for v in params.values()
        )
        label += "" if tier is None else f"-{tier}"
        label += "" if load == "layers" else f"-{load}"
        label += "" if codec == "raw" else f"-{codec}"
        out.append(Setting(label, name, params, codec, tier, load))
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
class _Run:
    answer_ids: list[int]
    prompt_logprobs: dict[int, float]
    ttft_s: float
    e2e_s: float
    token_logprobs: list[float]


class FusionEvaluator:
    def __init__(
        self,
        engine: Engine,
        builder: PromptBuilder,
        max_new_tokens: int = 16,
        baseline: TransformersBaseline | None = None,
        chunk_tier: str = "host",
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.builder = builder
        self.max_new_tokens = max_new_tokens
        self.baseline = baseline
        self.encoder = ChunkEncoder(self.model, builder.root_ids)
        self.target = EngineTarget.of(self.model)
        self.chunk_tier = chunk_tier
        self.tiers: dict[str, ChunkTier] = {}

    def tier(self, name: str) -> ChunkTier:
        if name not in self.tiers:
            loaded = self.engine.loaded
            self.tiers[name] = ChunkTier(
                name, loaded.fingerprint, str(loaded.dtype), self.builder.root_ids
            )
        return self.tiers[name]

    def close(self) -> None:
        for tier in self.tiers.values():
            tier.close()

    def layout(self, item: dict[str, Any], passages: int) -> PromptLayout:
        chunks = [self.builder.chunk_ids(passage_text(ctx)) for ctx in item["ctxs"][:passages]]
        return self.builder.layout(chunks, item["question"])

    def _run(self, fused: FusedRequest, extra_ids: list[int], params: SamplingParams) -> _Run:
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
        finished = time.perf_counter()
        return _Run(
            seq.output_ids,
            seq.prompt_logprobs,
            (first or finished) - began,
            finished - began,
            [entry.logprob for entry in seq.logprobs],
        )

    def _fuse(
        self, layout: PromptLayout, chunks: Sequence[ChunkKV | StreamedChunk], setting: Setting
    ) -> FusedRequest:
        method = make_method(setting.method, **setting.params)
        root = self.encoder.root
        return fuse(
            self.model, layout, root, chunks, method, setting.params, recompute=self._recompute
        )

    def _recompute(self, ids: list[int]) -> ChunkKV:
        return self.encoder.encode([ids])[0]

    def evaluate(
        self, index: int, item: dict[str, Any], settings: list[Setting], passages: int
    ) -> list[Outcome]:
        layout = self.layout(item, passages)
        chunks = self.encoder.encode(layout.chunk_ids)
        for name in {s.tier or self.chunk_tier for s in settings if s.method != "full_prefill"}:
            self.tier(name).replace(chunks)
        greedy = SamplingParams(max_tokens=self.max_new_tokens, ignore_eos=False, logprobs=0)
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=True)
        reference = self._fuse(layout, chunks, Setting("full_prefill", "full_prefill"))
        reference_run = self._run(reference, [], greedy)
        ref_ids = _strip_eos(reference_run.answer_ids, self.engine.eos_ids)
        ref_ids = ref_ids or [(self.engine.eos_ids and min(self.engine.eos_ids)) or 0]
        context_tokens = len(layout) - len(layout.root_ids)
        group = _group_of(item)
        paired = {
            "ref_ttft_s": reference_run.ttft_s + reference.report.prepare_s,
            "ref_e2e_s": reference_run.e2e_s + reference.report.prepare_s,
        }
        outcomes = []
        for setting in settings:
            if setting.method == BASELINE_LABEL:
                baseline = self._baseline(index, item, reference.prompt_ids, ref_ids, group)
                outcomes.append(baseline | paired)
                continue
            began = time.perf_counter()
            read_s = wait_s = 0.0
            stored: Sequence[ChunkKV | StreamedChunk] = chunks
            tier = self.tier(setting.tier or self.chunk_tier)
            if setting.method == "full_prefill":
                pass  # a full prefill reads no tier: fusion computes everything
            elif setting.load == "whole" or setting.codec != "raw":
                read = tier.read(layout.chunk_ids, self.target)
                stored, read_s, wait_s = read.kvs, read.read_s, read.read_s
                if setting.codec != "raw":
                    stored = through_codec(read.kvs, setting.codec)
            else:
                streamed = tier.stream(layout.chunk_ids)
                stored, read_s, wait_s = streamed.parts, streamed.lookup_s, streamed.lookup_s
            fused = self._fuse(layout, stored, setting)
            prepare = time.perf_counter() - began
            read_s += fused.report.load_s
            wait_s += fused.report.load_wait_s
            reuse_reference = setting.method == "full_prefill" and setting.codec == "raw"
            run = reference_run if reuse_reference else self._run(fused, [], greedy)
            if run.answer_ids[: len(ref_ids)] == ref_ids:
                # Its greedy answer is the reference: the logprobs it sampled are the NLL's.
                answer_lp = run.token_logprobs[: len(ref_ids)]
            else:
                scored = self._run(fused, ref_ids, scoring)
                start = len(fused.prompt_ids)  # CacheFocus may have pruned chunks away
                answer_lp = [scored.prompt_logprobs[i] for i in range(start, start + len(ref_ids))]
            fraction = fused.report.recompute_fraction
            outcomes.append(
                self._outcome(index, item, setting.label, run.answer_ids, answer_lp, ref_ids)
                | {
                    "ttft_s": run.ttft_s + prepare,
                    "e2e_s": run.e2e_s + prepare,
                    "prepare_s": prepare,
                    "recompute_fraction": fraction,
                    "recomputed_tokens": round(fraction * context_tokens),
                    "prompt_tokens": len(fused.prompt_ids),
                    "group": group,
                    "read_s": read_s,
                    "read_wait_s": wait_s,
                    "selection_fraction": fused.report.selection_fraction,
                    "query_tokens": len(layout.query_ids),
                }
                | paired
            )
        return [Outcome(**fields) for fields in outcomes]

    def _baseline(
        self,
        index: int,
        item: dict[str, Any],
        prompt_ids: list[int],
        ref_ids: list[int],
        group: str,
    ) -> dict[str, Any]:
        if self.baseline is None:
            raise ValueError("the transformers setting needs a TransformersBaseline")
        run = self.baseline.run(prompt_ids, ref_ids, self.max_new_tokens)
        return self._outcome(
            index, item, BASELINE_LABEL, run.answer_ids, run.reference_logprobs, ref_ids
        ) | {
            "ttft_s": run.ttft_s,
            "e2e_s": run.e2e_s,
            "prepare_s": 0.0,
            "recompute_fraction": 1.0,
            "recomputed_tokens": len(prompt_ids),
            "prompt_tokens": len(prompt_ids),
            "group": group,
        }

    def _outcome(
        self,
        index: int,
        item: dict[str, Any],
        label: str,
        ids: list[int],
        answer_lp: list[float],
        ref_ids: list[int],
    ) -> dict[str, Any]:
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True).strip()
        clean = _strip_eos(ids, self.engine.eos_ids)
        golds = item.get("answers", [])
        return {
            "example": index,
            "setting": label,
            "answer_ids": ids,
            "answer": text,
            "nll": mean_nll(answer_lp),
            "agree16": prefix_agreement(clean, ref_ids, 16),
            "first_token": prefix_agreement(clean, ref_ids, 1),
            "f1": f1_score(text, golds),
            "em": exact_match(text, golds),
            "contains": answer_contains(text, golds),
        }


def _strip_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    return [t for t in ids if t not in eos_ids]


def _group_of(item: dict[str, Any]) -> str:
    """The needle suite's kind and depth of an example; empty for other data."""
    needle = item.get("needle")
    return f"{needle['kind']}@{needle['depth']:g}" if needle else ""
