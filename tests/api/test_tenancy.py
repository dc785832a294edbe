"""API keys and tenants: every tenant sees only its corpora, jobs and caches; admin
routes need admin keys; missing or wrong keys get 401 in OpenAI's error shape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service
from tests.service_helpers import SAMPLES

KEYS = "key-a=tenant-a,key-b=tenant-b"
DOCUMENTS = ["Liberty and union, now and forever, one and inseparable.", "Ask not what."]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    data = tmp_path_factory.mktemp("tenancy") / "data"
    with tiny_service(data, api_keys=KEYS, admin_keys="root-key") as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


def http(base_url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=120)


def oai(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def corpus_of_a(base_url: str) -> str:
    with http(base_url, "key-a") as a:
        assert a.post("/v1/corpora", json={"name": "notes"}).status_code == 201
        files = [("files", ("g.md", (SAMPLES / "gettysburg_address.md").read_bytes()))]
        job = a.post("/v1/corpora/notes/documents", files=files).json()
        deadline = time.monotonic() + 120
        while a.get(f"/v1/jobs/{job['job_id']}").json()["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert a.get(f"/v1/jobs/{job['job_id']}").json()["corpus"] == "notes"
        with http(base_url, "key-b") as b:
            assert b.get(f"/v1/jobs/{job['job_id']}").status_code == 404
    return "notes"


def test_missing_or_wrong_key_is_401_in_openai_shape(base_url: str) -> None:
    for key in (None, "wrong"):
        with http(base_url, key) as client:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/embeddings"), ("GET", "/v1/corpora")):  # fmt: skip
                response = client.request(method, path, json={})
                assert response.status_code == 401, response.text
                error = response.json()["error"]
                assert error["type"] == "authentication_error"
                assert error["code"] == "invalid_api_key" and "param" in error
    with pytest.raises(openai.AuthenticationError):
        oai(base_url, "wrong").models.list()
    with http(base_url, None) as anonymous:
        assert anonymous.get("/health").status_code == 200


def test_tenant_b_cannot_see_or_use_the_corpus_of_a(base_url: str, corpus_of_a: str) -> None:
    with http(base_url, "key-a") as a, http(base_url, "key-b") as b:
        assert [c["name"] for c in a.get("/v1/corpora").json()["data"]] == [corpus_of_a]
        assert b.get("/v1/corpora").json()["data"] == []
        missing = b.get(f"/v1/corpora/{corpus_of_a}")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"].endswith("(corpora: none yet)")
        body = {"query": "Gettysburg", "corpus": corpus_of_a, "k": 1}
        assert a.post("/v1/retrieve", json=body).status_code == 200
        assert b.post("/v1/retrieve", json=body).status_code == 404
        assert b.post("/v1/query", json={**body, "max_tokens": 2}).status_code == 404
        # B may own a corpus of the same name without touching A's.
        assert b.post("/v1/corpora", json={"name": corpus_of_a}).status_code == 201
        assert b.get(f"/v1/corpora/{corpus_of_a}").json()["num_documents"] == 0
        assert a.get(f"/v1/corpora/{corpus_of_a}").json()["num_documents"] == 1
    model = oai(base_url, "key-a").models.list().data[0].id
    with pytest.raises(openai.NotFoundError):
        oai(base_url, "key-b").chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What nation?"}],
            extra_body={"corpus": "absent-for-b"},
        )
    reply = oai(base_url, "key-a").chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What nation?"}],
        max_tokens=2,
        extra_body={"corpus": corpus_of_a, "k": 1},
    )
    assert reply.model_extra["ragcache"][0]["sources"]


def _ask(client: openai.OpenAI, model: str) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is inseparable?"}],
        max_tokens=2,
        extra_body={"documents": DOCUMENTS},
    )


def test_no_cache_hit_across_tenants(base_url: str, service: RagCache) -> None:
    a, b = oai(base_url, "key-a"), oai(base_url, "key-b")
    model = a.models.list().data[0].id
    _ask(a, model)
    warm_a = _ask(a, model)
    assert warm_a.usage.prompt_tokens_details.cached_tokens > 0
    hits_before = service.chunk_cache.store.stats()["hits"]
    cold_b = _ask(b, model)
    assert cold_b.usage.prompt_tokens_details.cached_tokens == 0
    assert cold_b.model_extra["ragcache"][0]["cache"]["tokens_by_tier"] == {}
    assert service.chunk_cache.store.stats()["hits"] == hits_before
    assert _ask(b, model).usage.prompt_tokens_details.cached_tokens > 0


def test_admin_routes_need_an_admin_key(base_url: str) -> None:
    with http(base_url, "key-a") as tenant, http(base_url, "root-key") as admin:
        for method, path in (("GET", "/v1/cache/stats"), ("POST", "/v1/cache/clear"),
                             ("GET", "/metrics")):  # fmt: skip
            refused = tenant.request(method, path)
            assert refused.status_code == 403 and refused.json()["error"]["param"] is None
            assert admin.request(method, path).status_code == 200
        # An admin key is a key of the default tenant too.
        assert admin.get("/v1/corpora").status_code == 200
