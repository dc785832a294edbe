"""Admission control: no one tenant's burst takes every worker, and queues stay bounded.

A tenant route first takes a request slot: past ``server.tenant_max_requests_in_flight``
of its own the caller gets 429, past ``server.max_requests_in_flight`` in all 503, both
with Retry-After. An upload is admitted while the tenant's bytes waiting or being
ingested stay within ``server.tenant_max_ingest_bytes`` (429) and the ingest jobs of all
tenants within ``server.max_queued_ingest_jobs`` (503); its bytes are held until its job
finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Request

from ragcache.config import ServerConfig
from ragcache.errors import NotFoundError, ServiceError
from ragcache.service import RagCache

RETRY_AFTER_S = 1
INGEST_RETRY_AFTER_S = 5


class TooManyRequestsError(ServiceError):
    """The caller's tenant is over one of its own limits; retry after Retry-After."""

    status = 429
    kind = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverloadedError(ServiceError):
    """Every tenant together is over a global limit; retry after Retry-After."""

    status = 503
    kind = "service_unavailable"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class HeldIngest:
    """Upload bytes held from admission (no job yet) until the upload's job finishes."""

    job_id: str | None
    nbytes: int
    service: RagCache

    def finished(self) -> bool:
        if self.job_id is None:
            return False
        try:
            return self.service.jobs.get(self.job_id).finished
        except NotFoundError:
            return True


class Admission:
    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._ingests: dict[str, list[HeldIngest]] = {}
        self.refused: dict[int, int] = {429: 0, 503: 0}

    def _refuse(self, error: ServiceError) -> ServiceError:
        self.refused[error.status] += 1
        return error

    def enter(self, tenant: str) -> None:
        server = self.server
        with self._lock:
            mine = self._in_flight.get(tenant, 0)
            if 0 < server.tenant_max_requests_in_flight <= mine:
                raise self._refuse(
                    TooManyRequestsError(
                        f"this API key's tenant has {mine} requests in flight, the most "
                        "server.tenant_max_requests_in_flight allows; retry after "
                        f"{RETRY_AFTER_S} s or send fewer at once",
                        RETRY_AFTER_S,
                    )
                )
            if 0 < server.max_requests_in_flight <= self._total:
                raise self._refuse(
                    OverloadedError(
                        f"the server has {self._total} requests in flight, the most "
                        f"server.max_requests_in_flight allows; retry after {RETRY_AFTER_S} s",
                        RETRY_AFTER_S,
                    )
                )
            self._in_flight[tenant] = mine + 1
            self._total += 1

    def leave(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]
            self._total -= 1

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    def admit_ingest(self, tenant: str, nbytes: int, service: RagCache) -> HeldIngest:
        """Holds ``nbytes`` of the tenant's upload, or refuses it when they would pass the
        tenant's or global limits. Name the job with ``started``, or ``release`` it."""
        server = self.server
        with self._lock:
            for tenant_name, held in list(self._ingests.items()):
                self._ingests[tenant_name] = [h for h in held if not h.finished()]
            pending = sum(h.nbytes for h in self._ingests.get(tenant, []))
            limit = server.tenant_max_ingest_bytes
            if limit and pending + nbytes > limit:
                raise self._refuse(
                    TooManyRequestsError(
                        f"this tenant has {pending} upload bytes waiting or being ingested; "
                        f"{nbytes} more would pass server.tenant_max_ingest_bytes={limit}. "
                        "Retry once its jobs finish (GET /v1/jobs/{id})",
                        INGEST_RETRY_AFTER_S,
                    )
                )
            jobs = sum(len(held) for held in self._ingests.values())
            if 0 < server.max_queued_ingest_jobs <= jobs:
                raise self._refuse(
                    OverloadedError(
                        f"{jobs} ingest jobs are waiting or running, the most "
                        "server.max_queued_ingest_jobs allows; retry after "
                        f"{INGEST_RETRY_AFTER_S} s",
                        INGEST_RETRY_AFTER_S,
                    )
                )
            held = HeldIngest(None, nbytes, service)
            self._ingests.setdefault(tenant, []).append(held)
            return held

    def started(self, held: HeldIngest, job_id: str) -> None:
        with self._lock:
            held.job_id = job_id

    def release(self, tenant: str, held: HeldIngest) -> None:
        with self._lock:
            self._ingests[tenant] = [h for h in self._ingests.get(tenant, []) if h is not held]

    def hold_ingest(self, tenant: str, job_id: str, nbytes: int, service: RagCache) -> None:
        """Holds bytes for a job already running (admitted some other way)."""
        with self._lock:
            self._ingests.setdefault(tenant, []).append(HeldIngest(job_id, nbytes, service))


def tenant_of(request: Request) -> str:
    return getattr(request.state, "tenant", "")


def request_slot(request: Request) -> Iterator[None]:
    """A route dependency (after the key check) holding one of the tenant's slots."""
    admission: Admission = request.app.state.admission
    tenant = tenant_of(request)
    admission.enter(tenant)
    try:
        yield
    finally:
        admission.leave(tenant)
