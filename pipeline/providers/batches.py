"""What every provider batch API adapter offers the engine (``engine/drivers/batch.py``).

An adapter submits a list of chat requests as one provider batch, polls it,
and reads its results. It knows the provider's wire shapes and nothing of rows,
journals or budgets. Every result is turned into the same :class:`Reply` the
realtime client produces, by the same parser (``parse_response`` on the
result's ``status_code`` and ``body``), so a batch answer is classified (ok,
retry, fatal, auth) exactly like a realtime one.

HTTP failures of the batch routes themselves (submit, poll, download) raise
:class:`BatchApiError` carrying a classified ``Reply``: the engine retries the
transient ones and stops on the others.

Every answer of every batch route passes the same redaction seam as realtime
replies (``secrets.Redactor.for_headers``) before it is parsed: a key a server
echoes never reaches a result, an error, a stop line or the journal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.providers.base import Reply, ReplyKind, classify_status, parse_response
from pipeline.secrets import Redactor

if TYPE_CHECKING:
    import aiohttp

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class BatchStatus(StrEnum):
    """A provider's batch status, normalised."""

    PENDING = "pending"  # validating, queued, running, finalizing, cancelling
    UNKNOWN = "unknown"  # a word the provider never documented: neither done nor known to be running
    COMPLETED = "completed"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (BatchStatus.PENDING, BatchStatus.UNKNOWN)


# The status words of OpenAI's batch API, which OpenRouter's batches use too (PROVIDERS.md).
OPENAI_STATUSES = {
    "validating": BatchStatus.PENDING,
    "in_progress": BatchStatus.PENDING,
    "finalizing": BatchStatus.PENDING,
    "cancelling": BatchStatus.PENDING,
    "completed": BatchStatus.COMPLETED,
    "expired": BatchStatus.EXPIRED,
    "failed": BatchStatus.FAILED,
    "cancelled": BatchStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One row's chat request: the body the realtime client would POST, under the row's custom_id."""

    custom_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One answered request of a batch, matched to its row by ``custom_id`` (never by position)."""

    custom_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class ResultsPage:
    """Results read in one go, and where to resume reading after them (None: nothing more)."""

    results: list[BatchResult]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class BatchState:
    """A batch as the provider last described it."""

    id: str
    status: BatchStatus
    provider_status: str  # the provider's own word, for people (``pipeline status``)
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    error: str | None = None  # why a batch failed, when the provider says
    inline: tuple[BatchResult, ...] | None = None  # results carried by the batch object itself (OpenRouter)
    files: tuple[str, ...] = ()  # output and error files to download (Mistral, OpenAI)
    expires_at: float | None = None  # when the provider said it would end the batch (epoch seconds)


@dataclass(frozen=True, slots=True)
class ListedBatch:
    """A batch as the provider's listing shows it: enough to find one this job submitted."""

    id: str
    status: str
    metadata: dict[str, str]


def submission_metadata(job: str, custom_ids: list[str]) -> dict[str, str]:
    """What a submission carries to be found again: its journal's tag and a digest of its rows.

    A run killed after the provider accepted a batch but before the journal
    recorded it finds the batch by these (``list_batches``) and adopts it.
    """
    digest = hashlib.sha256("\n".join(sorted(custom_ids)).encode()).hexdigest()[:32]
    return {"pipeline_job": job, "pipeline_rows": digest}


async def find_orphans(
    adapter: BatchAdapter, session: aiohttp.ClientSession, known: set[str], tag: str
) -> dict[str, str]:
    """Batches tagged ``tag`` that no journal recorded (accepted before a crash): rows digest -> batch id.

    A listing that fails (a provider without the route) finds none.
    """
    try:
        found = await adapter.list_batches(session)
    except BatchApiError:
        return {}
    orphans: dict[str, str] = {}
    for batch in reversed(found):  # newest last: it wins
        if batch.id not in known and batch.metadata.get("pipeline_job") == tag:
            orphans[batch.metadata.get("pipeline_rows", "")] = batch.id
    return orphans


def status_of(raw: str, words: dict[str, BatchStatus]) -> BatchStatus:
    """A provider's status word, normalised; a word nobody documented is UNKNOWN, not pending."""
    return words.get(raw, BatchStatus.UNKNOWN)


def epoch(value: Any) -> float | None:
    """A timestamp field (epoch seconds) when it is one."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def listed(data: Any) -> list[ListedBatch]:
    """The batches of a listing (``{"data": [batch objects]}``) that carry metadata."""
    items = data.get("data") if isinstance(data, dict) else None
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        meta = item.get("metadata")
        if isinstance(meta, dict):
            clean = {str(k): str(v) for k, v in meta.items()}
            out.append(ListedBatch(item["id"], str(item.get("status")), clean))
    return out


class BatchApiError(Exception):
    """A batch route answered with an error or could not be reached; ``reply`` classifies it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.error or "batch API error")
        self.reply = reply


