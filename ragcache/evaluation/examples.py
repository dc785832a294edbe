"""Evaluation examples: MuSiQue-format JSON or JSONL (`question`, `answers`, `ctxs`).

Every example is checked on load, so a malformed file fails before any model work with
an error that names the file, the example and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ExampleFormatError(ValueError):
    """The evaluation data does not have the fields the harness needs."""


def passage_text(ctx: dict[str, Any]) -> str:
    """The text a passage contributes to the prompt: its title line, then its body."""
    title = str(ctx.get("title") or "").strip()
    return f"{title}\n{ctx['text']}" if title else str(ctx["text"])


def _check(example: Any, where: str, need_ctxs: bool) -> dict[str, Any]:
    if not isinstance(example, dict):
        raise ExampleFormatError(
            f"{where}: an example must be an object, got {type(example).__name__}"
        )
    question = example.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ExampleFormatError(f"{where}: 'question' must be a non-empty string")
    answers = example.get("answers", [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ExampleFormatError(f"{where}: 'answers' must be a list of strings")
    ctxs = example.get("ctxs", [])
    if need_ctxs and (not isinstance(ctxs, list) or not ctxs):
        raise ExampleFormatError(f"{where}: 'ctxs' must be a non-empty list of passages")
    for number, ctx in enumerate(ctxs if isinstance(ctxs, list) else []):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ExampleFormatError(f"{where}: ctxs[{number}] needs a string 'text'")
    return {**example, "answers": answers, "ctxs": ctxs}


def load_examples(path: str | Path, *, need_ctxs: bool = True) -> list[dict[str, Any]]:
    """Examples from a JSON list or a JSONL file (one example per line)."""
    path = Path(path)
    if not path.is_file():
        raise ExampleFormatError(f"{path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            rows = [
                (f"{path}:{n}", json.loads(line))
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
        else:
            data = json.loads(text)
            if not isinstance(data, list):
                raise ExampleFormatError(f"{path}: expected a JSON list of examples")
            rows = [(f"{path}[{n}]", item) for n, item in enumerate(data)]
    except json.JSONDecodeError as error:
        raise ExampleFormatError(f"{path}: not valid JSON ({error})") from None
    if not rows:
        raise ExampleFormatError(f"{path}: no examples")
    return [_check(item, where, need_ctxs) for where, item in rows]
