"""The request fields shared by the native and OpenAI bodies reach the service as the
method parameters it checks, deterministic among them."""

from __future__ import annotations

from ragcache.api.method_fields import MethodFields
from ragcache.api.openai_schemas import RagFields
from ragcache.api.schemas import QueryRequest


def test_cachecraft_and_deterministic_fields_are_passed_on_when_set() -> None:
    fields = MethodFields(craft_insensitive=0.05, craft_min_contexts=3, deterministic=True)
    assert fields.method_params() == {
        "craft_insensitive": 0.05,
        "craft_min_contexts": 3,
        "deterministic": True,
    }
    assert MethodFields().method_params() == {}


def test_both_request_bodies_carry_the_fields() -> None:
    query = QueryRequest(corpus="docs", query="q", method="cachecraft", deterministic=False)
    assert query.method_params() == {"deterministic": False}
    assert "deterministic" in RagFields.model_fields
    assert "craft_insensitive" in RagFields.model_fields
