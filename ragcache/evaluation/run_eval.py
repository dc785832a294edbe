"""`ragcache eval`: quality vs latency of fusion methods, resumable, with table, JSON and plot.

    ragcache eval --data ../shared/data/musique_dev.json --passages 2 \\
        --out eval/reports/eval_musique

writes eval_musique.jsonl (one line per example and setting; a rerun resumes from it),
eval_musique.json (summary), eval_musique.md (table) and eval_musique.png (Pareto plot).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ragcache.blending.prompt import PromptBuilder
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.evaluation.chunk_tier import CHUNK_TIERS
from ragcache.evaluation.corpus_examples import corpus_examples
from ragcache.evaluation.examples import ExampleFormatError, load_examples
from ragcache.evaluation.fusion_eval import (
    FusionEvaluator,
    Setting,
    default_sweep,
    evaluation_engine,
    parse_settings,
)
from ragcache.evaluation.hf_baseline import BASELINE_LABEL, TransformersBaseline
from ragcache.evaluation.needle import DEFAULT_DEPTHS, NeedleOptions, needle_suite
from ragcache.evaluation.outcomes import (
    Outcome,
    append_outcomes,
    load_outcomes,
    summarize,
    summarize_groups,
)
from ragcache.evaluation.report import (
    format_groups,
    format_table,
    pareto_plot,
    write_json,
    write_markdown,
)

# Fidelity to full prefill (NLL gap closed), then quality against the gold answers.
PLOT_METRICS = ("gap_closed", "f1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragcache eval", description=__doc__.splitlines()[0])
    source = parser.add_argument_group("examples")
    source.add_argument(
        "--data", help="MuSiQue-format JSON list or JSONL (question, answers, ctxs)"
    )
    source.add_argument(
        "--corpus", help="evaluate on a corpus in the service (needs --questions-file)"
    )
    source.add_argument("--questions-file", help="JSONL of question/answers for --corpus")
    source.add_argument(
        "--data_dir", "--data-dir", dest="data_dir", help="service data directory of --corpus"
    )
    source.add_argument("--config", help="service config file of --corpus")
    source.add_argument(
        "--suite",
        choices=("data", "needle"),
        default="data",
        help="needle: plant invented facts in the passages of --data",
    )
    source.add_argument("--needle-examples", type=int, default=24)
    source.add_argument(
        "--needle-depths",
        default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
        help="comma-separated chunk depths in [0, 1]",
    )
    source.add_argument("--needle-two-chunk-share", type=float, default=0.5)
    source.add_argument("--questions", type=int, help="examples to evaluate (default: all)")
    source.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many examples first (e.g. a held-out slice to choose settings on)",
    )
    source.add_argument("--passages", type=int, default=10, help="passages (chunks) per example")
    source.add_argument("--shuffle", action="store_true", help="draw examples in seeded order")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--settings",
        nargs="*",
        help="e.g. full_reuse cacheblend:ratio=0.15 legolink:k=32 transformers",
    )
    sweep.add_argument(
        "--no-baseline", action="store_true", help="leave out the plain transformers generate row"
    )
    sweep.add_argument(
        "--chunk-tier",
        choices=CHUNK_TIERS,
        default="host",
        help="where the chunks' KV waits for a query: host memory, LMDB raw or LMDB int8; "
        "every setting's TTFT includes reading it from there",
    )
    sweep.add_argument("--max-new-tokens", type=int, default=16)
    sweep.add_argument("--model", default="smollm2")
    sweep.add_argument("--dtype", default="float32")
    sweep.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        default="eval/reports/eval",
        help="path prefix of the .jsonl, .json, .md and .png outputs",
    )
    output.add_argument("--title", help="report title")
    return parser


def _settings(args: argparse.Namespace) -> list[Setting]:
    settings = parse_settings(args.settings) if args.settings else default_sweep()
    settings = [s for s in settings if s.method != "full_prefill"]
    settings.insert(0, Setting("full_prefill", "full_prefill"))
    has_baseline = any(s.method == BASELINE_LABEL for s in settings)
    if args.no_baseline:
        settings = [s for s in settings if s.method != BASELINE_LABEL]
    elif not has_baseline:
        settings.append(Setting(BASELINE_LABEL, BASELINE_LABEL))
    return settings


def _examples(args: argparse.Namespace, loaded: LoadedModel | None) -> list[dict[str, Any]]:
    """The examples to evaluate; those of --corpus need the model for the service."""
    if args.corpus:
        if not args.questions_file:
            raise ExampleFormatError("--corpus needs --questions-file (JSONL of questions)")
        questions = load_examples(args.questions_file, need_ctxs=False)
        if loaded is None:
            return []
        return corpus_examples(
            questions, args.corpus, args.passages, loaded, args.data_dir, args.config
        )
    if not args.data:
        raise ExampleFormatError("give --data (examples with passages) or --corpus")
    items = load_examples(args.data)
    if args.suite == "needle":
        depths = tuple(float(d) for d in args.needle_depths.split(","))
        options = NeedleOptions(
            args.needle_examples, args.passages, depths, args.needle_two_chunk_share, args.seed
        )
        return needle_suite(items, options)
    return items


def _check_resume(meta_path: Path, results: Path, meta: dict[str, Any]) -> None:
    """Refuse to mix results made with other options into one report."""
    if meta_path.is_file() and results.is_file():
        previous = json.loads(meta_path.read_text())
        if previous != meta:
            changed = sorted(
                k for k in meta.keys() | previous.keys() if meta.get(k) != previous.get(k)
            )
            raise SystemExit(
                f"ragcache eval: {results} holds results made with other options "
                f"({', '.join(changed)}); pass another --out or delete it"
            )
    meta_path.write_text(json.dumps(meta, indent=2))


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    settings = _settings(args)
    examples = _examples(args, None)  # file errors show before the model loads
    loaded = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    examples = examples or _examples(args, loaded)
    order = list(range(len(examples)))
    if args.shuffle:
        random.Random(args.seed).shuffle(order)
    order = order[args.offset :]
    order = order[: args.questions] if args.questions else order
    if not order:
        raise ExampleFormatError(
            f"--offset {args.offset} leaves no example of the {len(examples)} loaded"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = out.with_suffix(".jsonl")
    meta = {
        "model": loaded.name,
        "dtype": args.dtype,
        "passages": args.passages,
        "max_new_tokens": args.max_new_tokens,
        "suite": args.suite,
        "data": args.data or args.corpus,
        "seed": args.seed,
        "chunk_tier": args.chunk_tier,
    }
    _check_resume(out.with_suffix(".meta.json"), results, meta)
    engine = evaluation_engine(loaded)
    baseline = None
    if any(s.method == BASELINE_LABEL for s in settings):
        baseline = TransformersBaseline(loaded.source, loaded.dtype, engine.eos_ids)
    evaluator = FusionEvaluator(
        engine, PromptBuilder(loaded.tokenizer), args.max_new_tokens, baseline, args.chunk_tier
    )
    try:
        return _sweep(args, command, settings, examples, order, evaluator, meta)
    finally:
        evaluator.close()


def _sweep(
    args: argparse.Namespace,
    command: str,
    settings: list[Setting],
    examples: list[dict[str, Any]],
    order: list[int],
    evaluator: FusionEvaluator,
    meta: dict[str, Any],
) -> dict[str, Any]:
    out = Path(args.out)
    results = out.with_suffix(".jsonl")
    done = load_outcomes(results)
    finished = {(o.example, o.setting) for o in done}
    warm = examples[order[0]]
    warm_settings = list({s.label: s for s in (settings[0], settings[-1])}.values())
    evaluator.evaluate(-1, warm, warm_settings, min(args.passages, 2))
    for index in tqdm(order, desc="eval examples", unit="example", file=sys.stderr):
        todo = [s for s in settings if (index, s.label) not in finished]
        if not todo:
            continue
        if todo[0].method != "full_prefill":
            todo.insert(0, settings[0])  # the reference for fidelity metrics
        outcomes = [
            o
            for o in evaluator.evaluate(index, examples[index], todo, args.passages)
            if (index, o.setting) not in finished
        ]
        append_outcomes(results, outcomes)
        done.extend(outcomes)
    chosen = set(order)
    labels = {s.label for s in settings}
    kept: list[Outcome] = [o for o in done if o.example in chosen and o.setting in labels]
    summary = summarize(kept)
    groups = summarize_groups(kept)
    payload = {
        "command": command,
        **meta,
        "examples": len(order),
        "settings": [s.label for s in settings],
        "summary": summary,
        "groups": groups,
    }
    write_json(out.with_suffix(".json"), payload)
    table = format_table(summary)
    sections = [("Summary (quality: means; latency: medians)", table)]
    if groups:
        sections.append(
            ("Answer contains the planted fact, by kind@depth", format_groups(groups, "contains"))
        )
    title = args.title or f"ragcache eval: {args.suite} ({len(order)} examples)"
    plotted = pareto_plot(out.with_suffix(".png"), summary, title, PLOT_METRICS)
    if plotted:
        sections.append(("Pareto plot", f"![quality vs TTFT]({out.with_suffix('.png').name})"))
    write_markdown(out.with_suffix(".md"), title, command, sections)
    print(table)
    if groups:
        print(format_groups(groups, "contains"))
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        run(args, "ragcache eval " + shlex.join(argv))
    except (ExampleFormatError, ValueError) as error:
        print(f"ragcache eval: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
