"""Admin routes that load and unload LoRA adapters while the server runs.

The bodies are vLLM's (``lora_name``, ``lora_path``), so existing tooling works; the
path is a PEFT adapter folder on the server's disk. A loaded adapter is served under
its name in the OpenAI ``model`` field and listed by /v1/models.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ragcache.api.deps import get_service
from ragcache.engine.lora_manager import AdapterInfo
from ragcache.service import RagCache

router = APIRouter()


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)


def adapter_body(info: AdapterInfo, parent: str) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "lora_adapter",
        "parent": parent,
        "fingerprint": info.fingerprint,
        "rank": info.rank,
        "target_modules": list(info.targets),
        "bytes": info.nbytes,
    }


@router.get("/v1/lora_adapters")
def list_adapters(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    parent = service.loaded.name
    return {"object": "list", "data": [adapter_body(a, parent) for a in service.list_adapters()]}


@router.post("/v1/load_lora_adapter")
async def load_adapter(
    body: LoadAdapterRequest, service: RagCache = Depends(get_service)
) -> dict[str, Any]:
    info = await run_in_threadpool(service.load_adapter, body.lora_name, body.lora_path)
    return {"status": "loaded", **adapter_body(info, service.loaded.name)}


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(
    body: UnloadAdapterRequest, service: RagCache = Depends(get_service)
) -> dict[str, Any]:
    info = await run_in_threadpool(service.unload_adapter, body.lora_name)
    return {"status": "unloaded", **adapter_body(info, service.loaded.name)}
