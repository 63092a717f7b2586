"""OpenRouter's Batch API: inline JSON requests, results on the batch object and in pages.

- Submit: ``POST {batch_url}`` with ``{"endpoint", "model", "completion_window",
  "requests": [{"custom_id", "body"}]}``. OpenRouter stream-parses the body, so
  ``endpoint`` and ``model`` must come before ``requests`` in the serialised
  JSON (it answers 400 otherwise): the body is assembled in that order, byte by
  byte. At most 5,000 requests and 200 MB per batch; one model per batch. The
  answer is 202 with ``status: "validating"``: stored, not done.
- Poll: ``GET {batch_url}/{id}``: ``status``, ``request_counts``, ``error.message``;
  a batch in a terminal status carries ``results``.
- Results: ``GET {batch_url}/{id}/results?cursor=`` pages (``data``,
  ``next_cursor``), used when the batch object does not carry every result.
  Results are matched to rows by ``custom_id``, never by position.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pipeline.providers.batches import (
    CHAT_ENDPOINT,
    COMPLETION_WINDOW,
    OPENAI_STATUSES,
    BatchRequest,
    BatchResult,
    BatchState,
    ListedBatch,
    ResultsPage,
    batch_id_from,
    count,
    epoch,
    get_batch,
    listed,
    request_json,
    result_reply,
    status_of,
)

if TYPE_CHECKING:
    import aiohttp

MAX_REQUESTS = 5_000
MAX_BYTES = 200 * 1000 * 1000
PAGE_LIMIT = 1000  # results per page: the most the API returns
LIST_LIMIT = 100  # batches per listing: the most recent are the ones a crash may have left

_JSON = {"Content-Type": "application/json"}


class OpenRouterBatches:
    name = "openrouter"
    max_requests = MAX_REQUESTS
    max_bytes = MAX_BYTES

    def __init__(self, batch_url: str, model: str) -> None:
        self.url = batch_url
        self.model = model
        self._head = (
            b'{"endpoint": '
            + json.dumps(CHAT_ENDPOINT).encode()
            + b', "model": '
            + json.dumps(model).encode()
            + b', "completion_window": '
            + json.dumps(COMPLETION_WINDOW).encode()
            + b', "requests": ['
        )

    def request_size(self, request: BatchRequest) -> int:
        return len(request.body) + len(request.custom_id) + 32

    def submission(self, requests: list[BatchRequest], metadata: dict[str, str] | None = None) -> bytes:
        """The submit body, ``endpoint``, ``model`` (and ``metadata``) first (the API stream-parses it)."""
        items = [b'{"custom_id": ' + json.dumps(r.custom_id).encode() + b', "body": ' + r.body + b"}" for r in requests]
        head = self._head
        if metadata:
            meta = b', "metadata": ' + json.dumps(metadata).encode()
            head = head.replace(b', "requests": [', meta + b', "requests": [')
        return head + b", ".join(items) + b"]}"

    async def submit(
        self, session: aiohttp.ClientSession, requests: list[BatchRequest], metadata: dict[str, str] | None = None
    ) -> str:
        body = self.submission(requests, metadata)
        data = await request_json(session, "POST", self.url, data=body, headers=_JSON)
        return batch_id_from(data, f"POST {self.url}")

    async def list_batches(self, session: aiohttp.ClientSession) -> list[ListedBatch]:
        return listed(await request_json(session, "GET", self.url, params={"limit": str(LIST_LIMIT)}))

    async def poll(self, session: aiohttp.ClientSession, batch_id: str) -> BatchState:
        data = await get_batch(session, f"{self.url}/{batch_id}")
        raw_status = str(data.get("status"))
        counts = data.get("request_counts") or {}
        error = data.get("error")
        results = data.get("results")
        return BatchState(
            id=batch_id,
            status=status_of(raw_status, OPENAI_STATUSES),
            expires_at=epoch(data.get("expires_at")),
            provider_status=raw_status,
            total=count(counts.get("total")),
            completed=count(counts.get("completed")),
            failed=count(counts.get("failed")),
            error=str(error.get("message")) if isinstance(error, dict) and error.get("message") else None,
            inline=tuple(_results(results)) if isinstance(results, list) else None,
        )

    async def results(
        self, session: aiohttp.ClientSession, state: BatchState, cursor: str | None
    ) -> AsyncIterator[ResultsPage]:
        if cursor is None and state.inline is not None:
            yield ResultsPage(list(state.inline), None)
            answered = (state.completed or 0) + (state.failed or 0)
            if len(state.inline) >= answered:
                return  # the batch object carried every result
        while True:
            params = {"limit": str(PAGE_LIMIT)}
            if cursor:
                params["cursor"] = cursor
            page = await request_json(session, "GET", f"{self.url}/{state.id}/results", params=params)
            data = page.get("data") if isinstance(page, dict) else None
            cursor = page.get("next_cursor") if isinstance(page, dict) else None
            more = bool(cursor) and (not isinstance(page, dict) or page.get("has_more", True) is not False)
            yield ResultsPage(_results(data if isinstance(data, list) else []), cursor if more else None)
            if not more:
                return


def _results(items: list[Any]) -> list[BatchResult]:
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
            out.append(BatchResult(item["custom_id"], result_reply(item.get("response"), item.get("error"))))
    return out
