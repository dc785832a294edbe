"""``response_format`` on the chat and text completion routes: ``text``, ``json_object``
(any JSON object) and ``json_schema`` (OpenAI's ``{"name", "schema", "strict"}``),
enforced by constrained decoding: the sampler draws only tokens the grammar allows
(ragcache.engine.guided)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ragcache.engine.guided import Guide, GuidedSamplingParams, GuideError, GuideTokenizer
from ragcache.engine.sampling_params import SamplingParams
from ragcache.errors import InvalidParameterError
from ragcache.service import RagCache

_tokenizers: dict[str, GuideTokenizer] = {}
_lock = threading.Lock()


def _guide_tokenizer(service: RagCache) -> GuideTokenizer:
    key = service.loaded.fingerprint
    with _lock:
        tokenizer = _tokenizers.get(key)
        if tokenizer is None:
            tokenizer = GuideTokenizer(service.loaded.tokenizer, service.loaded.spec.vocab_size)
            _tokenizers[key] = tokenizer
    return tokenizer


def _schema(response_format: dict[str, Any]) -> dict[str, Any] | None:
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidParameterError(
                "response_format.json_schema.schema must be a JSON schema object",
                "response_format",
            )
        return schema
    raise InvalidParameterError(
        f"response_format type {kind!r} is unknown; use text, json_object or json_schema",
        "response_format",
    )


def guided_sampling(
    service: RagCache, response_format: dict[str, Any] | None, sampling: SamplingParams
) -> SamplingParams:
    """``sampling`` bound to the grammar ``response_format`` asks for (unchanged for
    text); speculative drafts are off for a guided request."""
    schema = _schema(response_format or {})
    if schema is None:
        return sampling
    try:
        guide = Guide.json_schema(_guide_tokenizer(service), schema)
    except ImportError:
        raise InvalidParameterError(
            "response_format needs the llguidance package on the server "
            "(pip install 'ragcache[structured]')",
            "response_format",
        ) from None
    except GuideError as error:
        raise InvalidParameterError(str(error), "response_format") from None
    values = {field.name: getattr(sampling, field.name) for field in dataclasses.fields(sampling)}
    values["num_speculative_tokens"] = 0
    return GuidedSamplingParams(**values, guide=guide)
