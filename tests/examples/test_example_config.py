"""examples/ragcache.toml names every config section and key, each with a comment, and
`ragcache serve --config examples/ragcache.toml` parses it to the defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib

from ragcache import cli
from ragcache.config import Config, iter_fields, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ragcache.toml"


def _leaf_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_example_names_every_config_key() -> None:
    written = _leaf_keys(tomllib.loads(EXAMPLE.read_text()))
    known = {name for name, _, _ in iter_fields(Config())}
    assert sorted(known - written) == [], "keys missing from examples/ragcache.toml"
    assert sorted(written - known) == [], "keys in examples/ragcache.toml the config lacks"


def test_every_example_key_has_a_comment_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            assert lines[number - 1].startswith("#"), f"line {number + 1} has no comment: {line}"


def test_serve_with_the_example_config_gets_the_defaults() -> None:
    argv = ["serve", "--config", str(EXAMPLE), "--server.port", "9001"]
    args, extra = cli._parser().parse_known_args(argv)
    config = load_config(args.config, cli._config_flags(extra), environ={})
    expected = Config()
    expected.server.port = 9001
    assert dataclasses.asdict(config) == dataclasses.asdict(expected)
