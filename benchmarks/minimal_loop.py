"""The baseline for the overhead benchmark: the least code that does the same job.

Reads the input Parquet, renders the same chat request bodies as the pipeline's job
(same system prompt, user template, model, max_tokens, temperature), sends them with
one ``aiohttp.ClientSession`` and ``--concurrency`` worker tasks pulling from the list
of prepared bodies, keeps the parsed results in a list and writes them to Parquet once
at the end. No rate limiter, no journal, no retries, no progress bar. ``--loop uvloop``
runs the same code on uvloop's event loop (the pipeline's CLI uses uvloop when it is
installed): beside the default asyncio loop it shows what the loop alone gains.

    python benchmarks/minimal_loop.py --url http://127.0.0.1:PORT/v1 \\
        --input data/bench/rows20w_20000.parquet --output data/bench/out/minimal.parquet

Exits 1 if any request did not answer 200 with a completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

# Must match the job files benchmarks/run.py writes (and so the pipeline's bodies).
SYSTEM = "You are a concise analyst."
USER = "Classify the sentiment of this review in one word:\n\n{text}"
MODEL = "mistralai/ministral-8b"
MAX_TOKENS = 64
TEMPERATURE = 0.0

Result = tuple[str | None, str | None, int | None, int | None, float | None, str | None]


def prepare_bodies(table: pa.Table) -> list[bytes]:
    """One JSON request body per row, shaped like the pipeline's."""
    base = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}
    return [
        json.dumps(
            {
                **base,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": USER.format(text=text)},
                ],
            },
            ensure_ascii=False,
        ).encode()
        for text in table.column("text").to_pylist()
    ]


async def send_all(url: str, bodies: list[bytes], concurrency: int) -> list[Result | None]:
    """Send every body; ``results[i]`` is row i's (content, finish, tokens..., error)."""
    results: list[Result | None] = [None] * len(bodies)
    todo: Iterator[tuple[int, bytes]] = iter(enumerate(bodies))
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for i, body in todo:  # shared iterator: next() never awaits, so no lock
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except aiohttp.ClientError as exc:
                results[i] = (None, None, None, None, None, f"{type(exc).__name__}: {exc}")
                continue
            if status != 200:
                results[i] = (None, None, None, None, None, f"HTTP {status}")
                continue
            data: dict[str, Any] = json.loads(raw)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            results[i] = (
                choice["message"].get("content"),
                choice.get("finish_reason"),
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                usage.get("cost"),
                None,
            )

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def write_results(path: str, table: pa.Table, results: list[Result | None]) -> None:
    """Input columns plus the result columns, written once."""
    names = ("completion", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "error")
    types = (pa.string(), pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.string())
    rows = [r if r is not None else (None,) * 5 + ("not sent",) for r in results]
    for j, (name, kind) in enumerate(zip(names, types, strict=True)):
        table = table.append_column(name, pa.array([r[j] for r in rows], type=kind))
    pq.write_table(table, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = parser.parse_args(argv)

    table = pq.read_table(args.input)
    bodies = prepare_bodies(table)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(send_all(args.url.rstrip("/") + "/chat/completions", bodies, args.concurrency))
    write_results(args.output, table, results)
    failed = sum(1 for r in results if r is None or r[5] is not None)
    if failed:
        print(f"minimal_loop: {failed} of {len(results)} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
