"""One command for a cluster on one machine: a local redis-server for the shared chunk tier,
Ray, and the Serve application (frontend, retrieval, N generator replicas).

    python -m ragcache.cluster.local --replicas 2 --data-root data/cluster \\
        [--corpus-dir data] [--redis-url redis://host:6379/0] [--address auto] \\
        [--config ragcache.toml] [--set model.path=... --set chunkstore.remote_codec=int8]

Then POST {"question": ..., "corpus": ...} (or "documents": [...]) to the printed URL.
On several machines, start Ray there (``ray start --head`` / ``ray start --address``),
run a Redis every node reaches, and pass ``--address auto --redis-url redis://...``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ragcache.cluster.redis_server import LocalRedis
from ragcache.config import load_config


def parse_settings(pairs: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set {pair!r}: write section.field=value")
        flags[name] = value
    return flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="generator replicas")
    parser.add_argument("--data-root", required=True, help="each replica's data dir goes here")
    parser.add_argument("--corpus-dir", help="data dir whose corpora retrieval serves")
    parser.add_argument("--redis-url", help="a Redis every node reaches (default: start one)")
    parser.add_argument("--address", help="an existing Ray cluster, e.g. auto")
    parser.add_argument("--config", help="config file (TOML or YAML)")
    parser.add_argument("--set", action="append", default=[], help="section.field=value")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--generator-cpus", type=float, default=1.0)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from ragcache.cluster.deployments import ClusterSpec, build_app

    config = load_config(args.config, parse_settings(args.set))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    redis_server = None
    if args.redis_url:
        config.chunkstore.remote_url = args.redis_url
    elif not config.chunkstore.remote_url:
        redis_server = LocalRedis(directory=Path(args.data_root) / "redis").start()
        config.chunkstore.remote_url = redis_server.url
    try:
        ray.init(address=args.address, include_dashboard=False)
        serve.start(http_options={"host": args.host, "port": args.port})
        spec = ClusterSpec(
            config,
            str(Path(args.data_root).resolve()),
            corpus_dir=str(Path(args.corpus_dir).resolve()) if args.corpus_dir else None,
            generators=args.replicas,
            generator_cpus=args.generator_cpus,
        )
        serve.run(build_app(spec), name="ragcache", route_prefix="/")
        print(
            f"ragcache cluster: {args.replicas} generator replicas, shared chunk tier at "
            f"{config.chunkstore.remote_url}; POST JSON to http://{args.host}:{args.port}/",
            flush=True,
        )
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
        if redis_server is not None:
            redis_server.close()


if __name__ == "__main__":
    main()
