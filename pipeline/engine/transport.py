"""How one chat request goes over the wire: body in, :class:`~pipeline.providers.base.Reply` out.

The client's retry loop (``engine/client.py``) sees only :class:`ChatTransport`:
``send(body)`` returns a reply for every outcome, a network failure included
(a RETRY reply with a ``connection error: ...`` or ``timeout after N s`` text),
never an exception. Two transports stand behind it:

- :class:`LeanTransport`: the project's own HTTP/1.1 keep-alive client
  (``engine/http1.py``, on ``httptools``), a fraction of aiohttp's CPU per
  request. The default for chat requests to an http(s) URL.
- :class:`AiohttpTransport`: an ``aiohttp.ClientSession``, as before. Used when
  ``PIPELINE_HTTP=aiohttp`` is set (an escape hatch), when ``httptools`` cannot
  be imported, or when the URL carries credentials.

Both read the same headers and mask the key the same way (:class:`~pipeline.secrets.Redactor`)
in whatever the server echoes. Batch APIs, model listings and the stated
limit keep using aiohttp: they send a handful of requests per run.
"""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from pipeline.providers.base import Reply, ReplyKind, parse_response
from pipeline.secrets import Redactor

if TYPE_CHECKING:
    import aiohttp  # imported where used: a run on the lean client never loads it

__all__ = [
    "CONNECT_TIMEOUT_S",
    "ENV_VAR",
    "AiohttpTransport",
    "ChatTransport",
    "LeanTransport",
    "chat_transport",
    "lean_available",
    "open_session",
]

# Connecting should take well under this; a server that cannot be reached is
# then found in seconds, not after the whole request timeout.
CONNECT_TIMEOUT_S = 10.0
ENV_VAR = "PIPELINE_HTTP"  # "aiohttp": every chat request through aiohttp
CONNECT_TIMEOUT_TEXT = "connection error: could not connect before the connect timeout"


class ChatTransport(Protocol):
    """Sends one chat request body; every outcome is a reply."""

    name: str
    headers: Mapping[str, str]

    async def send(self, body: bytes) -> Reply: ...

    def close(self) -> None: ...


class AiohttpTransport:
    """A chat POST through an aiohttp session (its headers and timeouts are the session's defaults)."""

    name = "aiohttp"

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        import aiohttp

        self._connect_timeout_error = aiohttp.ConnectionTimeoutError
        self._client_error = aiohttp.ClientError
        self.session = session
        self.url = url
        self.timeout_s = timeout_s
        self.headers: Mapping[str, str] = session.headers
        self._redactor = Redactor.for_headers(session.headers)

    async def send(self, body: bytes) -> Reply:
        try:
            async with self.session.post(self.url, data=body) as resp:
                raw = self._redactor.response(await resp.read())
                reply = parse_response(resp.status, raw, resp.headers)
        except self._connect_timeout_error:
            # The server never accepted the connection: as unreachable as a refused one.
            reply = Reply(ReplyKind.RETRY, error=CONNECT_TIMEOUT_TEXT)
        except TimeoutError:
            return Reply(ReplyKind.RETRY, error=f"timeout after {self.timeout_s:g} s")
        except self._client_error as exc:
            reply = Reply(ReplyKind.RETRY, error=f"connection error: {type(exc).__name__}: {describe(exc)}")
        reply.error = self._redactor.message(reply.error)
        return reply

    def close(self) -> None:
        """The session belongs to whoever opened it."""


class LeanTransport:
    """A chat POST through :class:`pipeline.engine.http1.LeanPoster`."""

    name = "lean"

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        from pipeline.engine.http1 import LeanPoster, PostError

        self._error = PostError
        fixed = dict(headers)
        self.headers: Mapping[str, str] = fixed
        self.timeout_s = timeout_s
        self._poster = LeanPoster(url, fixed, timeout_s, connect_timeout_s, connections, ssl_context)
        self._redactor = Redactor.for_headers(fixed)

    async def send(self, body: bytes) -> Reply:
        try:
            response = await self._poster.post(body)
        except TimeoutError:
            return Reply(ReplyKind.RETRY, error=f"timeout after {self.timeout_s:g} s")
        except self._error as exc:
            if exc.kind == "ConnectionTimeoutError":
                reply = Reply(ReplyKind.RETRY, error=CONNECT_TIMEOUT_TEXT)
            else:
                reply = Reply(ReplyKind.RETRY, error=f"connection error: {exc.kind}: {describe(exc)}")
        else:
            reply = parse_response(response.status, self._redactor.response(response.body), response.headers)
        reply.error = self._redactor.message(reply.error)
        return reply

    def close(self) -> None:
        self._poster.close()


def lean_available(url: str) -> bool:
    """True when chat requests to ``url`` go through the lean client (see the module's docstring)."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "aiohttp":
        return False
    try:
        http1 = importlib.import_module("pipeline.engine.http1")
    except ImportError:  # no httptools for this platform, or a broken wheel
        return False
    return bool(http1.supports(url))


def chat_transport(
    session: aiohttp.ClientSession, url: str, timeout_s: float, connect_timeout_s: float, connections: int = 0
) -> ChatTransport:
    """The transport for a run's chat requests: lean where it can, else the aiohttp ``session``.

    ``session`` carries the run's headers (and timeouts, for the aiohttp path);
    ``connections`` bounds the lean client's open connections (0: one per request in flight).
    """
    if lean_available(url):
        return LeanTransport(url, session.headers, timeout_s, connect_timeout_s, connections)
    return AiohttpTransport(session, url, timeout_s)


def open_session(
    headers: Mapping[str, str], connections: int, timeout_s: float, connect_timeout_s: float
) -> aiohttp.ClientSession:
    """An aiohttp session with a run's headers and timeouts (the aiohttp transport, the stated limit)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        headers=dict(headers),
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s),
    )


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else "no details"