class BatchAdapter(Protocol):
    """One provider's batch API."""

    name: str
    max_requests: int  # per batch
    max_bytes: int  # per batch: the submitted body or uploaded file

    def request_size(self, request: BatchRequest) -> int:
        """Bytes the request adds to the batch as submitted (to stay under ``max_bytes``)."""
        ...

    async def submit(
        self, session: aiohttp.ClientSession, requests: list[BatchRequest], metadata: dict[str, str]
    ) -> str:
        """Submit one batch with ``metadata``; return its id once the provider has accepted it."""
        ...

    async def list_batches(self, session: aiohttp.ClientSession) -> list[ListedBatch]:
        """The provider's most recent batches (those with metadata), newest first."""
        ...

    async def poll(self, session: aiohttp.ClientSession, batch_id: str) -> BatchState: ...

    def results(
        self, session: aiohttp.ClientSession, state: BatchState, cursor: str | None
    ) -> AsyncIterator[ResultsPage]:
        """Pages of results of a terminal batch, from ``cursor`` (None: the beginning)."""
        ...


# Of several results for one custom_id, the best: an answer, then a final error, then the rest.
_RANK = {ReplyKind.OK: 0, ReplyKind.FATAL: 1, ReplyKind.AUTH: 2, ReplyKind.RETRY: 3}


def best_results(results: list[BatchResult]) -> list[tuple[BatchResult, float]]:
    """One result per custom_id, the best of its copies (an answer over a malformed twin), in page order.

    Each comes with what all its copies billed: a duplicate that was charged is still paid.
    """
    best: dict[str, BatchResult] = {}
    billed: dict[str, float] = {}
    for result in results:
        cid = result.custom_id
        billed[cid] = billed.get(cid, 0.0) + (result.reply.cost or 0.0)
        held = best.get(cid)
        if held is None or _RANK[result.reply.kind] < _RANK[held.reply.kind]:
            best[cid] = result
    return [(result, billed[cid]) for cid, result in best.items()]


def custom_id_for(key: str) -> str:
    """The row key when it is a plain short id, else a digest of it (providers limit custom_id)."""
    if _SAFE_ID.fullmatch(key):
        return key
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:40]


# Error codes and types (OpenAI's words, which Mistral and OpenRouter reuse) that say the
# request itself is wrong: answering it again would fail again, and may be billed again.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_request_error",
        "invalid_request",
        "bad_request",
        "invalid_prompt",
        "invalid_model",
        "model_not_found",
        "not_found_error",
        "context_length_exceeded",
        "string_above_max_length",
        "invalid_json",
        "unsupported_parameter",
        "unsupported_value",
        "content_policy_violation",
        "content_filter",
    }
)


