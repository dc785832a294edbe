"""What every benchmark shares: its argument parser with ``--out`` and ``--threads``, the
command and machine record its report starts with, and the writing of the report (the
printed table, the JSON and the Markdown page beside it)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def bench_parser(name: str, doc: str | None, default_out: str | None) -> argparse.ArgumentParser:
    """A parser named ``ragcache bench NAME`` with ``--out`` (required without a default)."""
    summary = (doc or "").strip().splitlines()[0] if doc else None
    parser = argparse.ArgumentParser(prog=f"ragcache bench {name}", description=summary)
    parser.add_argument(
        "--out",
        type=Path,
        default=None if default_out is None else Path(default_out),
        required=default_out is None,
        help="JSON report path; a Markdown table is written beside it where there is one",
    )
    return parser


def add_threads(
    parser: argparse.ArgumentParser, text: str = "torch CPU threads; 0 keeps torch's default"
) -> None:
    parser.add_argument("--threads", type=int, default=0, help=text)


def set_threads(threads: int) -> None:
    """Applies ``--threads``: a positive count sets torch's, 0 keeps its default."""
    if threads > 0:
        torch.set_num_threads(threads)


def command_line(name: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, for the report's ``command`` field."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["bench", name]:  # run as ``ragcache bench NAME ...``
        args = args[2:]
    return shlex.join(["python", "-m", f"ragcache.bench.{name}", *args])


def report_header(name: str, load_average_at_start: list[float] | None = None) -> dict[str, Any]:
    """The first fields of a report: the command of this run and the machine record."""
    return {"command": command_line(name), "machine": machine_record(load_average_at_start)}


def machine_record(load_average_at_start: list[float] | None = None) -> dict[str, Any]:
    """Platform, torch version and threads, and the load average when the run began."""
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load_average_at_start or list(os.getloadavg()),
    }


def end_machine_record(report: dict[str, Any]) -> None:
    """Adds the load average at the end of the run to the report's machine record."""
    report["machine"]["load_average_at_end"] = list(os.getloadavg())


def write_json(path: Path | str, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_markdown(json_path: Path | str, lines: list[str]) -> Path:
    """The report's Markdown table beside its JSON (same name, .md)."""
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


def page_head(title: str, report: dict[str, Any]) -> list[str]:
    """The top of a report's Markdown page: its title and the command that made it."""
    return [f"# {title}", "", f"`{report['command']}`", ""]


def write_report(
    path: Path, report: dict[str, Any], page: list[str], table: Sequence[str] = ()
) -> None:
    """Prints the table, writes the JSON report and its Markdown page, and names both."""
    for line in table:
        print(line)
    write_json(path, report)
    markdown = write_markdown(path, page)
    print(f"wrote {path} and {markdown}")
