"""OpenAI-compatible model routes: the base model, its loaded LoRA adapters (with the base
as parent) and the embedder; and the service that answers as a given model name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ragcache.api.deps import get_service
from ragcache.errors import NotFoundError
from ragcache.service import RagCache

router = APIRouter()


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


def served_as(service: RagCache, name: str) -> RagCache:
    """The service answering as model ``name``: the base model or one of its adapters."""
    if name == service.loaded.name:
        return service
    if any(info.name == name for info in service.list_adapters()):
        return service.for_adapter(name)
    raise _unknown_model(service, name)


def _unknown_model(service: RagCache, name: str) -> ModelNotFoundError:
    served = ", ".join(repr(card["id"]) for card in _generation_cards(service))
    return ModelNotFoundError(
        f"model {name!r} is not served here; use one of {served} (see GET /v1/models)", "model"
    )


def _model_card(model_id: str, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "ragcache"}
    if parent is not None:
        card["parent"] = parent
    return card


def _generation_cards(service: RagCache) -> list[dict[str, Any]]:
    base = service.loaded.name
    return [
        _model_card(base),
        *(_model_card(info.name, base) for info in service.list_adapters()),
    ]


def _all_cards(service: RagCache) -> list[dict[str, Any]]:
    return [*_generation_cards(service), _model_card(service.config.retriever.embedder)]


@router.get("/v1/models")
def list_models(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return {"object": "list", "data": _all_cards(service)}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, service: RagCache = Depends(get_service)) -> dict[str, Any]:
    for card in _all_cards(service):
        if card["id"] == model_id:
            return card
    raise _unknown_model(service, model_id)
