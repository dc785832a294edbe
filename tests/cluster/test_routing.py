"""Cache-aware ranking of generator replicas (no Ray needed)."""

from __future__ import annotations

from ragcache.cluster.routing import ReplicaView, SeenChunks, chunk_fingerprint, rank_replicas


def ids(ranked: list[ReplicaView]) -> list[str]:
    return [view.replica_id for view in ranked]


def test_fingerprints_are_stable_and_tenant_scoped() -> None:
    assert chunk_fingerprint("text") == chunk_fingerprint("text")
    assert chunk_fingerprint("text", "tenant-a") != chunk_fingerprint("text", "tenant-b")
    assert chunk_fingerprint("text", "", "lora-1") != chunk_fingerprint("text")
    assert chunk_fingerprint("ab", "c") != chunk_fingerprint("a", "bc")
    assert len(chunk_fingerprint("x")) == 16


def test_the_replica_holding_most_chunks_wins() -> None:
    wanted = ["a", "b", "c"]
    replicas = [
        ReplicaView("r1", frozenset({"a"})),
        ReplicaView("r2", frozenset({"a", "b", "z"})),
        ReplicaView("r3", frozenset()),
    ]
    assert ids(rank_replicas(wanted, replicas)) == ["r2", "r1", "r3"]


def test_queue_length_outweighs_a_small_cache_advantage() -> None:
    wanted = ["a", "b"]
    busy = ReplicaView("busy", frozenset({"a", "b"}), queue_length=3)
    idle = ReplicaView("idle", frozenset(), queue_length=0)
    assert ids(rank_replicas(wanted, [busy, idle], queue_weight=1.0)) == ["idle", "busy"]
    assert ids(rank_replicas(wanted, [busy, idle], queue_weight=0.5)) == ["busy", "idle"]


def test_ties_go_to_the_shorter_queue_then_the_emptier_memory() -> None:
    full = ReplicaView("full", frozenset({"x", "y"}))
    empty = ReplicaView("empty", frozenset())
    assert ids(rank_replicas(["new"], [full, empty])) == ["empty", "full"]
    queued = ReplicaView("queued", frozenset(), queue_length=1)
    assert ids(rank_replicas([], [queued, full], queue_weight=0.0)) == ["full", "queued"]


def test_seen_chunks_forget_the_oldest() -> None:
    seen = SeenChunks(capacity=2)
    seen.add("a", "key-a")
    seen.add("b", "key-b")
    seen.add("a", "key-a2")
    seen.add("c", "key-c")
    assert seen.items() == [("a", "key-a2"), ("c", "key-c")]
