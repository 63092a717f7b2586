"""The chat transport seam (engine/transport.py): both transports, one loopback server speaking raw HTTP.

Every test runs on the lean client (engine/http1.py) and on aiohttp: the
seam's promise (every outcome a Reply, the same error texts, the key
masked, nothing sent twice) must hold whichever is in use.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import ssl
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.engine import transport as seam
from pipeline.engine.transport import AiohttpTransport, ChatTransport, LeanTransport, chat_transport
from pipeline.providers.base import ReplyKind

KEY = "sk-or-v1-TESTKEY-abcdefghijklmnop"
OK_BODY = json.dumps(
    {
        "choices": [{"message": {"content": "positive"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "cost": 0.0001},
    }
).encode()
CLOSE = object()  # an action: close the connection now, whatever was asked
HANG = object()  # an action: never answer


def answer(body: bytes = OK_BODY, status: str = "200 OK", headers: str = "", version: str = "1.1") -> bytes:
    head = f"HTTP/{version} {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}"
    return head.encode() + b"\r\n" + body


class RawServer:
    """A loopback HTTP/1.1 server that answers each request with the next scripted action.

    An action is bytes (written, the connection kept), a list of them (written,
    then the connection closed), CLOSE or HANG. It records every request it read
    and every connection it accepted.
    """

    def __init__(self, script: list[Any], ssl_context: ssl.SSLContext | None = None) -> None:
        self.script = list(script)
        self.ssl_context = ssl_context
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        host = "localhost" if self.ssl_context is not None else "127.0.0.1"
        self.url = f"{'https' if self.ssl_context else 'http'}://{host}:{port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                action = self.script.pop(0) if self.script else answer()
                if action is HANG:
                    await asyncio.sleep(3600)
                if action is CLOSE:
                    break
                if isinstance(action, list):
                    for part in action:
                        writer.write(part)
                    await writer.drain()
                    break
                writer.write(action)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.transport.abort()


Factory = Callable[..., ChatTransport]


@pytest.fixture(params=["lean", "aiohttp"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Builds a transport of the parametrised kind; closes what it built."""
    sessions: list[aiohttp.ClientSession] = []
    built: list[ChatTransport] = []

    def build(
        url: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
        connect_s: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ChatTransport:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
        made: ChatTransport
        if request.param == "lean":
            made = LeanTransport(url, headers, timeout_s, connect_s, ssl_context=ssl_context)
        else:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s),
            )
            sessions.append(session)
            made = AiohttpTransport(session, url, timeout_s)
        built.append(made)
        return made

    yield build
    for made in built:
        made.close()
    for session in sessions:
        await session.close()


async def test_ok_reply_and_request_shape(make: Factory) -> None:
    async with RawServer([answer()]) as server:
        transport = make(server.url, {"X-Title": "bench"})
        reply = await transport.send(b'{"messages": []}')
    assert reply.kind == ReplyKind.OK and reply.content == "positive" and reply.cost == 0.0001
    head, body = server.requests[0]
    assert body == b'{"messages": []}'
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    assert fields["host"] == server.url.split("/")[2]
    assert fields["content-type"] == "application/json"
    assert fields["content-length"] == str(len(body))
    assert fields["authorization"] == f"Bearer {KEY}"
    assert fields["x-title"] == "bench"


async def test_keep_alive_reuses_one_connection(make: Factory) -> None:
    async with RawServer([answer(), answer(), answer()]) as server:
        transport = make(server.url)
        for _ in range(3):
            assert (await transport.send(b"{}")).kind == ReplyKind.OK
    assert server.connections == 1 and len(server.requests) == 3


async def test_chunked_body(make: Factory) -> None:
    half = len(OK_BODY) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (OK_BODY[:half], OK_BODY[half:])) + b"0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    async with RawServer([raw, answer()]) as server:
        transport = make(server.url)
        assert (await transport.send(b"{}")).content == "positive"
        assert (await transport.send(b"{}")).content == "positive"  # the connection is still usable after
    assert server.connections == 1


async def test_http10_body_until_eof(make: Factory) -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY
    async with RawServer([[raw], answer()]) as server:
        transport = make(server.url)
        assert (await transport.send(b"{}")).content == "positive"
        assert (await transport.send(b"{}")).content == "positive"
    assert server.connections == 2  # the first answer ended with the connection


async def test_connection_close_reconnects(make: Factory) -> None:
    async with RawServer([[answer(headers="Connection: close\r\n")], answer()]) as server:
        transport = make(server.url)
        assert (await transport.send(b"{}")).kind == ReplyKind.OK
        assert (await transport.send(b"{}")).kind == ReplyKind.OK
    assert server.connections == 2 and len(server.requests) == 2


