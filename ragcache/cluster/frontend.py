"""The cluster's HTTP entry point: every route of a single server, served by a generator
replica running the single server's own FastAPI app (api/app.py), so routes, auth (API
keys), errors and streaming are the same by construction.

The frontend reads only what routing needs: the caller's tenant from its API key, and
the chunk texts its answer will use (routing_hints.py, with the retrieval deployment
for corpus questions); the chosen replica checks the key again and does all the work.
A job started by an upload lives on the replica that took the upload, so job polls go
back to that replica. A request whose replica dies before it answers is sent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ragcache.api.auth import AccessKeys, AuthError
from ragcache.api.body_limit import UPLOAD_PATH
from ragcache.api.errors import error_body
from ragcache.cluster.asgi_call import ForwardedRequest
from ragcache.cluster.routing import chunk_fingerprint
from ragcache.cluster.routing_hints import given_documents, parse_answer_request, retrieval_target
from ragcache.config import Config

logger = logging.getLogger(__name__)

# A generation lost with its replica (SIGKILL, node loss) is sent again: it is idempotent.
# Ray drops the dead replica from the candidates once it notices; the pause lets it.
GENERATION_ATTEMPTS = 4
RETRY_PAUSE_S = 0.5
JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)$")
REPLICA_HEADER = b"x-ragcache-replica"
REMEMBERED_JOBS = 4096


class ReplicaLost(Exception):
    """The replica died before the response started."""


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Frontend:
    def __init__(
        self, generation: DeploymentHandle, retrieval: DeploymentHandle, config: Config
    ) -> None:
        self.generation = generation
        self.retrieval = retrieval
        self.config = config
        self.keys = AccessKeys(config.server.api_keys, config.server.admin_keys)
        self.job_replicas: OrderedDict[str, str] = OrderedDict()

    # ---- Python handle calls ---------------------------------------------------------

    async def query(
        self,
        question: str,
        corpus: str,
        k: int = 3,
        tenant: str = "",
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        chunks = await self.retrieval.retrieve.remote(question, corpus, k, tenant)
        result = await self.answer(
            [chunk["text"] for chunk in chunks], question, tenant, max_tokens
        )
        return {**result, "sources": chunks}

    async def answer(
        self,
        documents: list[str],
        question: str,
        tenant: str = "",
        max_tokens: int | None = None,
        method: str | None = None,
    ) -> dict[str, Any]:
        request = {
            "documents": documents,
            "question": question,
            "tenant": tenant,
            "max_tokens": max_tokens,
            "method": method,
            "chunk_fingerprints": [chunk_fingerprint(text, tenant) for text in documents],
        }
        for attempt in range(1, GENERATION_ATTEMPTS + 1):
            try:
                return await self.generation.generate.remote(request)
            except (RayActorError, ActorUnavailableError):
                if attempt == GENERATION_ATTEMPTS:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    async def cache_stats(self) -> dict[str, Any]:
        return await self.generation.cache_stats.remote()

    # ---- HTTP ------------------------------------------------------------------------

    async def __call__(self, http: Request) -> Response:
        server = self.config.server
        upload = http.method == "POST" and UPLOAD_PATH.match(http.url.path) is not None
        limit = server.max_upload_bytes if upload else server.max_body_bytes
        body = bytearray()
        async for piece in http.stream():
            body += piece
            if len(body) > limit:
                setting = "max_upload_bytes" if upload else "max_body_bytes"
                message = f"the request body is larger than server.{setting} ({limit} bytes)"
                return JSONResponse(error_body(message, "payload_too_large", None), 413)
        request = ForwardedRequest(
            http.method,
            http.url.path,
            http.url.query.encode(),
            list(http.headers.raw),
            bytes(body),
            (http.client.host, http.client.port) if http.client else None,
        )
        await self._add_routing(request, http)
        return await self._forward(request)

    async def _add_routing(self, request: ForwardedRequest, http: Request) -> None:
        job = JOB_PATH.match(request.path)
        if job is not None:
            request.pinned_replica = self.job_replicas.get(job.group(1))
            return
        body = parse_answer_request(request.path, request.body)
        if body is None:
            return
        try:
            request.tenant = self.keys.caller(http).tenant
        except AuthError:
            return  # the replica answers 401
        texts = given_documents(body)
        target = retrieval_target(request.path, body, self.config.retriever.top_k)
        if texts is None and target is not None:
            question, corpus, k = target
            try:
                chunks = await self.retrieval.retrieve.remote(question, corpus, k, request.tenant)
                texts = [chunk["text"] for chunk in chunks]
            except Exception as error:  # the replica answers the same error properly
                logger.debug("no routing hint for %s: %s", request.path, error)
        request.routing_texts = texts or []
        request.chunk_fingerprints = [
            chunk_fingerprint(text, request.tenant) for text in request.routing_texts
        ]

    async def _forward(self, request: ForwardedRequest) -> Response:
        for attempt in range(1, GENERATION_ATTEMPTS + 1):
            stream = self.generation.options(stream=True).http.remote(request)
            try:
                start = await self._start(stream)
            except ReplicaLost:
                if attempt == GENERATION_ATTEMPTS:
                    message = f"no generator replica answered after {attempt} attempts; retry"
                    return JSONResponse(error_body(message, "service_unavailable", None), 503)
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
                continue
            headers = dict(start["headers"])
            replica = headers.get(REPLICA_HEADER, b"").decode()
            if start["status"] == 202 and UPLOAD_PATH.match(request.path):
                return await self._remember_job(stream, start, replica)
            response = StreamingResponse(_pieces(stream), status_code=start["status"])
            response.raw_headers = start["headers"]
            return response
        raise AssertionError("unreachable")

    async def _start(self, stream: Any) -> dict[str, Any]:
        try:
            return await stream.__anext__()
        except (RayActorError, ActorUnavailableError) as error:
            raise ReplicaLost() from error
        except StopAsyncIteration as error:
            raise ReplicaLost() from error

    async def _remember_job(self, stream: Any, start: dict[str, Any], replica: str) -> Response:
        body = b"".join([piece async for piece in _pieces(stream)])
        job_id = json.loads(body).get("job_id")
        if isinstance(job_id, str) and replica:
            self.job_replicas[job_id] = replica
            while len(self.job_replicas) > REMEMBERED_JOBS:
                self.job_replicas.popitem(last=False)
        response = Response(body, status_code=start["status"])
        response.raw_headers = start["headers"]
        return response


async def _pieces(stream: Any) -> AsyncIterator[bytes]:
    async for piece in stream:
        yield piece
