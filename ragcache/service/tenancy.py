"""Tenant namespaces: a tenant's corpora are stored under a prefix made from its id.

Stored names of a tenant's corpora start with a digest of the tenant id, so they stay
valid corpus names whatever the tenant id is; the default tenant may not use the form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from typing import Any

from ragcache.corpus.jobs import Job, JobRunner
from ragcache.corpus.progress import Progress
from ragcache.errors import NotFoundError

TENANT_CORPUS_PREFIX = re.compile(r"^t[0-9a-f]{8}--")


def tenant_corpus_prefix(tenant: str) -> str:
    if not tenant:
        return ""
    return "t" + hashlib.blake2b(tenant.encode(), digest_size=4).hexdigest() + "--"


def is_reserved(name: str) -> bool:
    """Whether ``name`` has the form of a tenant's stored name."""
    return TENANT_CORPUS_PREFIX.match(name) is not None


def owns(tenant: str, stored_name: str) -> bool:
    """Whether the corpus stored as ``stored_name`` belongs to ``tenant``."""
    prefix = tenant_corpus_prefix(tenant)
    return stored_name.startswith(prefix) if prefix else not is_reserved(stored_name)


class TenantJobs:
    """The ingest jobs of one tenant's corpora, shown under their public names."""

    def __init__(self, runner: JobRunner, tenant: str) -> None:
        self.runner = runner
        self.tenant = tenant
        self.prefix = tenant_corpus_prefix(tenant)

    def submit(self, kind: str, corpus: str, work: Callable[[Progress], dict[str, Any]]) -> Job:
        return self.runner.submit(kind, corpus, work)

    def get(self, job_id: str) -> Job:
        job = self.runner.get(job_id)
        if not owns(self.tenant, job.corpus):
            raise NotFoundError(f"job {job_id!r} does not exist (or is too old to be kept)", "id")
        return dataclasses.replace(job, corpus=job.corpus[len(self.prefix) :])
