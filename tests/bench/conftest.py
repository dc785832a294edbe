"""Fixtures the benchmark tests share with the engine tests."""

from tests.engine.conftest import tiny_llama  # noqa: F401  (fixture)
