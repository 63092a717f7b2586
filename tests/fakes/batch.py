"""A fake provider batch API (OpenRouter, Mistral or OpenAI flavour) for tests.

A real aiohttp server on loopback, like ``tests/fakes/server.py``: the pipeline
talks to it over HTTP exactly as it would to the provider. It is strict where
the providers are (``/work/shared/PROVIDERS.md``):

- OpenRouter: ``POST /api/v1/batches`` with inline ``requests``; a body whose
  ``requests`` comes before ``endpoint`` or ``model`` in the raw JSON is a 400
  (OpenRouter stream-parses it), as are more than ``max_requests`` (5,000)
  requests, a request whose body names another model, and duplicate
  ``custom_id``s. Submit answers 202 ``validating``. Terminal batch objects
  carry ``results`` (optionally only the first ``inline_limit``), and
  ``GET /batches/{id}/results?cursor=`` pages them (``page_size``).
- Mistral: ``POST /v1/files`` (multipart, ``purpose=batch``), ``POST
  /v1/batch/jobs``, ``GET /v1/batch/jobs/{id}``, ``GET /v1/files/{id}/content``.
- OpenAI: ``POST /v1/files``, ``POST /v1/batches``, ``GET /v1/batches/{id}``,
  output and error files; an expired batch's unanswered lines are in the error
  file with ``batch_expired``.

Answers are those of the chat fake (:func:`tests.fakes.server.expected_reply`),
so a test can check that every row got its own completion. Results come back
shuffled, so matching by position would fail. A batch ends
``complete_after_s`` after it was submitted (evaluated when polled); ``expire``
makes the n-th batch submitted expire with only a fraction of it answered, and
``fail`` makes it fail outright. The server's ``bill`` is what it charged
(answered requests only); ``submitted_by_content`` counts submissions per user
message, and any ``chat_requests`` means a realtime request was sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.server import (
    DEFAULT_PRICE_PER_TOKEN,
    count_prompt_tokens,
    error_body,
    expected_reply,
    fit_completion,
    last_user_content,
)

JSON = dict[str, Any]
CHAT = "/v1/chat/completions"
LIMITS = {"openrouter": 5_000, "mistral": 100_000, "openai": 50_000}


_ECHO_FORMS: dict[str, Any] = {
    "unicode": lambda key: "".join(f"\\u{ord(c):04x}" for c in key),
    "lower_hex": lambda key: "".join(f"%{ord(c):02x}" for c in key),
}
# Script behaviours: usage objects that carry less than the tokens billed.
_PARTIAL_USAGE: dict[str, Any] = {
    "usage_nulls": lambda u: {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    "usage_total_only": lambda u: {"total_tokens": u.get("total_tokens")},
    "usage_empty": lambda u: {},
    "usage_prompt_only": lambda u: {"prompt_tokens": u.get("prompt_tokens")},
    "usage_zeros": lambda u: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
}


def _ok(result: JSON) -> bool:
    return bool((result.get("response") or {}).get("status_code") == 200)


@dataclass
class BatchConfig:
    flavour: str = "openrouter"  # openrouter | mistral | openai
    complete_after_s: float = 0.2
    # {n: fraction}: the n-th batch submitted (0-based) expires with only this fraction answered.
    expire: dict[int, float] = field(default_factory=dict)
    # {n: message}: the n-th batch submitted fails (validation) with no results.
    fail: dict[int, str] = field(default_factory=dict)
    # {substring of the user message: [status, ...]}: its n-th submission is answered with the n-th
    # status: an HTTP status (int), or a misbehaviour (str): "echo_auth" (a 400 response whose
    # error quotes the submit's Authorization header), "echo_auth_error" (no response, an error
    # object quoting it), "invalid_request_error" (no response, an error whose code is that word,
    # as OpenAI's error files write it), "invalid_request_type" (a 400 body whose error has a
    # type but a null code), "dup_malformed" (a malformed copy of the result first, then the good
    # one), "no_usage" (a billed answer without usage).
    script: dict[str, list[int | str]] = field(default_factory=dict)
    inline_results: bool = True  # OpenRouter: terminal batch objects carry results
    inline_limit: int | None = None  # ... only the first N of them (the rest only in pages)
    page_size: int = 1000
    max_requests: int | None = None  # default: the flavour's limit
    price_per_token: float = DEFAULT_PRICE_PER_TOKEN
    discount: float = 0.5
    seed: int = 0
    api_key: str | None = None
    respond_after_s: float = 0.0  # accept (store) a batch, then wait this long before answering
    include_usage: bool = True  # False: answers carry no usage at all (still billed)
    # Submissions answered 400 with an error quoting the request's Authorization header.
    reject_submit_echo: bool = False
    # {n: word}: once running, the n-th batch reports this status word (one the API never documented).
    status_word: dict[int, str] = field(default_factory=dict)
    # Batch objects carry expires_at this many seconds after submission; with expire_stuck the
    # batch stays in_progress past it (a provider that never ends it).
    expires_after_s: float = 86_400.0
    expire_stuck: bool = False
    # {n: message}: the n-th batch fails with this message, which also quotes the Authorization header.
    fail_echo: dict[int, str] = field(default_factory=dict)
    # How an echoed key is written in every answer: "raw", "unicode" (each character a JSON
    # \\uXXXX escape), "lower_hex" (URL-encoded with lower-case hex, every character).
    echo_form: str = "raw"


@dataclass
class FakeBatch:
    id: str
    ordinal: int
    created: float
    model: str
    requests: list[tuple[str, JSON]]  # (custom_id, chat body)
    status: str = "validating"  # validating | in_progress | completed | expired | failed
    error: str | None = None
    results: list[JSON] = field(default_factory=list)  # OpenRouter result objects, shuffled
    answered: set[str] = field(default_factory=set)
    files: dict[str, str] = field(default_factory=dict)  # "output" / "error" -> file id
    metadata: JSON | None = None  # what the submission sent as metadata
    wall_created: float = 0.0
    authorization: str = ""  # the submit's Authorization header (for echo misbehaviours)


class FakeBatchServer:
    def __init__(self, config: BatchConfig | None = None, **overrides: Any) -> None:
        self.config = config or BatchConfig()
        for name, value in overrides.items():
            setattr(self.config, name, value)
        self.lock = threading.Lock()
        self.batches: dict[str, FakeBatch] = {}
        self.files: dict[str, bytes] = {}
        self.submitted_by_content: dict[str, int] = {}
        self.submissions: list[tuple[str, int]] = []  # (batch id, requests)
        self.rejected: list[str] = []  # messages of 400s to submissions
        self.chat_requests = 0
        self.polls = 0
        self.result_pages = 0
        self.listings = 0  # GET /batches (or /batch/jobs) listings answered
        self.bill = 0.0
        self.port: int | None = None
        self.base_url = ""
        self._ids = 0

    # -- helpers -------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self.config.max_requests or LIMITS[self.config.flavour]

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:06d}"

    def _authorised(self, request: web.Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def duplicates(self) -> int:
        """Requests submitted more than once (by user message)."""
        with self.lock:
            return sum(n - 1 for n in self.submitted_by_content.values() if n > 1)

    def _check_requests(self, requests: list[tuple[str, JSON]], model: str | None) -> str | None:
        if not requests:
            return "requests must not be empty"
        if len(requests) > self.limit:
            return f"at most {self.limit} requests per batch ({len(requests)} given)"
        seen: set[str] = set()
        for custom_id, body in requests:
            if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
                return f"custom_id must be unique non-empty strings ({custom_id!r})"
            seen.add(custom_id)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
                return f"request {custom_id}: body.messages must be a non-empty list"
            if model is not None and body.get("model") not in (None, model):
                return f"request {custom_id}: body.model {body.get('model')!r} differs from the batch model {model!r}"
        return None

    def _create(
        self, requests: list[tuple[str, JSON]], model: str, request: web.Request | None = None, metadata: Any = None
    ) -> FakeBatch:
        with self.lock:
            ordinal = len(self.submissions)
            batch = FakeBatch(self._next_id("batch_"), ordinal, time.monotonic(), model, requests)
            batch.metadata = metadata if isinstance(metadata, dict) else None
            batch.authorization = request.headers.get("Authorization", "") if request is not None else ""
            batch.wall_created = time.time()
            self.batches[batch.id] = batch
            self.submissions.append((batch.id, len(requests)))
            for _, body in requests:
                u = last_user_content(body["messages"])
                self.submitted_by_content[u] = self.submitted_by_content.get(u, 0) + 1
        return batch

    def _advance(self, batch: FakeBatch) -> None:
        """Move a batch on with time; a batch ends complete_after_s after submission."""
        if batch.status in ("completed", "expired", "failed"):
            return
        cfg = self.config
        if batch.ordinal in cfg.status_word:
            batch.status = cfg.status_word[batch.ordinal]
            return
        if cfg.expire_stuck or time.monotonic() - batch.created < cfg.complete_after_s:
            batch.status = "in_progress"
            return
        if batch.ordinal in cfg.fail_echo:
            batch.status = "failed"
            batch.error = f"{cfg.fail_echo[batch.ordinal]} (request had Authorization: {batch.authorization})"
            return
        if batch.ordinal in cfg.fail:
            batch.status, batch.error = "failed", cfg.fail[batch.ordinal]
            return
        fraction = cfg.expire.get(batch.ordinal)
        answered = batch.requests if fraction is None else batch.requests[: int(len(batch.requests) * fraction)]
        results = [r for custom_id, body in answered for r in self._answers(batch, custom_id, body)]
        random.Random(cfg.seed + batch.ordinal).shuffle(results)
        # A malformed copy goes before its good twin, wherever the shuffle put them.
        firsts = [r for r in results if r.get("_first")]
        results = firsts + [r for r in results if not r.get("_first")]
        for r in firsts:
            del r["_first"]
        batch.results = results
        batch.answered = {r["custom_id"] for r in results}
        batch.status = "completed" if fraction is None else "expired"
        if cfg.flavour != "openrouter":
            self._write_files(batch)

    def _answers(self, batch: FakeBatch, custom_id: str, body: JSON) -> list[JSON]:
        """The result lines for one request (more than one for a duplicated custom_id)."""
        u = last_user_content(body["messages"])
        status: int | str = 200
        for key, statuses in self.config.script.items():
            if key in u:
                n = self._script_count(key)
                status = statuses[n] if n < len(statuses) else 200
        if isinstance(status, int):
            return [self._answer(custom_id, body, batch.model, status)]
        echoed = batch.authorization
        if status == "echo_auth":
            message = f"Invalid request. Headers received: Authorization: {echoed}; key={echoed.split()[-1]}"
            return [{"id": f"req-{custom_id}", "custom_id": custom_id,
                     "response": {"status_code": 400, "body": error_body(400, message)}, "error": None}]  # fmt: skip
        if status == "echo_auth_error":
            error = {"code": "invalid_request_error", "message": f"bad request; got Authorization: {echoed}"}
            return [{"id": f"req-{custom_id}", "custom_id": custom_id, "response": None, "error": error}]
        if status == "invalid_request_error":
            error = {"code": "invalid_request_error", "message": "messages: this model does not accept this input"}
            return [{"id": f"req-{custom_id}", "custom_id": custom_id, "response": None, "error": error}]
        if status == "invalid_request_type":
            body400 = {"error": {"message": "bad input", "type": "invalid_request_error", "param": None, "code": None}}
            return [{"id": f"req-{custom_id}", "custom_id": custom_id,
                     "response": {"status_code": 400, "body": body400}, "error": None}]  # fmt: skip
        if status == "dup_malformed":
            bad = {"id": f"req-{custom_id}", "custom_id": custom_id, "response": {"status_code": 200, "body": "{oops"},
                   "error": None, "_first": True}  # fmt: skip
            return [bad, self._answer(custom_id, body, batch.model, 200)]
        if status == "no_usage":
            good = self._answer(custom_id, body, batch.model, 200)
            del good["response"]["body"]["usage"]
            return [good]
        if status in _PARTIAL_USAGE:  # a billed answer whose usage says less than it should
            good = self._answer(custom_id, body, batch.model, 200)
            usage = good["response"]["body"].get("usage") or {}
            good["response"]["body"]["usage"] = _PARTIAL_USAGE[status](usage)
            return [good]
        if status == "no_endpoints":  # the model lost its endpoints while the batch ran (not billed)
            message = f"No endpoints found for {batch.model}."
            return [{"id": f"req-{custom_id}", "custom_id": custom_id,
                     "response": {"status_code": 404, "body": error_body(404, message)}, "error": None}]  # fmt: skip
        raise ValueError(f"fakebatch: unknown script behaviour {status!r}")

    def _answer(self, custom_id: str, body: JSON, model: str, status: int = 200) -> JSON:
        cfg = self.config
        u = last_user_content(body["messages"])
        if status != 200:
            return {"id": f"req-{custom_id}", "custom_id": custom_id, "response": {"status_code": status,
                    "body": error_body(status)}, "error": None}  # fmt: skip
        prompt = count_prompt_tokens(body["messages"], "words")
        content, completion, truncated = fit_completion(expected_reply(u), body.get("max_tokens"), "words")
        cost = (prompt + completion) * cfg.price_per_token * cfg.discount
        self.bill += cost
        usage: JSON = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if cfg.flavour == "openrouter":
            usage["cost"] = cost
        chat = {
            "id": f"gen-{custom_id}",
            "object": "chat.completion",
            "model": model,
            "provider": "FakeBatchProvider",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "length" if truncated else "stop",
                }
            ],
        }
        if cfg.include_usage:
            chat["usage"] = usage
        return {"id": f"req-{custom_id}", "custom_id": custom_id, "response": {"status_code": 200, "body": chat},
                "error": None}  # fmt: skip

    def _script_count(self, key: str) -> int:
        counts = self.__dict__.setdefault("_script_counts", {})
        n: int = counts.get(key, 0)
        counts[key] = n + 1
        return n

    def _write_files(self, batch: FakeBatch) -> None:
        ok = [r for r in batch.results if _ok(r)]
        bad = [r for r in batch.results if not _ok(r)]
        if self.config.flavour == "openai" and batch.status == "expired":
            bad += [
                {"id": f"req-{cid}", "custom_id": cid, "response": None,
                 "error": {"code": "batch_expired", "message": "not executed before the window expired"}}
                for cid, _ in batch.requests if cid not in batch.answered
            ]  # fmt: skip
        for kind, lines in (("output", ok), ("error", bad)):
            if lines:
                file_id = self._next_id("file-")
                self.files[file_id] = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                batch.files[kind] = file_id

    # -- OpenRouter ----------------------------------------------------------------------

    async def _or_submit(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            data = json.loads(raw)
        except ValueError:
            return self._reject("invalid JSON")
        if not isinstance(data, dict):
            return self._reject("body must be an object")
        order = list(data)
        if "requests" not in order or "endpoint" not in order or "model" not in order:
            return self._reject("endpoint, model and requests are required")
        if order.index("requests") < max(order.index("endpoint"), order.index("model")):
            return self._reject("endpoint and model must come before requests")
        if self.config.reject_submit_echo:
            return self._reject_echo(request)
        if data["endpoint"] != CHAT:
            return self._reject(f"unsupported endpoint {data['endpoint']!r}")
        if data.get("completion_window", "24h") != "24h":
            return self._reject("completion_window must be 24h")
        items = data["requests"]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return self._reject("requests must be a list of objects")
        requests = [(i.get("custom_id"), i.get("body")) for i in items]
        problem = self._check_requests(requests, data["model"])  # type: ignore[arg-type]
        if problem:
            return self._reject(problem)
        batch = self._create(requests, data["model"], request, data.get("metadata"))  # type: ignore[arg-type]
        if self.config.respond_after_s:
            await asyncio.sleep(self.config.respond_after_s)
        return web.json_response(self._or_object(batch), status=202)

    def _reject_echo(self, request: web.Request) -> web.Response:
        echoed = request.headers.get("Authorization", "")
        return self._reject(f"Invalid batch. Headers received: Authorization: {echoed}; key={echoed.split()[-1]}")

    def _common(self, batch: FakeBatch) -> JSON:
        """Fields every flavour's batch object carries here: metadata, creation and expiry times."""
        return {
            "metadata": batch.metadata,
            "created_at": int(batch.wall_created),
            "expires_at": int(batch.wall_created + self.config.expires_after_s),
        }

    async def _list(self, request: web.Request) -> web.Response:
        """``GET /batches`` (OpenAI, OpenRouter) or ``GET /batch/jobs`` (Mistral): newest first."""
        with self.lock:
            self.listings += 1
            batches = sorted(self.batches.values(), key=lambda b: b.ordinal, reverse=True)
            after = request.query.get("after")
            if after:
                ids = [b.id for b in batches]
                batches = batches[ids.index(after) + 1 :] if after in ids else []
            limit = int(request.query.get("limit", "20"))
            page, more = batches[:limit], len(batches) > limit
            if self.config.flavour == "mistral":
                data = [self._mistral_object(b) for b in page]
                return web.json_response({"object": "list", "data": data, "total": len(batches)})
            make = self._openai_object if self.config.flavour == "openai" else self._or_object
            data = [make(b) for b in page]
            last = page[-1].id if page else None
            return web.json_response({"object": "list", "data": data, "has_more": more, "last_id": last})

    def _reject(self, message: str) -> web.Response:
        with self.lock:
            self.rejected.append(message)
        return web.json_response(error_body(400, message), status=400)

    def _or_object(self, batch: FakeBatch, with_results: bool = False) -> JSON:
        answered = len(batch.answered)
        failed = sum(1 for r in batch.results if not _ok(r))
        obj: JSON = {
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT,
            "model": batch.model,
            "completion_window": "24h",
            "status": batch.status,
            "request_counts": {"total": len(batch.requests), "completed": answered - failed, "failed": failed},
            "error": {"message": batch.error} if batch.error else None,
            "results": None,
            **self._common(batch),
        }
        if with_results and self.config.inline_results:
            limit = self.config.inline_limit
            obj["results"] = batch.results if limit is None else batch.results[:limit]
        return obj

    async def _or_get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response(error_body(404, "batch not found"), status=404)
        with self.lock:
            self.polls += 1
            self._advance(batch)
            terminal = batch.status in ("completed", "expired", "failed")
            return web.json_response(self._or_object(batch, with_results=terminal))

    async def _or_results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response(error_body(404, "batch not found"), status=404)
        if batch.status not in ("completed", "expired", "failed"):
            return web.json_response(error_body(409, "batch not finished"), status=409)
        cursor = request.query.get("cursor")
        start = int(base64.urlsafe_b64decode(cursor).decode()) if cursor else 0
        limit = min(int(request.query.get("limit", "1000")), self.config.page_size)
        page = batch.results[start : start + limit]
        end = start + len(page)
        more = end < len(batch.results)
        with self.lock:
            self.result_pages += 1
        next_cursor = base64.urlsafe_b64encode(str(end).encode()).decode() if more else None
        return web.json_response({"object": "list", "data": page, "has_more": more, "next_cursor": next_cursor})

    # -- files (Mistral, OpenAI) ---------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None or not hasattr(upload, "file"):
            return self._reject("multipart upload with purpose=batch and a file is required")
        file_id = self._next_id("file-")
        self.files[file_id] = data = upload.file.read()
        return web.json_response({"id": file_id, "object": "file", "purpose": "batch", "bytes": len(data)})

    async def _content(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["id"])
        if data is None:
            return web.json_response(error_body(404, "file not found"), status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _lines(self, file_id: str) -> list[JSON] | None:
        raw = self.files.get(file_id)
        if raw is None:
            return None
        return [json.loads(line) for line in raw.splitlines() if line.strip()]

    # -- Mistral -------------------------------------------------------------------------

    async def _mistral_create(self, request: web.Request) -> web.Response:
        data = await request.json()
        files = data.get("input_files") or []
        lines = self._lines(files[0]) if len(files) == 1 else None
        if lines is None or data.get("endpoint") != CHAT or not data.get("model"):
            return self._reject("input_files (one uploaded file), model and endpoint are required")
        if self.config.reject_submit_echo:
            return self._reject_echo(request)
        requests = [(line.get("custom_id"), line.get("body")) for line in lines]
        problem = self._check_requests(requests, data["model"])
        if problem:
            return self._reject(problem)
        batch = self._create(requests, data["model"], request, data.get("metadata"))
        if self.config.respond_after_s:
            await asyncio.sleep(self.config.respond_after_s)
        return web.json_response(self._mistral_object(batch))

    def _mistral_object(self, batch: FakeBatch) -> JSON:
        status = {"validating": "QUEUED", "in_progress": "RUNNING", "completed": "SUCCESS",
                  "expired": "TIMEOUT_EXCEEDED", "failed": "FAILED"}.get(batch.status, batch.status)  # fmt: skip
        ok = sum(1 for r in batch.results if _ok(r))
        return {
            "id": batch.id,
            "object": "batch",
            "model": batch.model,
            "endpoint": CHAT,
            "status": status,
            "total_requests": len(batch.requests),
            "succeeded_requests": ok,
            "failed_requests": len(batch.results) - ok,
            "output_file": batch.files.get("output"),
            "error_file": batch.files.get("error"),
            "errors": [{"message": batch.error}] if batch.error else [],
            **self._common(batch),
        }

    async def _mistral_get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response(error_body(404, "job not found"), status=404)
        with self.lock:
            self.polls += 1
            self._advance(batch)
            return web.json_response(self._mistral_object(batch))

    # -- OpenAI --------------------------------------------------------------------------

    async def _openai_create(self, request: web.Request) -> web.Response:
        data = await request.json()
        lines = self._lines(str(data.get("input_file_id")))
        if lines is None or data.get("endpoint") != CHAT or data.get("completion_window") != "24h":
            return self._reject("input_file_id, endpoint and completion_window 24h are required")
        if any(line.get("method") != "POST" or line.get("url") != CHAT for line in lines):
            return self._reject("every line needs method POST and url /v1/chat/completions")
        requests = [(line.get("custom_id"), line.get("body")) for line in lines]
        models = {body.get("model") for _, body in requests if isinstance(body, dict)}
        problem = self._check_requests(requests, None) or (None if len(models) == 1 else "one model per batch")
        if problem:
            return self._reject(problem)
        if self.config.reject_submit_echo:
            return self._reject_echo(request)
        batch = self._create(requests, str(models.pop()), request, data.get("metadata"))
        if self.config.respond_after_s:
            await asyncio.sleep(self.config.respond_after_s)
        return web.json_response(self._openai_object(batch))

    def _openai_object(self, batch: FakeBatch) -> JSON:
        ok = sum(1 for r in batch.results if _ok(r))
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT,
            "status": batch.status,
            "request_counts": {"total": len(batch.requests), "completed": ok, "failed": len(batch.results) - ok},
            "output_file_id": batch.files.get("output"),
            "error_file_id": batch.files.get("error"),
            "errors": {"data": [{"message": batch.error}]} if batch.error else None,
            **self._common(batch),
        }

    async def _openai_get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response(error_body(404, "batch not found"), status=404)
        with self.lock:
            self.polls += 1
            self._advance(batch)
            return web.json_response(self._openai_object(batch))

    # -- running -------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.Response:
        with self.lock:
            self.chat_requests += 1
        return web.json_response(error_body(500, "batch fake: no realtime requests"), status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response(error_body(401), status=401)
        response: web.StreamResponse = await handler(request)
        form = self.config.echo_form
        if form != "raw" and isinstance(response, web.Response) and isinstance(response.body, bytes):
            key = request.headers.get("Authorization", "").partition(" ")[2]
            if key:
                response.body = response.body.replace(key.encode(), _ECHO_FORMS[form](key).encode())
        return response

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024**2, middlewares=[self._auth])
        for prefix in ("/v1", "/api/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_post(f"{prefix}/files", self._upload)
            app.router.add_get(f"{prefix}/files/{{id}}/content", self._content)
            app.router.add_post(f"{prefix}/batch/jobs", self._mistral_create)
            app.router.add_get(f"{prefix}/batch/jobs", self._list)
            app.router.add_get(f"{prefix}/batch/jobs/{{id}}", self._mistral_get)
            if self.config.flavour == "openai":
                app.router.add_post(f"{prefix}/batches", self._openai_create)
                app.router.add_get(f"{prefix}/batches", self._list)
                app.router.add_get(f"{prefix}/batches/{{id}}", self._openai_get)
            else:
                app.router.add_post(f"{prefix}/batches", self._or_submit)
                app.router.add_get(f"{prefix}/batches", self._list)
                app.router.add_get(f"{prefix}/batches/{{id}}", self._or_get)
                app.router.add_get(f"{prefix}/batches/{{id}}/results", self._or_results)
        return app

    async def start(self, host: str = "127.0.0.1") -> web.AppRunner:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self.port = sock.getsockname()[1]
        prefix = "/api/v1" if self.config.flavour == "openrouter" else "/v1"
        self.base_url = f"http://{host}:{self.port}{prefix}"
        return runner

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeBatchServer]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fakebatch", daemon=True)
        thread.start()
        try:
            runner = asyncio.run_coroutine_threadsafe(self.start(), loop).result(30)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