async def test_idle_connection_closed_by_server_is_not_sent_on(make: Factory) -> None:
    """The server closes a kept-alive connection while it is idle: the next request goes on a new one."""
    async with RawServer([[answer()], answer()]) as server:
        transport = make(server.url)
        assert (await transport.send(b"{}")).kind == ReplyKind.OK
        await asyncio.sleep(0.1)  # the close arrives while the connection is idle
        reply = await transport.send(b"{}")
    assert reply.kind == ReplyKind.OK, reply.error
    assert server.connections == 2 and len(server.requests) == 2


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_answer(make: Factory, coding: str) -> None:
    if coding == "gzip":
        body = gzip.compress(OK_BODY)
    elif coding == "deflate":
        body = zlib.compress(OK_BODY)
    else:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(OK_BODY) + packer.flush()
    name = "gzip" if coding == "gzip" else "deflate"
    async with RawServer([answer(body, headers=f"Content-Encoding: {name}\r\n")]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.content == "positive", reply.error


async def test_interim_100_continue_is_skipped(make: Factory) -> None:
    async with RawServer([b"HTTP/1.1 100 Continue\r\n\r\n" + answer()]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.kind == ReplyKind.OK and reply.status == 200


async def test_headers_are_case_insensitive(make: Factory) -> None:
    error = json.dumps({"error": {"message": "slow down"}}).encode()
    raw = answer(error, status="429 Too Many Requests", headers="retry-after: 7\r\n")
    async with RawServer([raw]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.kind == ReplyKind.RETRY and reply.status == 429 and reply.retry_after == 7


async def test_drop_before_answer_is_one_retry_reply_never_resent(make: Factory) -> None:
    """The connection dies after the request went out: one attempt, a RETRY reply, sent once (it may be billed)."""
    async with RawServer([CLOSE]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.kind == ReplyKind.RETRY and reply.status is None
    assert (reply.error or "").startswith("connection error: "), reply.error
    assert len(server.requests) == 1


async def test_drop_mid_answer(make: Factory) -> None:
    async with RawServer([[answer()[:-10]]]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.kind == ReplyKind.RETRY and (reply.error or "").startswith("connection error: "), reply.error
    assert len(server.requests) == 1


async def test_total_timeout(make: Factory) -> None:
    async with RawServer([HANG, answer()]) as server:
        transport = make(server.url, timeout_s=0.3)
        reply = await transport.send(b"{}")
        assert reply.kind == ReplyKind.RETRY and reply.error == "timeout after 0.3 s"
        assert (await transport.send(b"{}")).kind == ReplyKind.OK  # the half-answered connection was dropped
    assert server.connections == 2


async def test_refused_connection(make: Factory) -> None:
    async with RawServer([]) as server:
        url = server.url
    reply = await make(url).send(b"{}")  # the server is gone: nothing listens on the port
    assert reply.kind == ReplyKind.RETRY and reply.status is None
    assert (reply.error or "").startswith("connection error: "), reply.error


async def test_key_echoed_by_the_server_is_masked(make: Factory) -> None:
    error = json.dumps({"error": {"message": f"bad key Bearer {KEY} ({KEY})"}}).encode()
    async with RawServer([answer(error, status="401 Unauthorized")]) as server:
        reply = await make(server.url).send(b"{}")
    assert reply.kind == ReplyKind.AUTH
    assert KEY not in (reply.error or "") and "***" in (reply.error or "")


async def test_cancel_mid_request_drops_the_connection(make: Factory) -> None:
    async with RawServer([HANG, answer()]) as server:
        transport = make(server.url)
        task = asyncio.create_task(transport.send(b"{}"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await transport.send(b"{}")).kind == ReplyKind.OK
    assert server.connections == 2 and len(server.requests) == 2


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (the openssl command line makes it)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
    subject = ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run([*request, *subject], check=True, capture_output=True)
    return cert, key


def _tls(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(*certificate)
    client = ssl.create_default_context(cafile=str(certificate[0]))
    return server, client


async def test_https(make: Factory, certificate: tuple[Path, Path]) -> None:
    server_tls, client_tls = _tls(certificate)
    async with RawServer([answer(), answer()], ssl_context=server_tls) as server:
        transport = make(server.url, ssl_context=client_tls)
        assert (await transport.send(b"{}")).content == "positive"
        assert (await transport.send(b"{}")).content == "positive"
    assert server.connections == 1


async def test_https_checks_the_certificate(make: Factory, certificate: tuple[Path, Path]) -> None:
    server_tls, _ = _tls(certificate)
    async with RawServer([answer()], ssl_context=server_tls) as server:
        reply = await make(server.url).send(b"{}")  # the system's roots do not hold the test certificate
    assert reply.kind == ReplyKind.RETRY and (reply.error or "").startswith("connection error: "), reply.error
    assert not server.requests


async def test_lean_connect_timeout() -> None:
    """A TLS server that never finishes the handshake: the connect timeout's own text, well before the total."""
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = LeanTransport(f"https://127.0.0.1:{port}/v1/chat/completions", {}, 5.0, 0.3)
    try:
        reply = await asyncio.wait_for(transport.send(b"{}"), 2)
    finally:
        transport.close()
        server.close()
    assert accepted.is_set()
    assert reply.error == seam.CONNECT_TIMEOUT_TEXT


async def test_lean_bound_on_connections() -> None:
    """With a bound, requests beyond it wait for a connection instead of opening more."""
    async with RawServer([answer()] * 8) as server:
        transport = LeanTransport(server.url, {}, 5.0, 2.0, connections=2)
        try:
            replies = await asyncio.gather(*(transport.send(b"{}") for _ in range(8)))
        finally:
            transport.close()
    assert all(r.kind == ReplyKind.OK for r in replies)
    assert server.connections <= 2


async def test_chat_transport_picks_lean_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        url = "http://127.0.0.1:9/v1/chat/completions"
        assert chat_transport(session, url, 5, 2).name == "lean"
        assert chat_transport(session, "http://user:pw@127.0.0.1:9/v1/chat/completions", 5, 2).name == "aiohttp"
        monkeypatch.setenv(seam.ENV_VAR, "aiohttp")
        assert chat_transport(session, url, 5, 2).name == "aiohttp"
        monkeypatch.delenv(seam.ENV_VAR)
        # httptools missing (or broken): importing the lean client fails, aiohttp is used.
        monkeypatch.setitem(sys.modules, "httptools", None)
        monkeypatch.setitem(sys.modules, "pipeline.engine.http1", None)
        assert chat_transport(session, url, 5, 2).name == "aiohttp"
