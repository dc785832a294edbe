"""Auth fails closed: a key setting that does not parse stops the start, the bearer header
is read strictly, and the API docs need a key when keys are set."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from ragcache.api.app import create_app
from ragcache.api.auth import AccessKeys, parse_api_keys
from ragcache.cli import main
from ragcache.config import ConfigError, ServerConfig
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service

KEYS = "key-a=tenant-a,key-b"
DOCS = ("/docs", "/redoc", "/openapi.json")

BAD_SETTINGS = {
    "only a comma": (",", "entry 1 is empty"),
    "no key": ("=alice", "entry 1 has no key"),
    "empty tenant": ("secret-1=", "entry 1 has an empty tenant"),
    "empty entry between keys": ("secret-1,,secret-2", "entry 2 is empty"),
    "trailing comma": ("secret-1=a,", "entry 2 is empty"),
    "space in a key": ("secret 1=a", "entry 1: the key holds a space"),
    "space before '='": ("secret-1 =a", "entry 1: the key holds a space"),
    "non-ASCII key": ("sécret=a", "entry 1: the key holds a space or a character"),
    "space in a tenant": ("secret-1=team a", "entry 1: the tenant holds a space"),
    "repeated key": ("secret-1=a,secret-1=b", "entry 2 repeats the key"),
    "repeated bare key": ("secret-1,secret-1", "entry 2 repeats the key"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
@pytest.mark.parametrize("setting", ["server.api_keys", "server.admin_keys"])
def test_a_key_setting_that_does_not_parse_is_an_error_naming_it(setting: str, case: str) -> None:
    text, message = BAD_SETTINGS[case]
    field = setting.split(".")[1]
    with pytest.raises(ConfigError, match=f"^{re.escape(setting)}: {message}") as raised:
        AccessKeys(**{field: text})
    assert "secret" not in str(raised.value), "the message shows a key"


def test_good_key_settings_parse() -> None:
    assert parse_api_keys("") == parse_api_keys("  ") == {}
    assert parse_api_keys(" k1=team-a , k2 ") == {"k1": "team-a", "k2": ""}
    keys = AccessKeys("k1=team-a,k2=team-b", "k1=team-a,root")
    assert keys.tenants == {"k1": "team-a", "k2": "team-b", "root": ""}
    assert set(keys.admins) == {"k1", "root"}
    with pytest.raises(ConfigError, match="two different tenants"):
        AccessKeys("k1=team-a", "k1=team-b")


@pytest.mark.parametrize(
    ("flag", "text"), [("server.api_keys", ","), ("server.admin_keys", "=alice")]
)
def test_serve_refuses_to_start_on_a_key_setting_that_does_not_parse(
    flag: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The check runs before the model loads or a port is bound.
    assert main(["serve", "--server.host", "0.0.0.0", f"--{flag}", text]) == 2
    error = capsys.readouterr().err
    assert f"{flag}: entry 1" in error and "loopback" not in error


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("auth") / "data") as rag:
        yield rag


def test_create_app_refuses_a_key_setting_that_does_not_parse(service: RagCache) -> None:
    with pytest.raises(ConfigError, match=r"server\.api_keys: entry 1 has no key"):
        create_app(service, ServerConfig(api_keys="=alice"))


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service, ServerConfig(api_keys=KEYS))) as url:
        yield url


HEADERS = {
    "exact scheme": ("Bearer key-a", 200),
    # RFC 7235 makes the auth-scheme case-insensitive; the key itself is compared exactly.
    "lowercase scheme": ("bearer key-a", 200),
    "uppercase scheme": ("BEARER key-b", 200),
    "key in the wrong case": ("Bearer KEY-A", 401),
    "two spaces": ("Bearer  key-a", 401),
    "space inside the token": ("Bearer key-a extra", 401),
    "no space": ("Bearerkey-a", 401),
    "other scheme": ("Basic key-a", 401),
    "scheme alone": ("Bearer", 401),
    "key alone": ("key-a", 401),
    "unknown key": ("Bearer key-c", 401),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_bearer_header_is_read_strictly(base_url: str, case: str) -> None:
    header, status = HEADERS[case]
    response = httpx.get(f"{base_url}/v1/corpora", headers={"Authorization": header})
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_missing_or_repeated_authorization_header_is_refused(base_url: str) -> None:
    assert httpx.get(f"{base_url}/v1/corpora").status_code == 401
    twice = [("Authorization", "Bearer key-a"), ("Authorization", "Bearer key-b")]
    assert httpx.get(f"{base_url}/v1/corpora", headers=twice).status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_padding_around_the_key_is_refused(service: RagCache) -> None:
    # Over HTTP the server strips whitespace around a header value before the app sees
    # it (RFC 9110, section 5.5); the app itself refuses any padding that reaches it.
    with TestClient(create_app(service, ServerConfig(api_keys=KEYS))) as http:
        for header in ("Bearer key-a ", "Bearer key-a\t", "Bearer \tkey-a"):
            assert http.get("/v1/corpora", headers={"Authorization": header}).status_code == 401
        assert http.get("/v1/corpora", headers={"Authorization": "Bearer key-a"}).status_code == 200


def test_docs_need_a_key_when_keys_are_set(base_url: str) -> None:
    for path in DOCS:
        assert httpx.get(f"{base_url}{path}").status_code == 401, path
        good = httpx.get(f"{base_url}{path}", headers={"Authorization": "Bearer key-b"})
        assert good.status_code == 200, path
    schema = httpx.get(f"{base_url}/openapi.json", headers={"Authorization": "Bearer key-a"})
    assert "/v1/chat/completions" in schema.json()["paths"]


def test_docs_are_open_without_keys_or_with_public_docs(service: RagCache) -> None:
    for server in (ServerConfig(), ServerConfig(api_keys=KEYS, public_docs=True)):
        with running_server(create_app(service, server)) as url:
            for path in DOCS:
                assert httpx.get(f"{url}{path}").status_code == 200, path
            assert "openapi.json" in httpx.get(f"{url}/docs").text
            if server.api_keys:
                assert httpx.get(f"{url}/v1/corpora").status_code == 401
