"""Mistral's batch API: a JSONL file uploaded, a job created on it, output files downloaded.

- Submit: upload the requests as JSONL (``POST {base_url}/files``, multipart,
  ``purpose=batch``; lines ``{"custom_id", "body"}``, the model named once by
  the job, not per line), then ``POST {batch_url}`` (default
  ``{base_url}/batch/jobs``) with ``{"input_files": [file id], "model",
  "endpoint": "/v1/chat/completions"}``. At most 100,000 requests and 512 MB.
- Poll: ``GET {batch_url}/{id}``: ``status`` (QUEUED, RUNNING, SUCCESS, FAILED,
  TIMEOUT_EXCEEDED, CANCELLATION_REQUESTED, CANCELLED), request counts, and
  ``output_file`` / ``error_file`` once done.
- Results: ``GET {base_url}/files/{id}/content``, JSONL lines
  ``{"custom_id", "response": {"status_code", "body"}, "error"}``; they appear
  only when the whole job has ended.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pipeline.providers.batches import (
    CHAT_ENDPOINT,
    BatchRequest,
    BatchState,
    BatchStatus,
    ListedBatch,
    ResultsPage,
    batch_id_from,
    body_without_model,
    count,
    download_results,
    get_batch,
    listed,
    request_json,
    status_of,
    upload_jsonl,
)

if TYPE_CHECKING:
    import aiohttp

MAX_REQUESTS = 100_000
MAX_BYTES = 512 * 1000 * 1000
LIST_LIMIT = 100  # jobs per listing: the most recent are the ones a crash may have left

_STATUS = {
    "QUEUED": BatchStatus.PENDING,
    "RUNNING": BatchStatus.PENDING,
    "CANCELLATION_REQUESTED": BatchStatus.PENDING,
    "SUCCESS": BatchStatus.COMPLETED,
    "FAILED": BatchStatus.FAILED,
    "TIMEOUT_EXCEEDED": BatchStatus.EXPIRED,
    "CANCELLED": BatchStatus.CANCELLED,
}


class MistralBatches:
    name = "mistral"
    max_requests = MAX_REQUESTS
    max_bytes = MAX_BYTES

    def __init__(self, base_url: str, batch_url: str | None, model: str) -> None:
        self.files_url = f"{base_url}/files"
        self.url = batch_url or f"{base_url}/batch/jobs"
        self.model = model

    def request_size(self, request: BatchRequest) -> int:
        return len(request.body) + len(request.custom_id) + 32

    def line(self, request: BatchRequest) -> bytes:
        return json.dumps({"custom_id": request.custom_id, "body": body_without_model(request.body)}).encode()

    async def submit(
        self, session: aiohttp.ClientSession, requests: list[BatchRequest], metadata: dict[str, str] | None = None
    ) -> str:
        file_id = await upload_jsonl(session, self.files_url, [self.line(r) for r in requests])
        job: dict[str, Any] = {"input_files": [file_id], "model": self.model, "endpoint": CHAT_ENDPOINT}
        if metadata:
            job["metadata"] = metadata
        return batch_id_from(await request_json(session, "POST", self.url, json=job), f"POST {self.url}")

    async def list_batches(self, session: aiohttp.ClientSession) -> list[ListedBatch]:
        params = {"page": "0", "page_size": str(LIST_LIMIT)}
        return listed(await request_json(session, "GET", self.url, params=params))

    async def poll(self, session: aiohttp.ClientSession, batch_id: str) -> BatchState:
        data = await get_batch(session, f"{self.url}/{batch_id}")
        raw_status = str(data.get("status"))
        errors = data.get("errors") or []
        message = "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict) and e.get("message"))
        files = tuple(str(data[k]) for k in ("output_file", "error_file") if data.get(k))
        return BatchState(
            id=batch_id,
            status=status_of(raw_status, _STATUS),
            provider_status=raw_status,
            total=count(data.get("total_requests")),
            completed=count(data.get("succeeded_requests")),
            failed=count(data.get("failed_requests")),
            error=message or None,
            files=files,
        )

    def results(
        self, session: aiohttp.ClientSession, state: BatchState, cursor: str | None
    ) -> AsyncIterator[ResultsPage]:
        return download_results(session, self.files_url, state, cursor)
