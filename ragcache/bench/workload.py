"""The knowledge tree under a stream of MuSiQue questions, through the service.

    python -m ragcache.bench.workload --data ../shared/data/musique_dev.json \
        [--requests 400] [--seed 0] [--settings prefix,cacheblend,tree,cachecraft]

Every question of the pool (``--offset``, ``--questions``) can be asked; ``--requests``
requests draw them with Zipf(1.1) popularity, and a seeded 30% of the repeats send the
same passages in another order. Each setting replays the same stream through its own
``RagCache`` (documents sent with the request, ``--passages`` per question), with every
chunk-store tier and the engine's KV pool capped at ``--cache-share`` of the working set
(the KV of every distinct passage of the pool):

- prefix: the prompt as plain token ids; only the engine's prefix cache reuses anything
- cacheblend: the flat chunk cache (no tree paths), CacheBlend at 15%
- tree: exact tree paths (``service.tree_paths = always``): every prompt reuses its
  longest cached path and computes the rest exactly, as RAGCache does
- cachecraft: Cache-Craft over the tree (``tree_paths = reuse``)

Per request the reference is the full prefill of the same prompt (greedy answer, its
NLL, its TTFT) and full reuse gives the NLL gap; both are computed once per distinct
prompt on a separate engine. A setting is scored by the teacher-forced NLL of the
reference answer, paired per request. Per-request records go to a JSONL file beside the
report; the references, the costliest part, are kept there and a later run of the same
stream reuses them (the settings replay from empty caches). Each request goes through
every setting before the next one, so a run stopped early (or a short ``--requests``)
still compares the settings on the same requests.

Each setting's data directory lives beside the report (``.state``), so ``--resume``
continues a stopped run where each setting stopped: the LMDB tier and the tree over it
survive, the host tier and the engine's prefix cache start empty (the report lists the
requests at which the run was resumed). Without ``--resume`` a run starts from empty
caches and keeps only the references.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragcache.bench.report import (
    add_threads,
    bench_parser,
    end_machine_record,
    page_head,
    report_header,
    set_threads,
    write_report,
)
from ragcache.bench.workload_stream import StreamRequest, request_stream
from ragcache.bench.workload_summary import kind_table, summarize, table
from ragcache.blending.prompt import PromptBuilder
from ragcache.chunkstore.cost_calibration import calibrated_cost_model
from ragcache.config import Config
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.examples import load_examples, passage_text
from ragcache.evaluation.fusion_eval import FusionEvaluator, Setting, evaluation_engine
from ragcache.evaluation.metrics import mean_nll, prefix_agreement
from ragcache.retriever.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.service import RagCache
from ragcache.service.results import PreparedQuery

SETTINGS = ("prefix", "cacheblend", "tree", "cachecraft")
# setting -> (service.tree_paths, fusion method, method parameters)
SERVICE: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "prefix": ("off", None, {}),
    "cacheblend": ("off", "cacheblend", {"recompute_ratio": 0.15}),
    "tree": ("always", "cacheblend", {}),
    "cachecraft": ("reuse", "cachecraft", {}),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("workload", __doc__, "eval/reports/bench_workload.json")
    parser.add_argument("--data", required=True, help="MuSiQue-format JSON or JSONL")
    parser.add_argument("--offset", type=int, default=0, help="first question of the pool")
    parser.add_argument("--questions", type=int, default=100, help="questions in the pool")
    parser.add_argument("--requests", type=int, default=400, help="requests in the stream")
    parser.add_argument("--passages", type=int, default=4, help="passages per question")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request stream")
    parser.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--reorder", type=float, default=0.3, help="share of reordered repeats")
    parser.add_argument("--cache-share", type=float, default=0.25, help="tier caps / working set")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    parser.add_argument("--craft-ratio", type=float, default=0.15, help="cachecraft ratio")
    parser.add_argument(
        "--craft-insensitive", type=float, default=0.02, help="cachecraft insensitive level"
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local HF folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped run of the same stream from its recorded requests and "
        "its settings' data directories (beside --out)",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only report the requests the JSONL beside --out holds (of a stopped run)",
    )
    add_threads(parser)
    args = parser.parse_args(argv)
    args.settings = [name for name in args.settings.split(",") if name]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}; use {', '.join(SETTINGS)}")
    return args


class Records:
    """The run's JSONL: one line of run parameters, then reference and request lines."""

    def __init__(self, path: Path, run: dict[str, Any]) -> None:
        self.path = path
        self.references: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, list[dict[str, Any]]] = {}
        self.resumes: list[int] = []  # requests done (by every setting) at each resume
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
            if lines and lines[0] != {"kind": "run", **run}:
                raise SystemExit(f"{path} holds another run ({lines[0]}); pass another --out")
            for line in lines[1:]:
                if line["kind"] == "reference":
                    self.references[line["key"]] = line
                elif line["kind"] == "resume":
                    self.resumes.append(line["at"])
                else:
                    self.requests.setdefault(line["setting"], []).append(line)
        else:
            self._append({"kind": "run", **run})

    def _append(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(line) + "\n")

    def drop(self, setting: str) -> None:
        """Forgets a setting's requests (a partial setting starts again: its caches are
        gone), in the file too."""
        self.requests.pop(setting, None)
        self.resumes = []
        lines = self.path.read_text().splitlines()
        kept = [
            line
            for line in lines
            if json.loads(line).get("setting") != setting and json.loads(line)["kind"] != "resume"
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def add_resume(self, at: int) -> None:
        self.resumes.append(at)
        self._append({"kind": "resume", "at": at})

    def add(self, line: dict[str, Any]) -> None:
        if line["kind"] == "reference":
            self.references[line["key"]] = line
        else:
            self.requests.setdefault(line["setting"], []).append(line)
        self._append(line)


def prompt_key(request: StreamRequest) -> str:
    return f"{request.question}:{','.join(map(str, request.order))}"


def passages_of(item: dict[str, Any], request: StreamRequest, count: int) -> list[dict[str, Any]]:
    ctxs = item["ctxs"][:count]
    return [ctxs[i] for i in request.order]


def reference(
    evaluator: FusionEvaluator, item: dict[str, Any], request: StreamRequest, count: int
) -> dict[str, Any]:
    ordered = {**item, "ctxs": passages_of(item, request, count)}
    settings = [Setting("full_prefill", "full_prefill"), Setting("full_reuse", "full_reuse")]
    prefill, reuse = evaluator.evaluate(request.question, ordered, settings, count)
    return {
        "kind": "reference",
        "key": prompt_key(request),
        "answer_ids": prefill.answer_ids,
        "prefill_nll": prefill.nll,
        "reuse_nll": reuse.nll,
        "prefill_ttft_s": prefill.ref_ttft_s,
    }


async def _outputs(rag: RagCache, prepared: PreparedQuery, sampling: SamplingParams | None = None):
    last = None
    async for out in rag.generate(prepared, sampling):
        last = out
    assert last is not None
    return last


def serve_one(
    rag: RagCache,
    setting: str,
    item: dict[str, Any],
    request: StreamRequest,
    ref: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    paths, method, params = SERVICE[setting]
    if setting == "cachecraft":
        params = {"recompute_ratio": args.craft_ratio, "craft_insensitive": args.craft_insensitive}
    texts = [passage_text(ctx) for ctx in passages_of(item, request, args.passages)]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0)
    if method is None:
        layout = rag.prompts.layout([rag.prompts.chunk_ids(t) for t in texts], item["question"])
        prepared = rag.prepare_prompt(layout.prompt_ids, greedy)
        context = layout.context_end - len(layout.root_ids)
    else:
        prepared = rag.prepare_documents(texts, item["question"], method, params, greedy)
        context = prepared.fused.report.context_tokens
    last = asyncio.run(_outputs(rag, prepared))
    ref_ids = ref["answer_ids"]
    answer = [t for t in last.token_ids if t not in rag.engine.eos_ids]
    if last.token_ids[: len(ref_ids)] == ref_ids:
        logprobs = [entry.logprob for entry in last.logprobs[: len(ref_ids)]]
    else:
        logprobs = score(rag, prepared, ref_ids)
    usage = prepared.usage
    if method is None:
        root = len(rag.prompts.root_ids)
        exact = max(0, min(last.num_cached_tokens, root + context) - root)
        recomputed, encoded = context - exact, 0
    else:
        exact, recomputed, encoded = (
            usage.exact_tokens,
            usage.recomputed_tokens,
            usage.computed_tokens,
        )
        if paths == "always":  # what was computed now is recomputed, not exact or encoded
            exact, encoded = usage.reused_tokens, 0
    return {
        "kind": "request",
        "setting": setting,
        "number": request.number,
        "question": request.question,
        "repeat": request.repeat,
        "reordered": request.reordered,
        "context_tokens": context,
        "exact_tokens": exact,
        "recomputed_tokens": recomputed,
        "encoded_tokens": encoded,
        "ttft_s": prepared.timings["ttft"],
        "answer_ids": last.token_ids,
        "answer_equal": answer == [t for t in ref_ids if t not in rag.engine.eos_ids],
        "agree16": prefix_agreement(answer, ref_ids, 16),
        "nll": mean_nll(logprobs),
        "prefill_nll": ref["prefill_nll"],
        "reuse_nll": ref["reuse_nll"],
        "prefill_ttft_s": ref["prefill_ttft_s"],
    }


def score(rag: RagCache, prepared: PreparedQuery, ref_ids: list[int]) -> list[float]:
    """Teacher-forced log-probabilities of the reference answer after the same fused KV."""
    fused = dataclasses.replace(
        prepared.fused, prompt_ids=prepared.fused.prompt_ids + ref_ids, use_prefix_cache=False
    )
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=True)
    last = asyncio.run(_outputs(rag, dataclasses.replace(prepared, fused=fused), scoring))
    start = len(prepared.fused.prompt_ids)
    return [last.prompt_logprobs[i] for i in range(start, start + len(ref_ids))]


