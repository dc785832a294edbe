"""Config layers: defaults < file (TOML/YAML) < RAGCACHE_SECTION__FIELD < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragcache.config import Config, ConfigError, iter_fields, load_config

TOML_TEXT = """
data_dir = "/srv/ragcache"

[engine]
block_size = 32
max_num_seqs = 8

[model]
dtype = "float32"
"""

YAML_TEXT = """
data_dir: /srv/ragcache
engine:
  block_size: 32
  max_num_seqs: 8
model:
  dtype: float32
"""


@pytest.fixture(params=[("toml", TOML_TEXT), ("yaml", YAML_TEXT)], ids=["toml", "yaml"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    suffix, text = request.param
    path = tmp_path / f"ragcache.{suffix}"
    path.write_text(text)
    return path


def test_defaults_without_file_env_or_flags() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.engine.block_size == 16 and config.model.path == "smollm2"


def test_file_overrides_defaults(config_file: Path) -> None:
    config = load_config(config_file, environ={})
    assert config.data_dir == "/srv/ragcache"
    assert config.engine.block_size == 32 and config.engine.max_num_seqs == 8
    assert config.model.dtype == "float32"
    assert config.engine.max_num_batched_tokens == Config().engine.max_num_batched_tokens


def test_environment_overrides_file(config_file: Path) -> None:
    environ = {"RAGCACHE_ENGINE__BLOCK_SIZE": "64", "RAGCACHE_MODEL__DTYPE": "bfloat16"}
    config = load_config(config_file, environ=environ)
    assert config.engine.block_size == 64 and config.model.dtype == "bfloat16"
    assert config.engine.max_num_seqs == 8


def test_flags_override_environment_and_file(config_file: Path) -> None:
    environ = {"RAGCACHE_ENGINE__BLOCK_SIZE": "64"}
    flags = {"engine.block_size": 128, "data_dir": "/tmp/elsewhere"}
    config = load_config(config_file, flags=flags, environ=environ)
    assert config.engine.block_size == 128 and config.data_dir == "/tmp/elsewhere"
    assert config.engine.max_num_seqs == 8 and config.model.dtype == "float32"


def test_config_file_named_by_environment(config_file: Path) -> None:
    config = load_config(environ={"RAGCACHE_CONFIG": str(config_file)})
    assert config.engine.block_size == 32


def test_environment_values_are_typed() -> None:
    environ = {
        "RAGCACHE_ENGINE__ENABLE_PREFIX_CACHING": "false",
        "RAGCACHE_FUSION__RECOMPUTE_RATIO": "0.3",
        "RAGCACHE_ENGINE__KV_CACHE_BYTES": "2000000000",
    }
    config = load_config(environ=environ)
    assert config.engine.enable_prefix_caching is False
    assert config.fusion.recompute_ratio == pytest.approx(0.3)
    assert config.engine.kv_cache_bytes == 2_000_000_000


@pytest.mark.parametrize(
    ("flags", "environ", "field_name"),
    [
        ({"engine.block_sise": 8}, {}, "engine.block_sise"),
        ({}, {"RAGCACHE_MODEL__DTYPES": "float32"}, "model.dtypes"),
        ({"cache.size": 1}, {}, "cache"),
    ],
)
def test_unknown_field_error_names_the_field(
    flags: dict, environ: dict[str, str], field_name: str
) -> None:
    with pytest.raises(ConfigError, match="unknown config field") as error:
        load_config(flags=flags, environ=environ)
    assert field_name in str(error.value)


def test_unknown_field_in_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[engine]\nblok_size = 4\n")
    with pytest.raises(ConfigError, match=r"engine\.blok_size"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("flags", "environ", "field_name"),
    [
        ({"engine.block_size": "sixteen"}, {}, "engine.block_size"),
        ({}, {"RAGCACHE_ENGINE__ENABLE_PREFIX_CACHING": "maybe"}, "engine.enable_prefix_caching"),
        ({"fusion.recompute_ratio": "lots"}, {}, "fusion.recompute_ratio"),
    ],
)
def test_bad_type_error_names_the_field(
    flags: dict, environ: dict[str, str], field_name: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(flags=flags, environ=environ)
    assert field_name in str(error.value)


def test_bad_type_in_yaml_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  max_num_seqs: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"engine\.max_num_seqs"):
        load_config(path, environ={})


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})


def test_every_leaf_field_has_help() -> None:
    missing = [name for name, _, help_text in iter_fields(Config()) if not help_text]
    assert missing == []


def test_lora_adapters_come_as_a_list_from_files_and_as_text_from_env_and_flags(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ragcache.toml"
    path.write_text('[lora]\nadapters = ["legal=/adapters/legal"]\nmax_loras = 4\n')
    config = load_config(path, environ={})
    assert config.lora.adapters == ["legal=/adapters/legal"] and config.lora.max_loras == 4
    environ = {"RAGCACHE_LORA__ADAPTERS": "a=/x, b=/y"}
    assert load_config(environ=environ).lora.adapters == ["a=/x", "b=/y"]
    flags = {"lora.adapters": "c=/z"}
    assert load_config(path, flags=flags, environ={}).lora.adapters == ["c=/z"]
    path.write_text("[lora]\nadapters = 3\n")
    with pytest.raises(ConfigError, match=r"'lora\.adapters': 3 is not a list"):
        load_config(path, environ={})
