"""Benchmark of ``requests_per_minute = "auto"`` against strict servers whose caps the job is not told.

    python benchmarks/adaptive.py            (from the repository root, with the venv's Python)

For each case the project's fake server (``python -m tests.fakes.server``, a separate process,
as in ``benchmarks/run.py``) enforces a token bucket of one second (capacity = cap per
second, refilled continuously) and answers 429 + ``Retry-After: 1`` beyond it; the 2,400/min
server also states ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` on its 429s (as
OpenRouter does), the 600/min one states nothing but ``Retry-After``. Answers take 0.2 s
plus up to 0.2 s of jitter. The job (``concurrency = 64``, ``max_attempts = 20``) runs
with the default ``requests_per_minute = "auto"``; the figures come from the server's own
clock: completions per minute over the whole job and over its second half (by completion
order) as a share of the cap, and the share of all requests that got a 429.

Targets (issue 12): every row finished, >= 85% of the cap over the second half, >= 80%
over the whole job, <= 5% of requests answered 429. The table goes to stdout and into
``benchmarks/results.md`` (its own section; ``benchmarks/run.py`` keeps it).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # benchmarks/run.py: the server, data and child helpers

LATENCY_S = 0.2
JITTER_S = 0.2
MAX_ATTEMPTS = 20
SECOND_HALF_TARGET = 0.85
WHOLE_TARGET = 0.80
LIMITED_TARGET = 0.05
MARKER = bench.KEPT_MARKER


@dataclass(frozen=True)
class Case:
    cap_rpm: int
    rows: int
    stated: bool  # X-RateLimit-* on the 429s


CASES = (Case(600, 1_000, stated=False), Case(2_400, 4_000, stated=True))


def job_file(case: Case, base_url: str) -> tuple[str, Path]:
    """benchmarks/run.py's job, with the rate left to "auto" and room for retries."""
    name = f"adaptive_{case.cap_rpm}"
    job = bench.write_job(name, base_url, bench.ensure_data("short", case.rows))
    text = job.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^requests_per_minute = .*$", 'requests_per_minute = "auto"', text)
    text = re.sub(r"(?m)^max_attempts = .*$", f"max_attempts = {MAX_ATTEMPTS}", text)
    job.write_text(text, encoding="utf-8")
    return name, job


def share(times: list[float], cap_rpm: int) -> float:
    """Events per minute between the first and last of ``times``, as a share of the cap."""
    span = times[-1] - times[0]
    return (len(times) - 1) / span * 60 / cap_rpm if span > 0 else 0.0


def run_case(server: bench.Server, case: Case, log: Any) -> list[bench.Row]:
    name, job = job_file(case, server.base_url)
    output = bench.clean_output(name)
    server.reset()
    server.control(
        rps=case.cap_rpm / 60, rate_limit_headers=case.stated, latency_s=LATENCY_S, latency_jitter_s=JITTER_S
    )
    try:
        child = bench.run_child(bench.pipeline_argv(job, "--json"))
        stats = server.stats(full=True)
    finally:
        server.control(rps=None, rate_limit_headers=False, latency_s=0.0, latency_jitter_s=0.0)
    done = sorted(stats["completed"])
    limited = stats["status_counts"].get("429", 0)
    requests = stats["requests"]
    whole = share(done, case.cap_rpm)
    second = share(done[len(done) // 2 :], case.cap_rpm)
    limited_share = limited / requests if requests else 0.0
    summary = _summary(child.stdout)
    learned = summary.get("learned_requests_per_minute")
    source = summary.get("learned_rate_source")
    problems = []
    if child.returncode != 0:
        problems.append(child.describe_failure())
    if stats["ok"] != case.rows:
        problems.append(f"server answered {stats['ok']} ok for {case.rows} rows")
    if (found := bench.parquet_rows(output)) != case.rows:
        problems.append(f"output has {found} rows, expected {case.rows}")
    log(
        f"cap {case.cap_rpm}/min: whole {whole:.1%}, second half {second:.1%}, 429s {limited}/{requests}, "
        f"learned {learned} ({source}), wall {child.wall_s:.1f} s {problems or ''}"
    )
    told = "states X-RateLimit-* on 429s" if case.stated else "states only Retry-After"
    label = f"5. auto rate, cap {case.cap_rpm:,}/min (bucket of 1 s, {told}), {case.rows:,} rows"

    def verdict(ok: bool) -> str:
        return ("ERROR: " + "; ".join(problems)) if problems else ("PASS" if ok else "FAIL")

    return [
        bench.Row(
            f"{label}: share of the cap, second half",
            f"{second:.1%} ({second * case.cap_rpm:,.0f}/min)",
            f"≥ {SECOND_HALF_TARGET:.0%}",
            verdict(second >= SECOND_HALF_TARGET),
        ),
        bench.Row(
            f"{label}: share of the cap, whole job",
            f"{whole:.1%} ({case.rows:,} rows in {done[-1] - done[0]:.1f} s at the server; "
            f"command {child.wall_s:.1f} s)",
            f"≥ {WHOLE_TARGET:.0%}",
            verdict(whole >= WHOLE_TARGET),
        ),
        bench.Row(
            f"{label}: requests answered 429",
            f"{limited_share:.2%} ({limited:,} of {requests:,}); learned {learned:,.0f}/min ({source})"
            if isinstance(learned, float | int)
            else f"{limited_share:.2%} ({limited:,} of {requests:,})",
            f"≤ {LIMITED_TARGET:.0%}",
            verdict(limited_share <= LIMITED_TARGET),
        ),
    ]


def _summary(stdout: str) -> dict[str, Any]:
    try:
        data = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def write_results(text: str) -> None:
    """Replace this script's section of benchmarks/results.md, keeping the rest."""
    path = bench.RESULTS
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = old.split(MARKER, 1)[0].rstrip()
    path.write_text((kept + "\n\n" if kept else "") + MARKER + "\n" + text, encoding="utf-8")


def main() -> int:
    started = time.perf_counter()
    load_start = bench.load_average()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    rows: list[bench.Row] = []
    with bench.fake_server() as server:
        log(f"fake server at {server.base_url}")
        for case in CASES:
            rows += run_case(server, case, log)
    header = [
        *bench.machine(),
        f"- load average {load_start} at the start, {bench.load_average()} at the end",
        f"- server answers in {LATENCY_S} s + up to {JITTER_S} s; job concurrency {bench.CONCURRENCY}, "
        f'max_attempts {MAX_ATTEMPTS}, requests_per_minute = "auto"',
    ]
    text = "\n".join(
        [
            "## Adaptive rate limits",
            "",
            f"`python benchmarks/adaptive.py`, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
            f"took {time.perf_counter() - started:,.0f} s",
            "",
            *header,
            "",
            bench.table(rows),
            "",
        ]
    )
    write_results(text)
    print(text)
    return 1 if any(r.result.startswith(("FAIL", "ERROR")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
