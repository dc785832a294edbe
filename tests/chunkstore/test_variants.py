"""Cache-Craft's variant book: variants keyed by their ordered predecessors, apart from
tree paths, found again after a restart, stored with a cost that weighs expected reuse."""

from __future__ import annotations

from pathlib import Path

from ragcache.chunkstore.tree import KnowledgeTree
from ragcache.chunkstore.variants import ChunkDeviation, VariantBook
from tests.chunkstore.helpers import CONTEXT, ROOT_IDS, make_entry, make_store


def test_a_variant_is_found_only_after_the_same_predecessors_in_the_same_order(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path / "chunks")
    tree = KnowledgeTree(store, CONTEXT, ROOT_IDS)
    book = VariantBook(store, CONTEXT, tree.root.key)
    a, b, c = (make_entry(seed) for seed in (1, 2, 3))
    for entry in (a, b):
        tree.insert([entry.token_ids], entry.layers, entry.positions)
    keys = [tree.key_for(tree.root, e.token_ids) for e in (a, b, c)]
    assert book.put(keys[2], keys[:2], c.token_ids, c.layers, range(32, 48), 3)
    assert book.get(keys[2], keys[:2], c.token_ids) is not None
    assert book.get(keys[2], [keys[1], keys[0]], c.token_ids) is None
    assert book.get(keys[2], keys[:1], c.token_ids) is None
    assert book.key(keys[:2], c.token_ids) != tree.key_for(tree.root, c.token_ids)
    record = book.deviation(keys[2])
    assert record is not None and record.variant_hits == 1
    store.close()
    reopened = make_store(tmp_path / "chunks")
    rebuilt = KnowledgeTree.rebuild(reopened, CONTEXT, ROOT_IDS)
    assert len(rebuilt) == 2, "a variant is no node of the tree"
    again = VariantBook(reopened, CONTEXT, rebuilt.root.key)
    entry = again.get(keys[2], keys[:2], c.token_ids)
    assert entry is not None and entry.positions == list(range(32, 48))
    reopened.close()


def test_deviations_accumulate_and_expected_reuse_follows_variant_hits() -> None:
    record = ChunkDeviation()
    assert record.expected_reuse == 0.5
    store = make_store()
    book = VariantBook(store, CONTEXT, "root")
    book.observe("chunk", 0.1)
    book.observe("chunk", 0.3)
    seen = book.deviation("chunk")
    assert seen is not None and seen.contexts == 2 and abs(seen.mean - 0.2) < 1e-12
    assert seen.largest == 0.3 and seen.expected_reuse < 0.5
    seen.variant_hits = 6
    assert seen.expected_reuse > 0.5
    store.close()


def test_a_variant_of_a_recurring_context_outlives_a_one_off_one() -> None:
    one_off, recurring = make_entry(10), make_entry(11)
    size = one_off.nbytes
    store = make_store(host_bytes=int(2.5 * size))
    book = VariantBook(store, CONTEXT, "root")
    book.observe("recurring", 0.2)
    recurring_record = book.deviation("recurring")
    assert recurring_record is not None
    recurring_record.variant_hits = 20
    book.observe("one-off", 0.2)
    book.observe("one-off", 0.2)
    book.put("one-off", ["p"], one_off.token_ids, one_off.layers, range(16), 16)
    book.put("recurring", ["p"], recurring.token_ids, recurring.layers, range(16), 16)
    newcomer = make_entry(12)
    book.put("newcomer", ["p"], newcomer.token_ids, newcomer.layers, range(16), 16)
    assert book.contains(["p"], recurring.token_ids)
    assert not book.contains(["p"], one_off.token_ids)
    store.close()
