import os
import subprocess
import sys
from dataclasses import replace

import pytest

from ragcache.chunkstore import KeyContext, chunk_key
from ragcache.chunkstore.tree import KnowledgeTree
from tests.chunkstore.helpers import CONTEXT, make_entry, make_store

PARENTS = ["ab" * 20]
TOKENS = [1, 2, 3, 50000]


def test_key_is_stable_across_processes():
    code = (
        "from ragcache.chunkstore import KeyContext, chunk_key\n"
        f"context = KeyContext({CONTEXT.model_fingerprint!r}, {CONTEXT.kv_dtype!r}, "
        f"{CONTEXT.codec!r}, {CONTEXT.adapter_id!r}, {CONTEXT.tenant!r})\n"
        f"print(chunk_key(context, {PARENTS}, {TOKENS}))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("7",)
    }
    assert outputs == {chunk_key(CONTEXT, PARENTS, TOKENS)}


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": "other-model"},
        {"kv_dtype": "bfloat16"},
        {"codec": "int8"},
        {"adapter_id": "lora-7"},
        {"tenant": "tenant-b"},
    ],
)
def test_every_context_field_changes_the_key(change):
    assert chunk_key(replace(CONTEXT, **change), PARENTS, TOKENS) != chunk_key(
        CONTEXT, PARENTS, TOKENS
    )


def test_path_and_tokens_change_the_key():
    base = chunk_key(CONTEXT, PARENTS, TOKENS)
    assert chunk_key(CONTEXT, [], TOKENS) != base
    assert chunk_key(CONTEXT, [*PARENTS, "cd" * 20], TOKENS) != base
    assert chunk_key(CONTEXT, PARENTS, [*TOKENS, 0]) != base
    assert chunk_key(CONTEXT, PARENTS, TOKENS[::-1]) != base
    assert len(base) == 40 and int(base, 16) >= 0


def test_fields_cannot_run_into_each_other():
    left = KeyContext("ab", "c")
    right = KeyContext("a", "bc")
    assert chunk_key(left, [], TOKENS) != chunk_key(right, [], TOKENS)


def test_hash_collision_is_a_miss(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=0)
    entry = make_entry(3)
    store.put(entry)
    other_tokens = [t + 1 for t in entry.token_ids]
    assert store.get(entry.key, other_tokens) is None
    assert store.get_layers(entry.key, other_tokens) is None
    assert store.stats()["collisions"] == 2
    assert store.get(entry.key, entry.token_ids) is not None
    store.close()


def test_a_root_child_is_keyed_after_its_system_prompt(tmp_path):
    store = make_store(tmp_path / "db")
    try:
        one = KnowledgeTree(store, CONTEXT, [1, 2, 3])
        other = KnowledgeTree(store, CONTEXT, [1, 2, 4])
        assert one.key_for(one.root, TOKENS) != other.key_for(other.root, TOKENS)
        assert one.key_for(one.root, TOKENS) == chunk_key(CONTEXT, [one.root.key], TOKENS)
    finally:
        one.close()
        other.close()
        store.close()
