"""A lean HTTP/1.1 keep-alive client for chat requests: one POST shape, sent many thousands of times.

aiohttp's send path (request object, timers, payload registry, stream
writer, response object) is most of a run's CPU against a fast server.
Every chat request of a run has the same method, URL and headers; only the
body changes. So :class:`LeanPoster` builds the request head once, writes
head, ``Content-Length`` and body in one ``transport.write``, and parses the
answer with ``httptools`` (llhttp, the parser of Node.js and uvicorn) on an
``asyncio.Protocol``: a response is a few callbacks and one future.

Connections are kept alive and reused last-in first-out, one per request in
flight (a worker never waits for another's connection). A connection the
server closed while idle is known closed (``connection_lost``) and skipped
before anything is sent. A connection that drops before a full answer ends
that attempt with an error: the request is never sent again here, since
the server may have billed it; the client's retry loop decides.

Supported: http and https (the default TLS context, server name checked, as
aiohttp does), ``Content-Length``, chunked and until-EOF bodies,
``Connection: close``, HTTP/1.0 answers, gzip and deflate
``Content-Encoding``, interim 1xx answers (skipped), a total timeout per
request and a connect timeout. Nothing here raises at the caller for a
network failure: :meth:`LeanPoster.post` raises only :class:`PostError` and
``TimeoutError``, which the transport seam turns into replies.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

__all__ = ["LeanPoster", "PostError", "Response", "supports"]

# Kept idle connections beyond this are closed (a burst of retries must not hoard sockets).
MAX_IDLE = 4096


class PostError(Exception):
    """A request that got no full answer: ``kind`` names the failure like aiohttp's exception names."""

    def __init__(self, kind: str, message: str, connecting: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.connecting = connecting  # nothing was sent: the server was never reached


@dataclass(slots=True)
class Response:
    status: int
    headers: CIMultiDict[str]
    body: bytes


def supports(url: str) -> bool:
    """True when the lean client can send to ``url`` (http or https, no credentials in the URL)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request on it at a time."""

    __slots__ = (
        "_chunks",
        "_headers",
        "_headers_done",
        "_lost",
        "_parser",
        "_status",
        "_until_eof",
        "_waiter",
        "closed",
        "reusable",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._until_eof = True
        self._headers_done = False
        self._lost: str | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("ClientResponseError", "the server switched protocols")
        except httptools.HttpParserError as exc:
            self._fail("ClientPayloadError", f"bad HTTP answer: {exc}")

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and self._until_eof:
            self._finish()  # no length and not chunked: the body ran until the server closed
            return
        self._waiter = None
        text = self._lost or ("Server disconnected" if exc is None else " ".join(str(exc).split()) or "connection lost")
        kind = "ServerDisconnectedError" if exc is None else f"ClientOSError: {type(exc).__name__}"
        waiter.set_exception(PostError(kind, text))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._status = 0
        self._headers = []
        self._chunks = []
        self._until_eof = True
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1")
        lower = key.lower()
        if lower == "content-length" or (lower == "transfer-encoding" and b"chunked" in value.lower()):
            self._until_eof = False
        self._headers.append((key, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        if self._status < 200 or self._status in (204, 304):
            self._until_eof = False  # no body by definition

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            return  # 100 Continue, 103 Early Hints: the real answer follows on the same connection
        self.reusable = self._parser.should_keep_alive()
        self._finish()

    # the request side

    def start(self, waiter: asyncio.Future[Response]) -> None:
        self._waiter = waiter
        self._headers_done = False
        self.reusable = False

    def _finish(self) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is None or waiter.done():
            return
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        encoding = headers.get("Content-Encoding")
        if encoding and body:
            try:
                body = _decode(body, encoding)
            except (zlib.error, ValueError) as exc:
                self.reusable = False
                waiter.set_exception(PostError("ClientPayloadError", f"cannot decode {encoding} body: {exc}"))
                return
        waiter.set_result(Response(self._status, headers, body))

    def _fail(self, kind: str, text: str) -> None:
        self._lost = text
        waiter = self._waiter
        self._waiter = None
        self.reusable = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(PostError(kind, text))
        self.abort()

    def time_out(self) -> None:
        """The request's total time is up: the connection holds half an answer, so it goes."""
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


def _decode(body: bytes, encoding: str) -> bytes:
    coding = encoding.strip().lower()
    if coding in ("identity", ""):
        return body
    if coding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        try:
            return zlib.decompress(body)  # zlib-wrapped, as the standard says
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


# Who is asking, for the provider's logs (aiohttp sends its own name and version the same way).
USER_AGENT = f"pipeline Python/{sys.version_info.major}.{sys.version_info.minor}"


class LeanPoster:
    """POSTs bodies to one URL with fixed headers over kept-alive connections."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        # The system's trusted roots and a hostname check, as aiohttp's default (tests pass their own roots).
        self._ssl = (ssl_context or ssl.create_default_context()) if self.https else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fixed = {"Host": parts.netloc, "User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "gzip, deflate"}
        lower = {name.lower() for name in headers}
        merged = {**{k: v for k, v in fixed.items() if k.lower() not in lower}, **headers}
        lines = [f"POST {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in merged.items()]
        # Everything but the length, encoded once for the whole run.
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("utf-8")
        self.max_connections = max_connections  # 0: no bound (callers bound requests in flight)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: list[asyncio.Future[_Connection | None]] = []
        self._connecting = 0  # connections being opened: they count against the bound already

    async def post(self, body: bytes) -> Response:
        """One request, one answer; :class:`PostError` or ``TimeoutError`` when no full answer came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        conn = self._take()
        if conn is None and self.max_connections and len(self._open) + self._connecting >= self.max_connections:
            conn = await self._wait_for_connection(loop, deadline)
            if conn is not None and (conn.closed or conn.transport is None or conn.transport.is_closing()):
                self._open.discard(conn)  # closed by the server on the way here: open another
                conn = None
        if conn is None:
            conn = await self._connect(loop, deadline)
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.start(waiter)
        transport = conn.transport
        assert transport is not None
        transport.write(b"".join((self._head, str(len(body)).encode(), b"\r\n\r\n", body)))
        timer = loop.call_at(deadline, conn.time_out)
        try:
            response = await waiter
        except BaseException:
            conn.abort()  # an error, a timeout or a cancel: half an answer may still come on it
            self._release(conn)
            raise
        finally:
            timer.cancel()
        self._release(conn)
        return response

    def _release(self, conn: _Connection) -> None:
        """After an answer: keep the connection for the next request, or close it and free its place."""
        keep: _Connection | None = conn
        if not conn.reusable or conn.closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
            self._open.discard(conn)
            keep = None
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(keep)  # a connection to reuse, or None: room to open one
                return
        if keep is not None:
            self._idle.append(keep)

    def _wake_one(self) -> None:
        if not self._waiters or not self.max_connections:
            return
        if len(self._open) + self._connecting < self.max_connections:
            while self._waiters:
                waiter = self._waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)  # room to open a connection
                    return

    async def _wait_for_connection(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection | None:
        """At the bound: wait for a request to finish (its connection, or room for a new one)."""
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException:
            handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
            if handed is not None:
                self._release(handed)  # handed over just as this request gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._open.discard(conn)  # the server closed it while idle: never send on it
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        timeout = min(self.connect_timeout_s, max(0.0, deadline - loop.time()))
        self._connecting += 1
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
            self._open.add(conn)
        except TimeoutError:
            if self.connect_timeout_s - timeout > 0.01:
                raise  # the request's own time was the shorter limit (it waited for a connection first)
            raise PostError("ConnectionTimeoutError", "connect timeout", connecting=True) from None
        except ssl.SSLError as exc:
            raise PostError(f"ClientSSLError: {type(exc).__name__}", _text(exc), connecting=True) from None
        except OSError as exc:
            tls = "default" if self.https else "False"
            text = f"Cannot connect to host {self.host}:{self.port} ssl:{tls} [{_text(exc)}]"
            raise PostError("ClientConnectorError", text, connecting=True) from None
        finally:
            self._connecting -= 1
            self._wake_one()  # a failed connect frees its place for a waiting request
        return conn

    def close(self) -> None:
        """Close every connection (idle or not); the poster may still be used after (it reconnects)."""
        for conn in list(self._open):
            conn.abort()
        self._open.clear()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
