"""Background ingest jobs: one worker thread, a record per job with progress and outcome."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ragcache.corpus.progress import Progress
from ragcache.errors import NotFoundError, ServiceError, storage_failure


@dataclass(slots=True)
class Job:
    job_id: str
    kind: str
    corpus: str
    status: str = "queued"  # queued | running | succeeded | failed
    stage: str = ""
    done: int = 0
    total: int = 0
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobRunner:
    """Runs jobs one at a time in submission order (ingestion writes one corpus at a time)."""

    def __init__(self, history: int = 200) -> None:
        self.history = history
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-job")

    def submit(self, kind: str, corpus: str, work: Callable[[Progress], dict[str, Any]]) -> Job:
        job = Job(f"job-{uuid.uuid4().hex[:16]}", kind, corpus)
        with self._lock:
            self._jobs[job.job_id] = job
            self._forget_old()
        self._pool.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} does not exist (or is too old to be kept)", "id")
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while not self._jobs[job_id].finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._done.wait(left)
            return self._jobs[job_id]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job, work: Callable[[Progress], dict[str, Any]]) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = stage, done, total

        job.status = "running"
        result, error, status = None, None, "succeeded"
        try:
            result = work(progress)
        except ServiceError as failure:
            error = {"message": failure.message, "type": failure.kind, "param": failure.param}
            status = "failed"
        except Exception as failure:
            known = storage_failure(failure)
            if known is not None:
                error = {"message": known.message, "type": known.kind, "param": None}
            else:
                error = {
                    "message": f"{type(failure).__name__}: {failure}",
                    "type": "internal_error",
                    "param": None,
                }
            status = "failed"
        with self._done:
            job.result, job.error, job.status = result, error, status
            job.finished_at = time.time()
            self._done.notify_all()

    def _forget_old(self) -> None:
        finished = [jid for jid, job in self._jobs.items() if job.finished]
        for job_id in finished[: max(0, len(finished) - self.history)]:
            del self._jobs[job_id]
