"""Purging chunk KV: the selected entries and everything cached after them leave every
tier, and the compacted disk file holds none of their bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ragcache.chunkstore.purge import purge, stored_chunks, unreachable
from ragcache.chunkstore.tree import KnowledgeTree
from tests.chunkstore.helpers import CONTEXT, ROOT_IDS, ROOT_KEY, make_entry, make_store


def encodings(token_ids: list[int]) -> list[bytes]:
    """Forms in which token ids could sit in a file: the record header's JSON, packed."""
    return [
        json.dumps(token_ids, separators=(",", ":")).encode(),
        struct.pack(f"<{len(token_ids)}q", *token_ids),
        struct.pack(f"<{len(token_ids)}i", *token_ids),
    ]


def file_holds(path: Path, token_ids: list[int]) -> bool:
    data = path.read_bytes()
    return any(form in data for form in encodings(token_ids))


def test_purge_removes_selected_entries_and_their_descendants_from_every_tier(tmp_path):
    store = make_store(tmp_path / "db")
    tree = KnowledgeTree(store, CONTEXT, ROOT_IDS)
    doomed = make_entry(1)
    kept = make_entry(2)
    for entry in (doomed, kept):
        assert tree.insert([entry.token_ids], entry.layers, entry.positions) is not None
    after = make_entry(3)
    node = tree.insert([doomed.token_ids, after.token_ids], after.layers, after.positions)
    assert node is not None and len(tree) == 3
    data_file = tmp_path / "db" / "data.mdb"
    assert file_holds(data_file, doomed.token_ids)

    report = purge(store, lambda chunk: chunk.token_ids == tuple(doomed.token_ids))

    assert report.entries_removed == 2
    assert report.removed_by_tier == {"host": 2, "disk": 2}
    assert [c.token_ids for c in stored_chunks(store)] == [tuple(kept.token_ids)]
    assert len(tree) == 1
    assert store.get(tree.key_for(tree.root, kept.token_ids), kept.token_ids) is not None
    for entry in (doomed, after):
        assert not file_holds(data_file, entry.token_ids)
    assert file_holds(data_file, kept.token_ids)
    # The policies forgot the purged keys: the store keeps evicting and storing.
    for seed in range(10, 40):
        store.put(make_entry(seed, parent_keys=[ROOT_KEY]))
    assert store.stats()["tiers"]["disk"]["entries"] == 31


def test_purge_outlives_a_restart_and_leaves_other_tenants_alone(tmp_path):
    from dataclasses import replace

    other_tenant = replace(CONTEXT, tenant="tenant-b")
    store = make_store(tmp_path / "db")
    mine = make_entry(1, parent_keys=[ROOT_KEY])
    theirs = make_entry(1, parent_keys=[ROOT_KEY], context=other_tenant)
    store.put(mine)
    store.put(theirs)
    purge(store, lambda c: c.tenant == CONTEXT.tenant and c.token_ids == tuple(mine.token_ids))
    store.close()
    reopened = make_store(tmp_path / "db")
    assert reopened.disk is not None
    assert reopened.disk.keys() == [theirs.key]
    assert reopened.get(theirs.key, theirs.token_ids) is not None


def test_unreachable_entries_are_collected(tmp_path):
    store = make_store(tmp_path / "db")
    parent = make_entry(1, parent_keys=[ROOT_KEY])
    child = make_entry(2, parent_keys=[ROOT_KEY, parent.key])
    grandchild = make_entry(3, parent_keys=[ROOT_KEY, parent.key, child.key])
    for entry in (parent, child, grandchild):
        store.put(entry)
    store.delete(parent.key)
    report = purge(store, unreachable(store))
    assert report.entries_removed == 2
    assert stored_chunks(store) == []
