"""The Ray Serve request router of the generation deployment: cache-aware, balanced
against queue length (the ranking itself is routing.py's).

Replicas report ``memory_chunks`` and ``queue_length`` through Ray Serve's routing stats
(``Generation.record_routing_stats``); the router ranks candidates for each request's
``chunk_fingerprints`` and hands Ray one replica per rank, best first. Ray probes each
in turn and sends the request to the first with room under ``max_ongoing_requests``;
dead replicas are dropped from the candidates by Ray itself.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ragcache.cluster.routing import ReplicaView, rank_replicas


def request_fingerprints(pending_request: PendingRequest | None) -> list[str]:
    """The chunk fingerprints a generation request carries (first argument, a dict)."""
    if pending_request is None or not pending_request.args:
        return []
    request = pending_request.args[0]
    if not isinstance(request, dict):
        return []
    return [str(fingerprint) for fingerprint in request.get("chunk_fingerprints", ())]


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
        ranked = rank_replicas(request_fingerprints(pending_request), views, self.queue_weight)
        return [[by_id[view.replica_id]] for view in ranked]
