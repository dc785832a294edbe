"""LoRA adapters over real HTTP: the OpenAI ``model`` field picks an adapter, /v1/models
lists adapters under their base, and admin keys load and unload adapters at run time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server
from tests.lora_helpers import PeftAdapter, fresh_tiny_model, make_peft_adapter
from tests.service_helpers import minilm, tiny_config, tiny_loaded

DOCUMENTS = ["Four score and seven years ago our fathers brought forth a new nation."]
MESSAGES: Any = [{"role": "user", "content": "Which nation was brought forth?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeftAdapter]:
    root = tmp_path_factory.mktemp("api-adapters")
    shape = {"vocab_size": len(tiny_loaded().tokenizer)}
    return {
        "legal": make_peft_adapter(root / "legal", seed=21, model=shape),
        "medical": make_peft_adapter(root / "medical", seed=22, model=shape, r=4),
    }


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, PeftAdapter]
) -> Iterator[RagCache]:
    config = tiny_config(tmp_path_factory.mktemp("lora-api") / "data")
    config.service.kv_precompute = "lazy"
    config.server.api_keys = "user-key=acme"
    config.server.admin_keys = "root-key"
    config.lora.adapters = [f"legal={adapters['legal'].path}"]
    with RagCache(config=config, loaded=fresh_tiny_model(), embedder=minilm()) as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


def client(base_url: str, key: str = "user-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def chat(base_url: str, model: str, **extra: Any) -> Any:
    return client(base_url).chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, **extra
    )


def test_models_lists_adapters_with_their_base_as_parent(base_url: str, service: RagCache) -> None:
    cards = client(base_url).models.list().data
    base = service.loaded.name
    assert [c.id for c in cards] == [base, "legal", service.config.retriever.embedder]
    assert cards[1].model_dump()["parent"] == base
    assert client(base_url).models.retrieve("legal").model_dump()["parent"] == base


def test_model_field_selects_the_adapter(base_url: str, service: RagCache) -> None:
    under_adapter = chat(base_url, "legal")
    assert under_adapter.model == "legal"
    plain = chat(base_url, service.loaded.name)
    assert plain.model == service.loaded.name
    assert under_adapter.choices[0].message.content != plain.choices[0].message.content
    rag = chat(base_url, "legal", extra_body={"documents": DOCUMENTS})
    again = chat(base_url, "legal", extra_body={"documents": DOCUMENTS})
    assert again.choices[0].message.content == rag.choices[0].message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_unknown_model_is_an_openai_404(base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        chat(base_url, "no-such-adapter")
    body = error.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert "'legal'" in body["message"]


def test_admin_keys_load_and_unload_adapters_at_run_time(
    base_url: str, adapters: dict[str, PeftAdapter]
) -> None:
    load = {"lora_name": "medical", "lora_path": str(adapters["medical"].path)}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer root-key"}
        assert http.post("/v1/load_lora_adapter", json=load, headers=user).status_code == 403
        assert http.post("/v1/load_lora_adapter", json=load).status_code == 401
        loaded = http.post("/v1/load_lora_adapter", json=load, headers=admin)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["rank"] == 4 and loaded.json()["status"] == "loaded"
        assert chat(base_url, "medical").model == "medical"
        listed = http.get("/v1/lora_adapters", headers=admin).json()["data"]
        assert [a["id"] for a in listed] == ["legal", "medical"]
        again = http.post("/v1/load_lora_adapter", json=load, headers=admin)
        assert again.status_code == 409 and again.json()["error"]["param"] == "lora_name"
        missing = {"lora_name": "x", "lora_path": "/no/such/folder"}
        refused = http.post("/v1/load_lora_adapter", json=missing, headers=admin)
        assert refused.status_code == 400 and "adapter_config.json" in refused.text
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "medical"}, headers=admin)
        assert gone.status_code == 200 and gone.json()["status"] == "unloaded"
        unknown = http.post("/v1/unload_lora_adapter", json={"lora_name": "medical"}, headers=admin)
        assert unknown.status_code == 404
    with pytest.raises(openai.NotFoundError):
        chat(base_url, "medical")


def test_metrics_count_adapters(base_url: str) -> None:
    headers = {"Authorization": "Bearer root-key"}
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=60).text
    assert re.search(r'^ragcache:lora_adapters_loaded\{model_name="[^"]+"\} 1\.0$', text, re.M)
    assert "ragcache:lora_slot_loads_total" in text
