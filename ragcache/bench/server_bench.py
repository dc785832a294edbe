"""The command-line entry shared by the benchmarks that drive a server over HTTP: parse
the benchmark's own flags (the rest configure the server it starts), run it, and write
its report; a server or connection error ends the run with its message and status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import httpx

from ragcache.bench.report import command_line, write_report

ParseArgs = Callable[[list[str]], tuple[argparse.Namespace, list[str]]]
RunBenchmark = Callable[[argparse.Namespace, list[str], str], dict[str, Any]]
Lines = Callable[[dict[str, Any]], list[str]]


def run_server_bench(
    name: str,
    argv: list[str] | None,
    parse_args: ParseArgs,
    run_benchmark: RunBenchmark,
    markdown_page: Lines,
    table_lines: Lines,
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, server_flags = parse_args(argv)
    try:
        report = run_benchmark(args, server_flags, command_line(name, argv))
    except (RuntimeError, ValueError, httpx.HTTPError) as error:
        print(f"bench {name}: {error}", file=sys.stderr)
        return 2
    write_report(args.out, report, markdown_page(report), table_lines(report))
    return 0
