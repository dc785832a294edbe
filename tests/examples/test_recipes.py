"""The LangChain and LlamaIndex recipes in examples/, run whole against a loopback server
(the tiny model: the recipes' plumbing, not answer quality, is under test)."""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ragcache.api.app import create_app
from tests.api.live_server import running_server, tiny_service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_service(tmp_path_factory.mktemp("recipes") / "data") as service:
        with running_server(create_app(service)) as url:
            yield f"{url}/v1"


def _recipe(name: str) -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / name))


def test_langchain_recipe(base_url: str) -> None:
    pytest.importorskip("langchain_openai")
    recipe = _recipe("langchain_rag.py")
    # Room for the structured answer's JSON to close before the length limit.
    result = recipe["run"](base_url, "unused", max_tokens=40)
    assert isinstance(result["chat"], str) and result["chat"]
    assert isinstance(result["chain"], str) and result["chain"]
    grounding = result["structured"]
    assert isinstance(grounding, recipe["Grounding"])
    assert grounding.passage in (1, 2)


def test_langchain_chain_sends_the_passages_as_documents(base_url: str) -> None:
    pytest.importorskip("langchain_openai")
    recipe = _recipe("langchain_rag.py")
    llm = recipe["chat_model"](base_url, "unused", 4)
    sent: list[dict[str, Any]] = []
    original = llm.root_client.chat.completions.create

    def recording(**payload: Any) -> Any:
        sent.append(payload)
        return original(**payload)

    llm.root_client.chat.completions.create = recording
    llm.client = llm.root_client.chat.completions
    recipe["rag_chain"](llm).invoke("Who delivered the Gettysburg Address?")
    [payload] = sent
    assert payload["extra_body"]["documents"][0].startswith("Abraham Lincoln")
    assert payload["messages"][0] == {"role": "system", "content": "Answer in one short sentence."}


def test_llamaindex_recipe(base_url: str) -> None:
    pytest.importorskip("llama_index.llms.openai_like")
    recipe = _recipe("llamaindex_rag.py")
    result = recipe["run"](base_url, "unused", max_tokens=8)
    assert len(result["query_engine"].source_nodes) == 2
    assert isinstance(result["documents"], str) and result["documents"]
    retrieved = [node.get_content() for node in result["nodes"]]
    assert retrieved[0] == recipe["PASSAGES"][0], "the embedder ranks the drafting passage first"
