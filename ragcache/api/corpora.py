"""Routes of corpora, their documents and the ingest jobs that fill them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ragcache.api.admission import tenant_of
from ragcache.api.deps import get_server_config, get_service
from ragcache.api.schemas import CreateCorpusRequest
from ragcache.config import ServerConfig
from ragcache.errors import InvalidInputError, PayloadTooLargeError
from ragcache.service import RagCache

router = APIRouter()


@router.post("/v1/corpora", status_code=201)
def create_corpus(
    body: CreateCorpusRequest, service: RagCache = Depends(get_service)
) -> dict[str, Any]:
    return asdict(service.create_corpus(body.name, body.description))


@router.get("/v1/corpora")
def list_corpora(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return {"data": [asdict(info) for info in service.list_corpora()]}


@router.get("/v1/corpora/{name}")
def get_corpus(name: str, service: RagCache = Depends(get_service)) -> dict[str, Any]:
    info = asdict(service.get_corpus(name))
    info["documents"] = [
        {k: v for k, v in asdict(doc).items() if k != "chunk_ids"}
        for doc in service.list_documents(name)
    ]
    return info


@router.delete("/v1/corpora/{name}")
def delete_corpus(name: str, service: RagCache = Depends(get_service)) -> dict[str, Any]:
    service.delete_corpus(name)
    return {"deleted": name}


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the upload is larger than server.max_upload_bytes={limit} bytes; send fewer or "
        "smaller files, or raise server.max_upload_bytes",
        "files",
    )


@router.post("/v1/corpora/{name}/documents", status_code=202)
async def upload_documents(
    name: str,
    request: Request,
    service: RagCache = Depends(get_service),
    server: ServerConfig = Depends(get_server_config),
) -> dict[str, Any]:
    """Multipart upload of one or more files; ingestion runs as a background job.

    The body limit (server.max_upload_bytes) is enforced while the body arrives (see
    body_limit); the parser spools every file to a temporary file as it comes, and a
    file is read back only once the whole upload is known to fit."""
    await run_in_threadpool(service.get_corpus, name)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("send the files as multipart/form-data", "files")
    try:
        form = await request.form()
    except ClientDisconnect:
        raise InvalidInputError("the upload ended before its last part", "files") from None
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if sum(upload.size or 0 for upload in uploads) > server.max_upload_bytes:
            raise _too_large(server.max_upload_bytes)
        if not uploads:
            raise InvalidInputError("the upload holds no files; send them as form files", "files")
        admission, tenant = request.app.state.admission, tenant_of(request)
        held = admission.admit_ingest(tenant, sum(upload.size or 0 for upload in uploads), service)
        try:
            files = [(await upload.read(), upload.filename or "upload") for upload in uploads]
        except BaseException:
            admission.release(tenant, held)
            raise
    finally:
        await form.close()
    try:
        job = await run_in_threadpool(service.submit_ingest, files, name)
    except BaseException:
        admission.release(tenant, held)
        raise
    admission.started(held, job.job_id)
    return job.to_dict()


@router.delete("/v1/corpora/{name}/documents/{doc_id:path}")
def delete_document(
    name: str, doc_id: str, service: RagCache = Depends(get_service)
) -> dict[str, Any]:
    service.delete_document(name, doc_id)
    return {"deleted": doc_id, "corpus": name}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return service.jobs.get(job_id).to_dict()