def working_set_bytes(
    loaded: LoadedModel, builder: PromptBuilder, pool: list[dict[str, Any]], count: int
) -> int:
    spec = loaded.spec
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    distinct = {passage_text(ctx) for item in pool for ctx in item["ctxs"][:count]}
    return per_token * sum(len(builder.chunk_ids(text)) for text in distinct)


def service_config(data_dir: Path, setting: str, cap: int, room: int) -> Config:
    """Every chunk-store tier capped at ``cap``; the engine's pool is the prefix cache of
    the prefix setting (capped alike) and room for a few prompts elsewhere."""
    config = Config()
    config.data_dir = str(data_dir)
    config.service.tree_paths = SERVICE[setting][0]
    config.service.kv_precompute = "lazy"
    config.chunkstore.device_bytes = 0
    config.chunkstore.host_bytes = cap
    config.chunkstore.disk_bytes = cap
    config.chunkstore.disk_initial_map_bytes = cap + (64 << 20)
    config.engine.kv_cache_bytes = max(cap, room) if setting == "prefix" else room
    return config


def state_folder(out: Path) -> Path:
    """Where each setting's data directory lives beside the report, so a stopped run
    can be resumed (``--resume``)."""
    return out.with_suffix(".state")


def replay(
    loaded: LoadedModel,
    pool: list[dict[str, Any]],
    stream: list[StreamRequest],
    records: Records,
    evaluator: FusionEvaluator,
    cap: int,
    embedder: Embedder,
    args: argparse.Namespace,
) -> None:
    """Each request through every setting before the next, so a run stopped early still
    compares the settings on the same requests. A resumed run reopens each setting's
    data directory (its LMDB tier and the tree over it) and skips the requests a
    setting has recorded; its memory tier and engine cache start empty."""
    spec = loaded.spec
    room = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * 4 * 4096
    # The prefill timing behind PGDSF's costs is measured once, beside the report, and
    # every setting's data directory starts with it.
    calibration = args.out.with_suffix(".calibration")
    calibrated_cost_model(loaded, calibration)
    folder = state_folder(args.out)
    for name in args.settings:
        if not (folder / name / "calibration").exists():
            shutil.copytree(calibration, folder / name / "calibration")
    services = {
        name: RagCache(
            config=service_config(folder / name, name, cap, room),
            loaded=loaded,
            embedder=embedder,
        )
        for name in args.settings
    }
    done = {name: len(records.requests.get(name, [])) for name in args.settings}
    if any(done.values()):
        records.add_resume(min(done.values()))
    try:
        for request in stream:
            item = pool[request.question]
            key = prompt_key(request)
            waiting = [name for name in args.settings if done[name] <= request.number]
            if waiting and key not in records.references:
                records.add(reference(evaluator, item, request, args.passages))
            for name in waiting:
                rag = services[name]
                line = serve_one(rag, name, item, request, records.references[key], args)
                records.add(line)
                print(
                    f"{request.number + 1}/{len(stream)} {name}: ttft "
                    f"{line['ttft_s'] * 1000:.0f} ms, recomputed {line['recomputed_tokens']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for rag in services.values():
            rag.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    report = report_header("workload")
    pool = load_examples(args.data)[args.offset : args.offset + args.questions]
    stream = request_stream(
        len(pool), args.requests, args.passages, args.seed, args.exponent, args.reorder
    )
    run = {
        "data": Path(args.data).name,
        "offset": args.offset,
        "questions": len(pool),
        "passages": args.passages,
        "seed": args.seed,
        "exponent": args.exponent,
        "reorder": args.reorder,
        "cache_share": args.cache_share,
        "max_tokens": args.max_tokens,
        "craft": [args.craft_ratio, args.craft_insensitive],
        "model": args.model,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = Records(args.out.with_suffix(".jsonl"), run)
    loaded = load_model(ModelConfig(path=args.model))
    builder = PromptBuilder(loaded.tokenizer, Config().service.system_prompt)
    evaluator = FusionEvaluator(evaluation_engine(loaded), builder, args.max_tokens)
    cap = int(args.cache_share * working_set_bytes(loaded, builder, pool, args.passages))
    if not args.summarize:
        if not args.resume:  # a new run: caches start empty; references are kept
            for setting in args.settings:
                records.drop(setting)
            shutil.rmtree(state_folder(args.out), ignore_errors=True)
        embedder = SentenceTransformerEmbedder.from_config(Config().retriever)
        replay(loaded, pool, stream, records, evaluator, cap, embedder, args)
    # The requests every setting served, so the settings stay paired in a stopped run.
    done = min((len(records.requests.get(name, [])) for name in args.settings), default=0)
    summaries = {name: summarize(records.requests[name][:done]) for name in args.settings if done}
    report.update(
        {
            "run": run,
            "requests": len(stream),
            "requests_done": done,
            "distinct_questions": len({r.question for r in stream}),
            "repeats": sum(r.repeat for r in stream),
            "reordered_repeats": sum(r.reordered for r in stream),
            "tier_cap_bytes": cap,
            "resumed_at_requests": records.resumes,
            "settings": summaries,
        }
    )
    end_machine_record(report)
    lines = [*table(summaries), "", "By kind of request:", "", *kind_table(summaries)]
    if records.resumes:
        lines.append(
            f"\nResumed after requests {', '.join(map(str, records.resumes))}: each resume "
            "reopened the settings' LMDB tiers and trees; host tiers and engine caches "
            "started empty."
        )
    page = page_head("Workload: the knowledge tree under a MuSiQue request stream", report)
    write_report(args.out, report, page + lines, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
