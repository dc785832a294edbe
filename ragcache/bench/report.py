"""What every benchmark shares: its argument parser with ``--out``, the machine record
its report carries, and the writing of the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import platform
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
