"""The noisy tenant of the noisy-neighbour benchmark: one large ingest and a steady stream
of bad requests, each of which the server must refuse with a 4xx."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

JOB_POLL_S = 0.5


@dataclass(slots=True, frozen=True)
class BadRequest:
    """One malformed or forbidden request and why the server must refuse it."""

    why: str
    method: str
    path: str
    json: Any = None
    content: bytes | None = None


def bad_requests(own_corpus: str, other_corpus: str) -> list[BadRequest]:
    """Requests tenant A sends over and over; ``other_corpus`` belongs to tenant B."""
    query = "/v1/query"
    return [
        BadRequest("corpus that does not exist", "POST", query, {"query": "q", "corpus": "nope"}),
        BadRequest("other tenant's corpus", "POST", query, {"query": "q", "corpus": other_corpus}),
        BadRequest("negative k", "POST", query, {"query": "q", "corpus": own_corpus, "k": -1}),
        BadRequest("seed past 64 bits", "POST", query, {"query": "q", "seed": 2**64}),
        BadRequest("body that is not JSON", "POST", query, content=b"{not json"),
        BadRequest("no messages", "POST", "/v1/chat/completions", {"model": "m"}),
        BadRequest("corpus name with a slash", "POST", "/v1/corpora", {"name": "../etc"}),
        BadRequest("other tenant's corpus listing", "GET", f"/v1/corpora/{other_corpus}"),
        BadRequest("upload without files", "POST", f"/v1/corpora/{own_corpus}/documents", {}),
        BadRequest("job that does not exist", "GET", "/v1/jobs/0000"),
    ]


@dataclass(slots=True)
class NoiseRecord:
    """What tenant A did during the noisy phase and what the server answered."""

    ingest_files: int = 0
    ingest_bytes: int = 0
    ingest_job: str | None = None
    ingest_status: str | None = None
    ingest_seconds: float | None = None
    bad_sent: int = 0
    bad_statuses: Counter[int] = field(default_factory=Counter)
    bad_not_4xx: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ingest_files": self.ingest_files,
            "ingest_bytes": self.ingest_bytes,
            "ingest_job": self.ingest_job,
            "ingest_status_at_phase_end": self.ingest_status,
            "ingest_seconds": self.ingest_seconds,
            "bad_requests_sent": self.bad_sent,
            "bad_request_statuses": {str(k): v for k, v in sorted(self.bad_statuses.items())},
            "bad_requests_not_refused_with_4xx": self.bad_not_4xx,
        }


async def start_ingest(
    client: httpx.AsyncClient, corpus: str, files: list[tuple[str, bytes]], record: NoiseRecord
) -> float:
    """Uploads ``files`` to ``corpus`` (created first); returns when the job is accepted."""
    created = await client.post("/v1/corpora", json={"name": corpus})
    if created.status_code not in (201, 409):
        raise RuntimeError(f"tenant A could not create {corpus!r}: {created.text[:300]}")
    parts = [("files", (name, data, "text/plain")) for name, data in files]
    began = time.perf_counter()
    accepted = await client.post(f"/v1/corpora/{corpus}/documents", files=parts)
    if accepted.status_code != 202:
        raise RuntimeError(f"tenant A's upload failed: HTTP {accepted.status_code}")
    record.ingest_files = len(files)
    record.ingest_bytes = sum(len(data) for _, data in files)
    record.ingest_job = accepted.json()["job_id"]
    return began


async def follow_ingest(
    client: httpx.AsyncClient, record: NoiseRecord, began: float, stop: asyncio.Event
) -> None:
    """Polls the ingest job until it ends or ``stop`` is set; records its last status."""
    while True:
        job = (await client.get(f"/v1/jobs/{record.ingest_job}")).json()
        record.ingest_status = job["status"]
        if job["status"] in ("succeeded", "failed"):
            record.ingest_seconds = time.perf_counter() - began
            return
        if stop.is_set():
            return
        await asyncio.sleep(JOB_POLL_S)


async def send_bad_requests(
    client: httpx.AsyncClient,
    requests: list[BadRequest],
    rate: float,
    record: NoiseRecord,
    stop: asyncio.Event,
) -> None:
    """Sends ``requests`` round-robin at ``rate`` per second until ``stop`` is set."""
    index = 0
    while not stop.is_set():
        bad = requests[index % len(requests)]
        index += 1
        try:
            response = await client.request(
                bad.method, bad.path, json=bad.json, content=bad.content
            )
            status = response.status_code
        except httpx.HTTPError as error:
            status = 0
            record.bad_not_4xx.append(f"{bad.why}: {type(error).__name__}")
        record.bad_sent += 1
        record.bad_statuses[status] += 1
        if status and not 400 <= status < 500:
            record.bad_not_4xx.append(f"{bad.why}: HTTP {status}")
        try:
            await asyncio.wait_for(stop.wait(), 1 / rate)
        except asyncio.TimeoutError:
            pass
