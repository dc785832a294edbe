import pytest

from ragcache.chunkstore.tree import KnowledgeTree
from tests.chunkstore.helpers import CONTEXT, make_entry, make_store, token_ids_for

SYSTEM = [101, 102, 103]
CHUNK = 16


def _chunk(seed):
    return token_ids_for(seed, CHUNK)


def _insert(tree, path_seeds):
    path = [_chunk(seed) for seed in path_seeds]
    sample = make_entry(path_seeds[-1], num_tokens=CHUNK)
    start = CHUNK * (len(path) - 1)
    return tree.insert(path, sample.layers, list(range(start, start + CHUNK)))


@pytest.fixture
def entry_bytes():
    return make_entry(0, num_tokens=CHUNK).nbytes


def test_longest_exact_path(tmp_path):
    tree = KnowledgeTree(make_store(tmp_path / "db"), CONTEXT, SYSTEM)
    _insert(tree, [1])
    _insert(tree, [1, 2])
    _insert(tree, [1, 2, 3])
    _insert(tree, [4])
    matched = tree.match_path([_chunk(1), _chunk(2), _chunk(9), _chunk(3)])
    assert [node.token_ids for node in matched] == [tuple(_chunk(1)), tuple(_chunk(2))]
    assert len(tree.match_path([_chunk(2), _chunk(1)])) == 0
    assert len(tree.match_path([_chunk(4)])) == 1
    deep = tree.match_path([_chunk(1), _chunk(2), _chunk(3)])[-1]
    assert tree.parent_keys(deep.parent) == [tree.root.key, *(n.key for n in matched)]
    entries = tree.fetch(tree.match_path([_chunk(1), _chunk(2), _chunk(3)]))
    assert all(entry is not None for entry in entries)
    assert entries[2].positions[0] == 2 * CHUNK


def test_insert_needs_a_cached_prefix(tmp_path):
    tree = KnowledgeTree(make_store(tmp_path / "db"), CONTEXT, SYSTEM)
    with pytest.raises(ValueError, match="chunk 0 of the path is not cached"):
        _insert(tree, [1, 2])


def test_lock_prevents_eviction(tmp_path, entry_bytes):
    store = make_store(tmp_path / "db", host_bytes=2 * entry_bytes)
    tree = KnowledgeTree(store, CONTEXT, SYSTEM)
    locked = _insert(tree, [1])
    tree.lock(locked)
    for seed in range(2, 8):
        _insert(tree, [seed])
    assert store.tier_of(locked.key) == "host"
    tree.unlock(locked)
    for seed in range(8, 12):
        _insert(tree, [seed])
    assert store.tier_of(locked.key) == "disk"
    with pytest.raises(RuntimeError, match="not locked"):
        tree.unlock(locked)


def test_leaf_first_eviction_and_parent_tier_invariant(tmp_path, entry_bytes):
    store = make_store(tmp_path / "db", host_bytes=3 * entry_bytes, policy="lru")
    tree = KnowledgeTree(store, CONTEXT, SYSTEM)
    parent = _insert(tree, [1])
    child = _insert(tree, [1, 2])
    grandchild = _insert(tree, [1, 2, 3])
    # LRU alone would evict the oldest (the parent) first; the tree makes it a leaf.
    _insert(tree, [7])
    assert store.tier_of(grandchild.key) == "disk"
    assert store.tier_of(parent.key) == "host" and store.tier_of(child.key) == "host"
    for seed in range(8, 14):
        _insert(tree, [seed])
        assert tree.invariant_violations() == []
    assert store.tier_of(parent.key) == "disk"
    # A hit on the deep path promotes parents before children.
    tree.fetch(tree.match_path([_chunk(1), _chunk(2), _chunk(3)]))
    assert tree.invariant_violations() == []
    assert store.tier_of(grandchild.key) == "host"


def test_child_waits_for_its_parent_to_be_placed(tmp_path, entry_bytes):
    store = make_store(tmp_path / "db", host_bytes=3 * entry_bytes)
    tree = KnowledgeTree(store, CONTEXT, SYSTEM)
    parent = _insert(tree, [1])
    child = _insert(tree, [1, 2])
    store.tiers[1].delete(parent.key)
    store.policies[1].on_remove(parent.key)
    store.tiers[1].delete(child.key)
    store.policies[1].on_remove(child.key)
    assert not store.promote(child.key)
    assert store.tier_of(child.key) == "disk"
    assert store.promote(parent.key) and store.promote(child.key)
    assert tree.invariant_violations() == []


def test_dropping_a_node_drops_its_subtree(tmp_path):
    store = make_store(tmp_path / "db")
    tree = KnowledgeTree(store, CONTEXT, SYSTEM)
    parent = _insert(tree, [1])
    child = _insert(tree, [1, 2])
    store.delete(parent.key)
    assert not store.contains(child.key)
    assert len(tree) == 0 and tree.match_path([_chunk(1)]) == []


def test_rebuild_from_the_store(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory)
    tree = KnowledgeTree(store, CONTEXT, SYSTEM)
    for path in ([1], [1, 2], [1, 2, 3], [4], [4, 5]):
        _insert(tree, path)
    other_prompt = KnowledgeTree(store, CONTEXT, [9, 9])
    other_prompt.insert([_chunk(1)], make_entry(1, num_tokens=CHUNK).layers, range(CHUNK))
    other_prompt.insert(
        [_chunk(1), _chunk(6)], make_entry(6, num_tokens=CHUNK).layers, range(CHUNK, 2 * CHUNK)
    )
    store.close()
    reopened = make_store(directory)
    rebuilt = KnowledgeTree.rebuild(reopened, CONTEXT, SYSTEM)
    assert len(rebuilt) == 5
    assert len(rebuilt.match_path([_chunk(1), _chunk(2), _chunk(3)])) == 3
    assert len(rebuilt.match_path([_chunk(4), _chunk(5)])) == 2
    assert len(rebuilt.match_path([_chunk(1), _chunk(6)])) == 1
    # Every node, root children too, belongs to the system prompt it was cached after.
    assert len(KnowledgeTree.rebuild(reopened, CONTEXT, [9, 9])) == 2
    reopened.close()
