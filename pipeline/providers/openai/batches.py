"""OpenAI's Batch API: a JSONL file uploaded, a batch created on it, output and error files downloaded.

- Submit: upload the requests as JSONL (``POST {base_url}/files``, multipart,
  ``purpose=batch``; lines ``{"custom_id", "method": "POST", "url":
  "/v1/chat/completions", "body"}``), then ``POST {batch_url}`` (default
  ``{base_url}/batches``) with ``{"input_file_id", "endpoint",
  "completion_window": "24h"}``. At most 50,000 requests and 200 MB per file.
- Poll: ``GET {batch_url}/{id}``: ``status``, ``request_counts``,
  ``output_file_id``, ``error_file_id``.
- Results: ``GET {base_url}/files/{id}/content`` of both files; lines ``{"id",
  "custom_id", "response": {"status_code", "body"}, "error"}``. An expired batch
  still holds its finished lines: they are kept, and only the rest is
  resubmitted.
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
    BatchState,
    ListedBatch,
    ResultsPage,
    batch_id_from,
    count,
    download_results,
    epoch,
    get_batch,
    listed,
    request_json,
    status_of,
    upload_jsonl,
)

if TYPE_CHECKING:
    import aiohttp

MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1000 * 1000
LIST_LIMIT = 100  # batches per listing: the most recent are the ones a crash may have left


class OpenAIBatches:
    name = "openai"
    max_requests = MAX_REQUESTS
    max_bytes = MAX_BYTES

    def __init__(self, base_url: str, batch_url: str | None) -> None:
        self.files_url = f"{base_url}/files"
        self.url = batch_url or f"{base_url}/batches"

    def request_size(self, request: BatchRequest) -> int:
        return len(request.body) + len(request.custom_id) + 80

    def line(self, request: BatchRequest) -> bytes:
        head = json.dumps({"custom_id": request.custom_id, "method": "POST", "url": CHAT_ENDPOINT})
        return head[:-1].encode() + b', "body": ' + request.body + b"}"

    async def submit(
        self, session: aiohttp.ClientSession, requests: list[BatchRequest], metadata: dict[str, str] | None = None
    ) -> str:
        file_id = await upload_jsonl(session, self.files_url, [self.line(r) for r in requests])
        batch: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": CHAT_ENDPOINT,
            "completion_window": COMPLETION_WINDOW,
        }
        if metadata:
            batch["metadata"] = metadata
        return batch_id_from(await request_json(session, "POST", self.url, json=batch), f"POST {self.url}")

    async def list_batches(self, session: aiohttp.ClientSession) -> list[ListedBatch]:
        return listed(await request_json(session, "GET", self.url, params={"limit": str(LIST_LIMIT)}))

    async def poll(self, session: aiohttp.ClientSession, batch_id: str) -> BatchState:
        data = await get_batch(session, f"{self.url}/{batch_id}")
        raw_status = str(data.get("status"))
        counts = data.get("request_counts") or {}
        errors = (data.get("errors") or {}).get("data") if isinstance(data.get("errors"), dict) else None
        message = "; ".join(str(e.get("message")) for e in errors or [] if isinstance(e, dict) and e.get("message"))
        files = tuple(str(data[k]) for k in ("output_file_id", "error_file_id") if data.get(k))
        return BatchState(
            id=batch_id,
            status=status_of(raw_status, OPENAI_STATUSES),
            expires_at=epoch(data.get("expires_at")),
            provider_status=raw_status,
            total=count(counts.get("total")),
            completed=count(counts.get("completed")),
            failed=count(counts.get("failed")),
            error=message or None,
            files=files,
        )

    def results(
        self, session: aiohttp.ClientSession, state: BatchState, cursor: str | None
    ) -> AsyncIterator[ResultsPage]:
        return download_results(session, self.files_url, state, cursor)
