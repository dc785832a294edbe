"""Body size limits against a real server on 127.0.0.1: a declared or a chunked body
over the limit gets 413 naming the setting, counted while it arrives."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service
from tests.service_helpers import SAMPLES

BODY_LIMIT = 4096
UPLOAD_LIMIT = 64 * 1024
KEY = "alice-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# What a client would send if never stopped: far beyond any limit here.
ENDLESS_BYTES = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    data: Path = tmp_path_factory.mktemp("limits") / "data"
    with tiny_service(
        data,
        api_keys=f"{KEY}=alice",
        max_body_bytes=BODY_LIMIT,
        max_upload_bytes=UPLOAD_LIMIT,
    ) as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as http:
        yield http


def send_chunked(base_url: str, path: str, content_type: str, head: bytes) -> tuple[int, dict, int]:
    """POSTs ``head`` and then an endless chunked body over a raw socket until the
    server answers; returns the status, the JSON body and the bytes sent."""
    address = urlsplit(base_url)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"x" * 16384
    sent = 0
    with socket.create_connection((address.hostname, address.port), timeout=60) as conn:
        conn.sendall(request)
        for data in (head, *([piece] * (ENDLESS_BYTES // len(piece)))):
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(data)
            conn.setblocking(False)
            try:
                if conn.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            finally:
                conn.setblocking(True)
        reply = b""
        deadline = time.monotonic() + 30
        while b"\r\n\r\n" not in reply or not _complete(reply):
            assert time.monotonic() < deadline, "no complete answer"
            more = conn.recv(65536)
            if not more:
                break
            reply += more
    head_part, _, body = reply.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    return status, json.loads(body), sent


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def assert_too_large(status: int, body: dict, setting: str, param: str | None) -> None:
    assert status == 413
    error = body["error"]
    assert error["type"] == "payload_too_large" and error["param"] == param
    limit = BODY_LIMIT if setting == "max_body_bytes" else UPLOAD_LIMIT
    assert f"server.{setting}={limit} bytes" in error["message"]


def test_a_declared_json_body_over_the_limit_is_refused_unread(client: httpx.Client) -> None:
    body = {"name": "big", "description": "x" * BODY_LIMIT}
    response = client.post("/v1/corpora", json=body)
    assert_too_large(response.status_code, response.json(), "max_body_bytes", None)
    response = client.post("/v1/query", json={"query": "q" * 10 * BODY_LIMIT, "corpus": "x"})
    assert_too_large(response.status_code, response.json(), "max_body_bytes", None)
    assert client.get("/v1/corpora").json()["data"] == []


def test_a_chunked_json_body_is_cut_off_at_the_limit(base_url: str, client: httpx.Client) -> None:
    head = b'{"name": "endless", "description": "'
    status, body, sent = send_chunked(base_url, "/v1/corpora", "application/json", head)
    assert_too_large(status, body, "max_body_bytes", None)
    assert sent < 32 * 1024 * 1024, "the server read far past its limit"
    assert client.get("/health").status_code == 200
    assert client.get("/v1/corpora").json()["data"] == []


def test_a_json_body_within_the_limit_is_served(client: httpx.Client) -> None:
    response = client.post("/v1/corpora", json={"name": "fits", "description": "d" * 1000})
    assert response.status_code == 201 and response.json()["name"] == "fits"
    client.delete("/v1/corpora/fits")


def test_a_chunked_upload_is_cut_off_at_the_upload_limit(
    base_url: str, client: httpx.Client
) -> None:
    assert client.post("/v1/corpora", json={"name": "up"}).status_code == 201
    boundary = "limitboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=files; filename=big.txt\r\n"
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    status, body, sent = send_chunked(
        base_url, "/v1/corpora/up/documents", f"multipart/form-data; boundary={boundary}", head
    )
    assert_too_large(status, body, "max_upload_bytes", "files")
    assert sent < 32 * 1024 * 1024, "the server read far past its limit"
    assert client.get("/v1/corpora/up").json()["num_documents"] == 0
    client.delete("/v1/corpora/up")


def test_an_upload_within_the_limit_names_the_public_corpus(client: httpx.Client) -> None:
    assert client.post("/v1/corpora", json={"name": "mine"}).status_code == 201
    data = (SAMPLES / "gettysburg_address.md").read_bytes()
    response = client.post(
        "/v1/corpora/mine/documents", files=[("files", ("g.md", data, "text/markdown"))]
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["corpus"] == "mine"
    deadline = time.monotonic() + 120
    while job["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the ingest job did not finish"
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['job_id']}").json()
    assert job["status"] == "succeeded" and job["corpus"] == "mine"
    assert client.get("/v1/corpora/mine").json()["num_documents"] == 1
