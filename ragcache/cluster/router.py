"""The Ray Serve request router of the generation deployment: cache-aware, balanced
against queue length (the ranking itself is routing.py's).

Replicas report ``memory_chunks`` and ``queue_length`` through Ray Serve's routing stats
(``Generation.record_routing_stats``); the router ranks candidates for each request's
``chunk_fingerprints`` and hands Ray one replica per rank, best first. Ray probes each
in turn and sends the request to the first with room under ``max_ongoing_requests``;
dead replicas are dropped from the candidates by Ray itself. A request pinned to a
replica (a job poll goes to the replica running the job) ranks that replica first.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ragcache.cluster.asgi_call import ForwardedRequest
from ragcache.cluster.routing import ReplicaView, rank_replicas


def routing_fields(pending_request: PendingRequest | None) -> tuple[list[str], str | None]:
    """The chunk fingerprints a generation request carries and the replica it is pinned
    to, if any (first argument: a dict from ``answer``, a ForwardedRequest from HTTP)."""
    if pending_request is None or not pending_request.args:
        return [], None
    request = pending_request.args[0]
    if isinstance(request, dict):
        return [str(f) for f in request.get("chunk_fingerprints", ())], None
    if isinstance(request, ForwardedRequest):
        return list(request.chunk_fingerprints), request.pinned_replica
    return [], None


class CacheAwareRequestRouter(RequestRouter):
    queue_weight: float = 1.0

    def initialize_state(self, queue_weight: float = 1.0, **_: Any) -> None:
        self.queue_weight = float(queue_weight)

    def _view(self, replica: RunningReplica) -> ReplicaView:
        stats = replica.routing_stats or {}
        queue = self.replica_queue_len_cache.get(replica.replica_id)
        if queue is None:
            queue = int(stats.get("queue_length", 0))
        return ReplicaView(
            replica.replica_id.unique_id, frozenset(stats.get("memory_chunks", ())), queue
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        views = [self._view(replica) for replica in candidate_replicas]
        fingerprints, pinned = routing_fields(pending_request)
        ranked = rank_replicas(fingerprints, views, self.queue_weight)
        if pinned in by_id:
            ranked.sort(key=lambda view: view.replica_id != pinned)
        return [[by_id[view.replica_id]] for view in ranked]


class RoundRobinRequestRouter(RequestRouter):
    """The baseline the cache-aware router is measured against: replicas in turn."""

    turn: int = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda replica: replica.replica_id.unique_id)
        if not ordered:
            return []
        self.turn = (self.turn + 1) % len(ordered)
        rotated = ordered[self.turn :] + ordered[: self.turn]
        return [[replica] for replica in rotated]
