"""The ``ragcache`` command: serve | ingest | query | cache | eval | bench | cluster.

Every command takes ``--config FILE`` and any config field as ``--section.field VALUE``
(``ragcache serve --help`` lists them all).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragcache.bench import BENCHMARKS
from ragcache.config import Config, ConfigError, iter_fields, load_config
from ragcache.errors import ServiceError

SAMPLE_CORPUS = "sample"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _options_help() -> str:
    lines = ["config options (--section.field VALUE; env RAGCACHE_SECTION__FIELD):"]
    for name, value, text in iter_fields(Config()):
        lines.append(f"  --{name} (default: {value!r})\n      {text}")
    return "\n".join(lines)


def _version() -> str:
    try:
        return importlib.metadata.version("ragcache")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragcache", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ragcache {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (.toml, .yaml or .yml)")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=text,
            description=text,
            epilog=_options_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    serve = add("serve", "run the HTTP server")
    serve.add_argument("--sample", action="store_true", help="ingest samples/ as 'sample'")
    _add_lora_flag(serve)
    ingest = add("ingest", "add files or folders to a corpus (created if missing)")
    ingest.add_argument("paths", nargs="+", help="files or folders")
    ingest.add_argument("--corpus", required=True, help="corpus name")
    query = add("query", "answer a question from a corpus")
    query.add_argument("text", help="the question")
    query.add_argument("--corpus", required=True, help="corpus name")
    query.add_argument("--method", help="fusion method (default: fusion.method)")
    query.add_argument("-k", type=int, help="chunks to retrieve (default: retriever.top_k)")
    query.add_argument("--json", action="store_true", help="print the whole result as JSON")
    query.add_argument("--adapter", help="answer with this LoRA adapter (see --lora)")
    _add_lora_flag(query)
    cache = add("cache", "show, clear or garbage-collect the chunk cache")
    cache.add_argument(
        "action",
        choices=("stats", "clear", "gc"),
        help="gc removes chunk KV orphaned by killed ingests or deletions",
    )
    evaluate = commands.add_parser(
        "eval", help="quality-vs-latency sweep of fusion methods", add_help=False
    )
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    bench = commands.add_parser("bench", help="benchmarks (ragcache bench lists them)")
    bench.add_argument("target", choices=tuple(BENCHMARKS), help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    cluster = commands.add_parser(
        "cluster", help="Redis, Ray and N replicas on this machine (ragcache cluster --help)"
    )
    cluster.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _add_lora_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a PEFT LoRA adapter folder as model NAME (repeatable; adds to lora.adapters)",
    )


def _config_flags(extra: Sequence[str]) -> dict[str, str]:
    """``--section.field VALUE`` or ``--section.field=VALUE`` pairs into a mapping."""
    flags: dict[str, str] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}")
        name, has_value, value = item[2:].partition("=")
        if not has_value:
            if not items:
                raise ConfigError(f"option --{name} needs a value")
            value = items.pop(0)
        flags[name] = value
    return flags


def _progress() -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="item", leave=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _service(config: Config) -> Any:
    from ragcache.service import RagCache

    return RagCache(config=config)


def _ingest(args: argparse.Namespace, config: Config) -> None:
    with _service(config) as service:
        result = service.ingest(args.paths, args.corpus, create=True, progress=_progress())
    print(
        f"corpus {args.corpus}: {len(result.added)} added, {len(result.replaced)} replaced, "
        f"{len(result.skipped)} unchanged; {result.chunks_added} chunks, "
        f"{result.kv_chunks_computed} chunk caches computed in {result.seconds:.1f} s"
    )


def _query(args: argparse.Namespace, config: Config) -> None:
    with _service(config) as service:
        answering = service.for_adapter(args.adapter)
        result = answering.query(args.text, args.corpus, k=args.k, method=args.method)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(result.answer.strip())
    print()
    for number, source in enumerate(result.sources, start=1):
        snippet = " ".join(source.text.split())[:100]
        print(f"[{number}] {source.score:.3f} {Path(source.source).name}: {snippet}")
    cache = result.cache
    ttft = result.timings.get("ttft")
    print(
        f"\nmethod {cache.method}; context tokens from cache {cache.tokens_by_tier}, "
        f"computed now {cache.computed_tokens}, recomputed by fusion {cache.recomputed_tokens}"
        + (
            f", pruned {cache.pruned_chunks} chunks ({cache.pruned_tokens} tokens)"
            if cache.pruned_chunks
            else ""
        )
        + (f"; ttft {ttft * 1000:.0f} ms" if ttft is not None else "")
    )


def _cache(args: argparse.Namespace, config: Config) -> None:
    with _service(config) as service:
        if args.action == "gc":
            print(f"cache gc at start-up: {service.startup_collection.summary()}")
            print(f"cache gc: {service.cache_gc().summary()}")
            return
        out = service.cache_stats() if args.action == "stats" else service.cache_clear()
    print(json.dumps(out, indent=2))


def _ensure_sample(service: Any) -> None:
    names = {info.name for info in service.list_corpora()}
    if SAMPLE_CORPUS in names and service.get_corpus(SAMPLE_CORPUS).num_documents:
        return
    if not SAMPLES_DIR.is_dir():
        raise ServiceError(f"--sample needs the samples folder, which is missing: {SAMPLES_DIR}")
    print(f"ingesting {SAMPLES_DIR} into corpus '{SAMPLE_CORPUS}'")
    service.ingest([SAMPLES_DIR], SAMPLE_CORPUS, create=True, progress=_progress())


def _runtime_line(service: Any, config: Config) -> str:
    """The configuration the engine chose for this machine (dtype, threads, weights)."""
    import torch

    from ragcache.engine.runtime_choice import runtime_choice

    engine = service.engine
    model = engine.loaded.model
    return runtime_choice(model, torch.get_num_threads(), config.model.dtype).describe()


def _serve(args: argparse.Namespace, config: Config) -> None:
    import uvicorn

    from ragcache.api.app import create_app
    from ragcache.api.auth import AccessKeys

    server = config.server
    # Parsed before the model loads: a key setting that does not parse stops here.
    if not AccessKeys(server.api_keys, server.admin_keys).enabled:
        if server.host not in LOOPBACK:
            print(f"no API keys configured (server.api_keys): not binding {server.host}")
            server.host = "127.0.0.1"
        print("no API keys configured: serving on loopback only")
    service = _service(config)
    print(_runtime_line(service, config))
    if args.sample:
        _ensure_sample(service)
    base = f"http://{server.host}:{server.port}"
    corpus = SAMPLE_CORPUS if args.sample else "<corpus>"
    body = json.dumps({"query": "What did Lincoln say at Gettysburg?", "corpus": corpus})
    print(
        f"ragcache at {base}; try:\n  curl -s {base}/v1/query "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    app = create_app(service, server, close_service=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level=config.log_level)


def _bench(argv: list[str]) -> int:
    """``ragcache bench NAME [options]`` runs one benchmark; without a name, the list."""
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, BENCHMARKS))
        print("usage: ragcache bench NAME [options]   (ragcache bench NAME --help for its options)")
        print("\nbenchmarks:")
        for name, what in BENCHMARKS.items():
            print(f"  {name:<{width}}  {what}")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(
            f"ragcache bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    return _delegate(f"ragcache.bench.{name}", argv[1:])


def _delegate(module_name: str, rest: list[str]) -> int:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"{module_name} is not available: {error}") from None
    return int(module.main(rest) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # eval, bench and cluster hand every later argument, options included, to their own parsers.
    if argv[:1] == ["eval"]:
        return _delegate("ragcache.evaluation.run_eval", argv[1:])
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    if argv[:1] == ["cluster"]:
        return _delegate("ragcache.cluster.local", argv[1:])
    args, extra = _parser().parse_known_args(argv)
    try:
        config = load_config(args.config, _config_flags(extra))
        config.lora.adapters.extend(getattr(args, "lora", []))
        logging.basicConfig(level=config.log_level.upper())
        run = {"serve": _serve, "ingest": _ingest, "query": _query, "cache": _cache}
        run[args.command](args, config)
    except (ConfigError, ServiceError) as error:
        print(f"ragcache {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