def result_reply(response: Any, error: Any) -> Reply:
    """A batch result line (``response: {status_code, body}``, ``error``) as a realtime Reply."""
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        body = response.get("body")
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return parse_response(response["status_code"], raw, {})
    if isinstance(error, dict):
        code = error.get("code")
        kind = error.get("type")
        message = str(error.get("message") or kind or code or "no details")
        if isinstance(code, int) and not isinstance(code, bool):
            return Reply(classify_status(code, message), code, f"HTTP {code}: {message}")
        words = {str(w).lower() for w in (code, kind) if isinstance(w, str) and w}
        label = "".join(f"{w}: " for w in (code, kind) if isinstance(w, str) and w)
        if words & PERMANENT_ERRORS:
            return Reply(ReplyKind.FATAL, None, f"batch error: {label}{message}")
        # Expired, cancelled or failed requests were never answered: another batch may answer them.
        return Reply(ReplyKind.RETRY, None, f"batch error: {label}{message}")
    return Reply(ReplyKind.RETRY, None, "batch result without a response or an error")


async def request_json(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    """One call to a batch route; a parsed JSON body, or a :class:`BatchApiError`."""
    raw = await request_bytes(session, method, url, **kwargs)
    try:
        return json.loads(raw)
    except ValueError:
        raise BatchApiError(Reply(ReplyKind.RETRY, None, f"{method} {url}: the answer is not JSON")) from None


async def get_batch(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """``GET`` one batch object; anything but a JSON object is a transient :class:`BatchApiError`."""
    data = await request_json(session, "GET", url)
    if not isinstance(data, dict):
        raise BatchApiError(Reply(ReplyKind.RETRY, None, f"GET {url}: not a batch object"))
    return data


async def request_bytes(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> bytes:
    """One call to a batch route; the raw body of a 2xx answer, or a :class:`BatchApiError`."""
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    redactor = Redactor.for_headers(session.headers)
    try:
        async with session.request(method, url, **kwargs) as resp:
            raw = redactor.response(await resp.read())
            if 200 <= resp.status < 300:
                return raw
            reply = parse_response(resp.status, raw, resp.headers)
    except TimeoutError:
        reply = Reply(ReplyKind.RETRY, None, f"{method} {url}: timeout")
    except aiohttp.ClientError as exc:
        reply = Reply(ReplyKind.RETRY, None, f"{method} {url}: connection error: {type(exc).__name__}: {exc}")
    reply.error = redactor.message(reply.error)
    raise BatchApiError(reply)


def parse_jsonl_results(raw: bytes) -> list[BatchResult]:
    """Result lines of a downloaded output or error file (Mistral, OpenAI)."""
    results = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn line answers nothing: its row is resubmitted
        if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
            results.append(BatchResult(item["custom_id"], result_reply(item.get("response"), item.get("error"))))
    return results


def body_without_model(body: bytes) -> dict[str, Any]:
    """A chat body for a provider that names the model once per batch (Mistral)."""
    data: dict[str, Any] = json.loads(body)
    data.pop("model", None)
    return data


def count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def batch_id_from(data: Any, what: str) -> str:
    """The id of a created batch or uploaded file."""
    if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
        return str(data["id"])
    # Accepted but untraceable: never resubmit blindly (the engine stops on a non-4xx fatal reply).
    raise BatchApiError(Reply(ReplyKind.FATAL, 200, f"{what}: the answer names no id"))


async def upload_jsonl(session: aiohttp.ClientSession, files_url: str, lines: list[bytes]) -> str:
    """``POST {files_url}`` a JSONL file with ``purpose=batch``; its file id."""
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"\n".join(lines) + b"\n", filename="batch.jsonl", content_type="application/jsonl")
    return batch_id_from(await request_json(session, "POST", files_url, data=form), f"POST {files_url}")


async def download_results(
    session: aiohttp.ClientSession, files_url: str, state: BatchState, cursor: str | None
) -> AsyncIterator[ResultsPage]:
    """One page per output or error file, resuming after the last file read (``cursor``: its id)."""
    files = list(state.files)
    start = files.index(cursor) + 1 if cursor in files else 0
    for file_id in files[start:]:
        raw = await request_bytes(session, "GET", f"{files_url}/{file_id}/content")
        yield ResultsPage(parse_jsonl_results(raw), file_id)
