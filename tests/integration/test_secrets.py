"""The key never appears in anything printed or stored, whatever the server echoes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import CredentialsError
from pipeline.secrets import MASK, Redactor, key_from_environment, looks_like_key
from tests.conftest import TEST_KEY, reviews, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer

KEY = "sk-or-v1-0123456789abcdef+/=0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"bad key {KEY} here", "bad key *** here"),
        (f'{{"auth": "{json.dumps(KEY)[1:-1]}"}}', '{"auth": "***"}'),
        ("key=sk-or-v1-0123456789abcdef%2B%2F%3D0123456789", "key=***"),
        ("Authorization: Bearer some-other-token-123", "Authorization: Bearer ***"),
        ("authorization: bearer abc.def-ghi", "authorization: bearer ***"),
        ('{"Authorization": "Bearer xyz"}', '{"Authorization": "Bearer ***"}'),
        ("BEARER\tTOKEN", "BEARER\t***"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert Redactor(KEY).redact(text) == expected


def test_redact_bytes_masks_the_key_but_not_bearer_talk() -> None:
    body = f'{{"content": "use Bearer tokens; yours is {KEY}"}}'.encode()
    assert Redactor(KEY).redact_bytes(body) == b'{"content": "use Bearer tokens; yours is ***"}'


def test_short_secrets_are_not_masked() -> None:
    """A loopback server's "test" key must not turn every "test" in a completion into ***."""
    assert Redactor("test").redact_bytes(b"a test") == b"a test"
    assert Redactor.for_authorization(f"Bearer {KEY}").redact(KEY) == MASK
    assert Redactor.for_authorization(None).redact("Bearer x") == "Bearer ***"


@pytest.mark.parametrize(
    ("value", "is_key"),
    [
        ("OPENROUTER_API_KEY", False),
        ("MISTRAL_API_KEY", False),
        ("my_key", False),
        ("sk-or-v1-abc123", True),
        ("sk_live_abcdef", True),
        ("aB3dE5gH7jK9mN1pQ3sT", True),  # a Mistral-style key: 20+ mixed-case letters and digits
        ("has space", True),
        ("Bearer abc", True),
    ],
)
def test_looks_like_key(value: str, is_key: bool) -> None:
    assert looks_like_key(value) is is_key


@pytest.mark.parametrize(
    ("env_value", "expected"),
    [
        ("sk-abc\ndef-0123456789", "line break"),
        ("sk-abc def-0123456789", "line break, space"),
        ("sk-abc\x1bdef-0123456789", "control"),
        ("sk-abcé-0123456789", "non-ASCII"),
    ],
)
def test_malformed_key_is_one_line_without_the_key(
    monkeypatch: pytest.MonkeyPatch, env_value: str, expected: str
) -> None:
    monkeypatch.setenv("SOME_KEY", env_value)
    with pytest.raises(CredentialsError) as caught:
        key_from_environment("SOME_KEY")
    message = str(caught.value)
    assert expected in message and "SOME_KEY" in message
    assert "\n" not in message and "sk-abc" not in message


def test_api_key_env_holding_a_key_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CredentialsError) as caught:
        key_from_environment(KEY)
    assert "should name an environment variable, not hold the key" in str(caught.value)
    assert KEY not in str(caught.value) and "0123456789" not in str(caught.value)


# ------------------------------------------------------------ a server that echoes


def files_with(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_echoed_authorization_header_is_masked_everywhere(server: FakeServer, workdir: Path, json_out: bool) -> None:
    """Errors quoting the header and a completion quoting it: *** in the error column, journal and screen."""
    server.config.script = {"number 1 ": ["echo_auth:400"], "number 2 ": ["echo_auth:200"]}
    write_parquet(workdir / "data" / "in.parquet", reviews(4))
    write_job(workdir, server.base_url, limits={"concurrency": 1})
    proc = spawn(workdir, "run", "job", *(["--json"] if json_out else []))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # one row failed with HTTP 400
    assert server.stats()["requests"] == 4
    assert TEST_KEY not in out + err
    assert files_with(workdir, TEST_KEY) == []
    rows = {r["id"]: r for r in pq.read_table(workdir / "data" / "out" / "job.parquet").to_pylist()}
    assert rows[1]["error"].startswith("HTTP 400: ")
    assert "Authorization: Bearer ***" in rows[1]["error"] and "key=***" in rows[1]["error"]
    assert rows[2]["error"] is None and rows[2]["completion"].endswith("Authorization: Bearer ***")
    # The key really went out, and really came back.
    assert all(b["headers"]["Authorization"] == f"Bearer {TEST_KEY}" for b in server.stats()["bodies"])


def test_echoed_key_in_a_rejection_is_masked(server: FakeServer, workdir: Path) -> None:
    """A 401 quoting the header stops the run (exit 3); its reason is printed without the key."""
    server.config.fail_rate = 1.0
    server.config.fail_kind = "echo_auth:401"
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, limits={"concurrency": 1})
    proc = spawn(workdir, "run", "job")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "401" in out + err and "***" in out + err
    assert TEST_KEY not in out + err
    assert files_with(workdir, TEST_KEY) == []
