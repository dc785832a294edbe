"""``ragcache cluster``: a cluster on this machine, or this machine's part of one.

    ragcache cluster --replicas 2 [--data-root data/cluster] [--seed-from data]
        [--redis-url redis://host:6379/0] [--corpus-url redis://host:6380/0]
        [--address auto] [--config ragcache.toml] [--set chunkstore.remote_codec=int8]

Without --redis-url it starts two loopback redis-servers under the data root: one for
the shared chunk-KV tier (a cache, not persisted) and one for the corpus log (append-only
file, fsync on every write: the cluster's corpora). Then Ray (a local one, or the
cluster at --address), and the Serve application: the single server's routes at
http://HOST:PORT, N generator replicas, retrieval, the cache-aware router. SIGINT or
SIGTERM shuts the application, Ray and the redis-servers it started down, in order.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ragcache.api.auth import AccessKeys
from ragcache.cluster.redis_server import LocalRedis
from ragcache.config import load_config

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set {pair!r}: write section.field=value")
        flags[name] = value
    return flags


def stop_on_signals(stop: threading.Event) -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(
        prog="ragcache cluster",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    built.add_argument("--replicas", type=int, default=2, help="generator replicas")
    built.add_argument("--data-root", default="data/cluster", help="replicas' data dirs go here")
    built.add_argument("--seed-from", help="a single server's data dir whose corpora to import")
    built.add_argument("--redis-url", help="a Redis every node reaches (default: start one)")
    built.add_argument("--corpus-url", help="Redis of the corpus log (default: --redis-url)")
    built.add_argument("--address", help="an existing Ray cluster, e.g. auto")
    built.add_argument("--config", help="config file (TOML or YAML)")
    built.add_argument("--set", action="append", default=[], help="section.field=value")
    built.add_argument("--host", default="127.0.0.1")
    built.add_argument("--port", type=int, default=8000)
    built.add_argument("--generator-cpus", type=float, default=1.0)
    built.add_argument("--routing", choices=("cache_aware", "round_robin"), default="cache_aware")
    return built


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.replicas < 1:
        raise SystemExit(f"--replicas {args.replicas}: run at least one replica")
    import ray
    from ray import serve

    from ragcache.cluster.corpus_import import embedding_dim, import_corpora
    from ragcache.cluster.corpus_log import open_corpus_log
    from ragcache.cluster.deployments import ClusterSpec, build_app

    config = load_config(args.config, parse_settings(args.set))
    keys = AccessKeys(config.server.api_keys, config.server.admin_keys)  # parses them first
    if not keys.enabled and args.host not in LOOPBACK:
        raise SystemExit(
            f"--host {args.host}: without API keys (server.api_keys) the cluster serves "
            "loopback only; set keys with --set server.api_keys=KEY=TENANT"
        )
    root = Path(args.data_root).resolve()
    stop = threading.Event()
    stop_on_signals(stop)
    started: list[LocalRedis] = []
    if args.redis_url:
        config.chunkstore.remote_url = args.redis_url
    if not config.chunkstore.remote_url:
        started.append(LocalRedis(directory=root / "redis-kv").start())
        config.chunkstore.remote_url = started[-1].url
    corpus_url = args.corpus_url or args.redis_url
    if corpus_url is None:
        started.append(LocalRedis(directory=root / "redis-corpora", persist=True).start())
        corpus_url = started[-1].url
    spec = ClusterSpec(
        config,
        str(root),
        generators=args.replicas,
        corpus_url=corpus_url,
        generator_cpus=args.generator_cpus,
        routing=args.routing,
    )
    try:
        if args.seed_from:
            seed = Path(args.seed_from)
            log = open_corpus_log(corpus_url, spec.corpus_namespace, embedding_dim(seed), 1.0)
            print(f"imported corpora: {import_corpora(seed, log) or 'none new'}", flush=True)
        ray.init(address=args.address, include_dashboard=False)
        stop_on_signals(stop)  # Ray's own SIGTERM handler aborts the process: replace it
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(spec), name="ragcache", route_prefix="/")
        print(
            f"ragcache cluster at http://{args.host}:{args.port}: {args.replicas} generator "
            f"replicas, chunk tier {config.chunkstore.remote_url}, corpus log {corpus_url}",
            flush=True,
        )
        stop.wait()
        print("ragcache cluster: shutting down", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
        for redis_server in reversed(started):
            redis_server.close()


if __name__ == "__main__":
    main()
