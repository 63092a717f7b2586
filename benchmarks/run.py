"""Benchmarks of the pipeline against the project's fake server; prints one Markdown table.

    python benchmarks/run.py [--quick]      (from the repository root, with the venv's Python)

Starts ``python -m tests.fakes.server --port 0`` as a separate process, drives it through
POST /control and /reset and reads GET /stats, runs the pipeline (and a minimal aiohttp
loop, ``benchmarks/minimal_loop.py``) as subprocesses, stops the server at the end, and
writes the table to ``benchmarks/results.md``. Inputs are generated once under
``data/bench/`` (git-ignored), job files under ``data/bench/jobs/``. See
``benchmarks/README.md`` for what each row measures. ``--quick`` skips the 1,000,000-row
memory run.

Every child is reaped with ``os.wait4``, which gives that one child's CPU time and peak
RSS. Linux charges a child, at ``exec``, with the RSS of the process it was forked from,
so this script keeps itself small (no pyarrow or aiohttp here; data generation and
Parquet checks run in children) and cross-checks the peak against ``VmHWM`` polled from
``/proc/PID/status``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import selectors
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "data" / "bench"
JOBS = BENCH / "jobs"
OUT = BENCH / "out"
RESULTS = ROOT / "benchmarks" / "results.md"
PY = sys.executable

CONCURRENCY = 64
OVERHEAD_ROWS = 20_000
OVERHEAD_REPEATS = 3
OVERHEAD_TARGET = 1.0
# A numeric cap far above the achieved rate must cost (almost) nothing.
FAR_CAP_RPM = 1_000_000
FAR_CAP_TARGET = 0.97
CAP_RPM = 6000
CAP_ROWS = 3_000
CAP_TARGET = 0.97
MEMORY_ROWS = (20_000, 200_000, 1_000_000)
MEMORY_LIMIT_MB = 300.0
# req/s at 1,000,000 rows against req/s at 20,000: the cost per row must not grow with the input.
LINEAR_TARGET = 0.90
MEMORY_GROWTH_LIMIT = 1.5
DRY_ROWS = 1_000_000
# Issue 23: at least twice the whole command's rows/s measured on 2026-11-27 (19,153).
DRY_TARGET_ROWS_PER_S = 2 * 19_153
# [limits] requests_per_minute: a whole number, 0 meaning no cap (pipeline/job.py).
NO_CAP_RPM = 0
CHILD_TIMEOUT_S = 3600.0
# Start-up: `pipeline --help` and a rerun of a finished job with nothing to send (wall, median).
STARTUP_REPEATS = 3
STARTUP_TARGET_S = 0.5
# benchmarks/adaptive.py's section of results.md starts here; this script keeps it.
KEPT_MARKER = "<!-- benchmarks/adaptive.py -->"

# Must match benchmarks/minimal_loop.py so both send identical bodies.
SYSTEM = "You are a concise analyst."
USER = "Classify the sentiment of this review in one word:\n\n{text}"
MODEL = "mistralai/ministral-8b"
MAX_TOKENS = 64

# Words for the generated reviews (short, common English, some with punctuation).
_VOCAB_TEXT = """
the a an and or but so because when while after before this that these those it they we
i you he she my our your their product item order delivery package box price quality
service support battery screen sound camera size colour color fit material strap handle
lid charger cable manual app update size weight design finish button zipper seam fabric
great good fine okay decent poor bad terrible excellent amazing awful cheap expensive
worth solid flimsy sturdy light heavy quick slow late early broken damaged perfect
loved liked hated returned bought ordered received used tried washed charged installed
works worked stopped failed broke arrived fits looks feels sounds lasts runs keeps
really very quite too not never always still just also only even almost barely
day days week weeks month months year time times hour hours minute first second last
again once twice home kitchen office car travel gym kids dog cat gift friend wife husband
would will could should might must can does did has had was were is are be been
recommend, disappointed, happy, satisfied, impressed, annoyed, surprised, pleased,
however, overall, honestly, unfortunately, luckily, sadly, thankfully, otherwise,
five stars. one star. two stars. three stars. four stars. no complaints. money back.
"""
VOCAB = tuple(_VOCAB_TEXT.split())


# ----------------------------------------------------------------------------- children


@dataclass
class ChildRun:
    """What one reaped subprocess did."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float  # ru_maxrss from wait4 (may include the parent's RSS at exec)
    hwm_mb: float  # max VmHWM polled from /proc/PID/status (a lower bound of the peak)
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        """The child's own peak RSS.

        ``ru_maxrss`` is max(parent's RSS at exec, child's peak): when it exceeds this
        process's own peak it is exactly the child's peak; otherwise fall back to VmHWM.
        """
        self_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self.maxrss_mb if self.maxrss_mb > self_peak_mb else self.hwm_mb

    def describe_failure(self) -> str:
        tail = (self.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"exit {self.returncode}: {tail[:200]}"


def child_env() -> dict[str, str]:
    """The environment of every child: the repo on sys.path (the project may not be installed)."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def compile_bytecode() -> None:
    """Compile the package's modules once, as installing it does.

    An installed package carries its bytecode (pip compiles it) and an
    editable install writes it on first import, unless ``PYTHONDONTWRITEBYTECODE``
    is set, as it is in some sandboxes and containers: then every timed run
    would compile the package's modules from source again, about 0.07 s the
    minimal loop (one small script, libraries already compiled) never pays.
    """
    res = run_child([PY, "-m", "compileall", "-q", str(ROOT / "pipeline")])
    if res.returncode != 0:
        raise RuntimeError(f"compiling the package failed: {res.stderr[-1000:]}")


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def run_child(argv: Sequence[str], timeout_s: float = CHILD_TIMEOUT_S) -> ChildRun:
    """Run ``argv`` in the repo root; reap it with wait4 for its own rusage."""
    argv = list(argv)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        hwm = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, _vm_hwm_mb(proc.pid))
            if time.perf_counter() - started > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ChildRun(
            argv=argv,
            returncode=proc.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024,
            hwm_mb=hwm,
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )


def system_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, from /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def parquet_rows(path: Path) -> int | None:
    """Row count of a Parquet file (read in a child so this process stays small)."""
    if not path.exists():
        return None
    code = "import sys, pyarrow.parquet as pq; print(pq.ParquetFile(sys.argv[1]).metadata.num_rows)"
    res = subprocess.run([PY, "-c", code, str(path)], capture_output=True, text=True, env=child_env(), check=False)
    return int(res.stdout) if res.returncode == 0 else None


# -------------------------------------------------------------------------------- server


class Server:
    """``python -m tests.fakes.server`` in its own process, driven over HTTP."""

    def __init__(self, record: bool = False) -> None:
        # Closed in stop(); a context manager cannot span the server's lifetime.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        # ``record``: the server logs every request (body and headers), as a real provider's gateway does.
        argv = [PY, "-m", "tests.fakes.server", "--port", "0", *([] if record else ["--no-record-bodies"])]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = b""
        if sel.select(timeout=60):
            line = self.proc.stdout.readline()
        sel.close()
        text = line.decode().strip()
        if not text.startswith("READY "):
            self.stop()
            raise RuntimeError(f"fake server did not start: {text!r} {self._stderr()}")
        self.base_url = text.split(" ", 1)[1]  # http://127.0.0.1:PORT/v1
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def _stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")[-500:]

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def control(self, **changes: Any) -> None:
        """Change FakeConfig switches (e.g. ``rps=100``)."""
        self._request("POST", "/control", changes)

    def reset(self) -> None:
        """Clear statistics and the rate-limit bucket."""
        self._request("POST", "/reset", {})

    def stats(self, full: bool = False) -> dict[str, Any]:
        return self._request("GET", "/stats?full=1" if full else "/stats")

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (from /proc, in clock ticks)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@contextlib.contextmanager
def fake_server(record: bool = False) -> Iterator[Server]:
    server = Server(record)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- data


def generate(kind: str, rows: int, path: Path) -> None:
    """Write ``rows`` reviews of ~20 (kind "short") or ~100 ("long") random words.

    Runs in a child (``--generate``). Written with one ``pq.write_table`` call and
    pyarrow's defaults, as ``pandas.to_parquet`` would: row groups of up to 1Mi rows.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if path.exists():
        with contextlib.suppress(Exception):
            if pq.ParquetFile(path).metadata.num_rows == rows:
                return
    low, high = (16, 24) if kind == "short" else (80, 120)
    rng = np.random.default_rng(12345 + rows + (0 if kind == "short" else 1))
    vocab = pa.array(VOCAB)
    chunks = []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        lengths = rng.integers(low, high + 1, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        words = vocab.take(pa.array(rng.integers(0, len(VOCAB), int(offsets[-1]))))
        text = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")
        chunks.append(pc.binary_join_element_wise(text, pa.scalar("."), ""))
    table = pa.table({"id": pa.array(np.arange(rows, dtype=np.int64)), "text": pa.chunked_array(chunks)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def ensure_data(kind: str, rows: int) -> Path:
    path = BENCH / f"{'rows20w' if kind == 'short' else 'rows100w'}_{rows}.parquet"
    res = run_child([PY, str(Path(__file__).resolve()), "--generate", kind, str(rows), str(path)])
    if res.returncode != 0:
        raise RuntimeError(f"generating {path} failed: {res.stderr[-1000:]}")
    return path


def write_job(name: str, base_url: str, input_path: Path, *, rpm: int = NO_CAP_RPM) -> Path:
    """A job file under data/bench/jobs/ (paths relative to the repo root, the children's cwd)."""
    JOBS.mkdir(parents=True, exist_ok=True)
    text = f"""# Generated by benchmarks/run.py; overwritten on every run.
[input]
path = "{input_path.relative_to(ROOT).as_posix()}"
id_column = "id"

[prompt]
system = {json.dumps(SYSTEM)}
user = {json.dumps(USER)}

[model]
name = "{MODEL}"
base_url = "{base_url}"
api_key_env = ""
max_tokens = {MAX_TOKENS}
temperature = 0.0

[limits]
requests_per_minute = {int(rpm)}
concurrency = {CONCURRENCY}
max_attempts = 3
timeout_s = 60

[output]
path = "{(OUT / f"{name}.parquet").relative_to(ROOT).as_posix()}"
"""
    path = JOBS / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def clean_output(name: str) -> Path:
    """Delete a job's output, journal, WAL and lock so the next run sends every row."""
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob(f"{name}.parquet*"):
        old.unlink()
    return OUT / f"{name}.parquet"


# ------------------------------------------------------------------------------ benchmarks


@dataclass
class Row:
    """One table row."""

    benchmark: str
    measured: str
    target: str = ""
    result: str = ""


@dataclass
class Loop:
    """One timed run of the pipeline or the minimal loop against the instant server."""

    run: ChildRun
    rows: int
    server_cpu_s: float
    busy_s: float  # CPU seconds of the whole machine during the run
    problems: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.rows / self.run.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.run.cpu_s / self.rows

    @property
    def server_cpu_ms(self) -> float:
        return 1000 * self.server_cpu_s / self.rows

    @property
    def other_cores(self) -> float:
        """Cores kept busy by other processes meanwhile (noise: the machine is shared)."""
        return max(0.0, self.busy_s - self.run.cpu_s - self.server_cpu_s) / self.run.wall_s


def check_run(run: ChildRun, stats: dict[str, Any], rows: int, output: Path | None) -> list[str]:
    """Everything that makes a timed run invalid: exit code, server counts, output rows."""
    problems = []
    if run.returncode != 0:
        problems.append(run.describe_failure())
    if stats["requests"] != rows or stats["ok"] != rows:
        problems.append(
            f"server saw {stats['requests']} requests, {stats['ok']} ok, for {rows} rows "
            f"(statuses {stats['status_counts']})"
        )
    if output is not None and (found := parquet_rows(output)) != rows:
        problems.append(f"output {output.name} has {found} rows, expected {rows}")
    return problems


def pipeline_argv(job: Path, *extra: str) -> list[str]:
    return [PY, "-m", "pipeline", "run", str(job.relative_to(ROOT)), *extra]


def timed_pipeline(server: Server, name: str, job: Path, rows: int) -> Loop:
    output = clean_output(name)
    server.reset()
    cpu0, busy0 = server.cpu_s(), system_busy_s()
    run = run_child(pipeline_argv(job, "--quiet"))
    server_cpu, busy = server.cpu_s() - cpu0, system_busy_s() - busy0
    return Loop(run, rows, server_cpu, busy, check_run(run, server.stats(), rows, output))


def timed_minimal(server: Server, data: Path, rows: int, loop: str = "asyncio") -> Loop:
    output = clean_output("minimal")
    server.reset()
    cpu0, busy0 = server.cpu_s(), system_busy_s()
    run = run_child(
        [
            PY,
            str(ROOT / "benchmarks" / "minimal_loop.py"),
            "--url",
            server.base_url,
            "--input",
            str(data),
            "--output",
            str(output),
            "--concurrency",
            str(CONCURRENCY),
            "--loop",
            loop,
        ]
    )
    server_cpu, busy = server.cpu_s() - cpu0, system_busy_s() - busy0
    return Loop(run, rows, server_cpu, busy, check_run(run, server.stats(), rows, output))


def _loop_text(loop: Loop, runs: list[Loop]) -> str:
    all_rps = ", ".join(f"{x.rps:,.0f}" for x in runs)
    return (
        f"{loop.rps:,.0f} req/s (median of {all_rps}); client CPU {loop.cpu_ms:.3f} ms/req; "
        f"server CPU {loop.server_cpu_ms:.3f} ms/req; wall {loop.run.wall_s:.1f} s; "
        f"other processes busy {loop.other_cores:.1f} cores"
    )


@dataclass(frozen=True)
class Contender:
    """One command of benchmark 1: the pipeline (with or without a cap) or the minimal loop on a loop."""

    name: str
    label: str


PIPELINE = Contender("pipeline", "pipeline (`pipeline run`, uvloop where installed), no cap")
CAPPED = Contender("capped", f"pipeline with requests_per_minute = {FAR_CAP_RPM:,} (far above the achieved rate)")
MINIMAL = Contender("minimal", "minimal aiohttp loop, asyncio's event loop")
MINIMAL_UVLOOP = Contender("minimal-uvloop", "minimal aiohttp loop, uvloop's event loop")
CONTENDERS = (PIPELINE, MINIMAL, CAPPED, MINIMAL_UVLOOP)


def _median_ratio(runs: dict[str, list[Loop]], a: Contender, b: Contender) -> tuple[float, str]:
    """Median of the round-by-round ratios a/b of req/s, and the ratios themselves."""
    ratios = [x.rps / y.rps for x, y in zip(runs[a.name], runs[b.name], strict=True)]
    return statistics.median(ratios), ", ".join(f"{r:.1%}" for r in ratios)


def bench_overhead(repeats: int, log: Any) -> list[Row]:
    """Median of ``repeats`` alternating rounds (pipeline, minimal loop, capped pipeline, minimal
    loop on uvloop, in turn; every other round reversed); the server logs every request. Ratios
    are taken within a round."""
    runs: dict[str, list[Loop]] = {c.name: [] for c in CONTENDERS}
    with fake_server(record=True) as server:
        data = ensure_data("short", OVERHEAD_ROWS)
        jobs = {
            PIPELINE.name: write_job(f"overhead_{PIPELINE.name}", server.base_url, data),
            CAPPED.name: write_job(f"overhead_{CAPPED.name}", server.base_url, data, rpm=FAR_CAP_RPM),
        }

        def timed(c: Contender) -> Loop:
            if c.name in jobs:
                return timed_pipeline(server, f"overhead_{c.name}", jobs[c.name], OVERHEAD_ROWS)
            return timed_minimal(server, data, OVERHEAD_ROWS, "uvloop" if c is MINIMAL_UVLOOP else "asyncio")

        # One untimed run of each first: all then start with the data, the
        # libraries and the bytecode in the page cache, as every later run does.
        for c in CONTENDERS:
            warm = timed(c)
            log(f"overhead: {c.name} warm-up (not counted): {warm.rps:,.0f} req/s {warm.problems or ''}")
        for i in range(repeats):
            # Alternating, and every other round in reverse order (A B C D, D C B A): a machine that
            # speeds up or slows down over the run then favours no contender within a pair.
            for c in CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]:
                loop = timed(c)
                runs[c.name].append(loop)
                log(
                    f"overhead: {c.name} run {i + 1}: {loop.rps:,.0f} req/s, client CPU {loop.cpu_ms:.3f} ms/req, "
                    f"server CPU {loop.server_cpu_ms:.3f} ms/req, others {loop.other_cores:.1f} cores "
                    f"{loop.problems or ''}"
                )
    problems = [p for c in CONTENDERS for x in runs[c.name] for p in x.problems]
    label = f"1. overhead, {OVERHEAD_ROWS:,} rows, instant server logging every request, concurrency {CONCURRENCY}"
    rows = [Row(f"{label}: {c.label}", _loop_text(_median_run(runs[c.name]), runs[c.name])) for c in CONTENDERS]
    error = ("ERROR: " + "; ".join(problems)) if problems else None
    n = len(runs[PIPELINE.name])
    for a, b, target, what in (
        (PIPELINE, MINIMAL, OVERHEAD_TARGET, "the minimal loop's req/s (asyncio: the issue's baseline)"),
        (PIPELINE, MINIMAL_UVLOOP, None, "the minimal loop's req/s on the same loop (uvloop): the code's own gain"),
        (MINIMAL_UVLOOP, MINIMAL, None, "the minimal loop's req/s on asyncio: the loop's gain alone"),
        (CAPPED, PIPELINE, FAR_CAP_TARGET, "the uncapped pipeline's req/s: what a cap that does not bind costs"),
        (CAPPED, MINIMAL, None, "the minimal loop's req/s (asyncio)"),
    ):
        ratio, pairs = _median_ratio(runs, a, b)
        verdict = "" if target is None else error or ("PASS" if ratio >= target else "FAIL")
        rows.append(
            Row(
                f"{label}: {a.name} / {b.name}",
                f"{ratio:.1%} of {what} (median of {n} alternating rounds: {pairs})",
                "" if target is None else f"≥ {target:.0%}",
                verdict,
            )
        )
    return rows


def _median_run(runs: list[Loop]) -> Loop:
    return sorted(runs, key=lambda x: x.rps)[len(runs) // 2]


def bench_cap(server: Server, log: Any) -> list[Row]:
    data = ensure_data("short", CAP_ROWS)
    job = write_job("cap", server.base_url, data, rpm=CAP_RPM)
    cap_rps = CAP_RPM / 60
    clean_output("cap")
    server.reset()
    server.control(rps=cap_rps)
    try:
        run = run_child(pipeline_argv(job, "--quiet"))
        stats = server.stats(full=True)
    finally:
        server.control(rps=None)
    arrivals = sorted(stats["arrivals"])
    n = len(arrivals)
    span = arrivals[-1] - arrivals[0] if n > 1 else 0.0
    # n arrivals delimit n - 1 intervals: (n - 1) / span is the sustained rate.
    rate = (n - 1) / span if span > 0 else 0.0
    too_many = stats["status_counts"].get("429", 0)
    burst = max_per_window(arrivals, 1.0)
    log(f"cap: {rate:.2f} req/s over {span:.1f} s, {too_many} x 429, max {burst} in 1 s")
    problems = []
    if run.returncode != 0:
        problems.append(run.describe_failure())
    if stats["ok"] != CAP_ROWS:
        problems.append(f"server answered {stats['ok']} ok for {CAP_ROWS} rows")
    label = f"2. cap precision, {CAP_ROWS:,} rows, cap {CAP_RPM}/min, server rps={cap_rps:g}"
    rate_verdict = "PASS" if rate >= CAP_TARGET * cap_rps else "FAIL"
    return [
        Row(
            f"{label}: achieved rate",
            f"{rate:.2f} req/s = {rate / cap_rps:.1%} of the cap ({n:,} requests in {span:.2f} s; "
            f"max {burst} in any 1 s window)",
            f"≥ {CAP_TARGET:.0%} of {cap_rps:g}/s",
            ("ERROR: " + "; ".join(problems)) if problems else rate_verdict,
        ),
        Row(f"{label}: 429s at the server", f"{too_many}", "0", "PASS" if too_many == 0 else "FAIL"),
    ]


def max_per_window(arrivals: Sequence[float], window_s: float) -> int:
    """Most arrivals in any window ``[t, t + window_s)`` (as tests.fakes.server.max_per_window;
    not imported so this process stays small)."""
    best = i = 0
    for j, t in enumerate(arrivals):
        while t - arrivals[i] >= window_s:
            i += 1
        best = max(best, j - i + 1)
    return best


def bench_memory(server: Server, quick: bool, log: Any) -> list[Row]:
    peaks: dict[int, float] = {}
    loops: dict[int, Loop] = {}
    rows_out: list[Row] = []
    for rows in MEMORY_ROWS:
        label = f"3. memory, {rows:,} rows, instant server: peak RSS"
        if quick and rows >= 1_000_000:
            rows_out.append(Row(label, "skipped (--quick)", f"≤ {MEMORY_LIMIT_MB:.0f} MB", "skipped"))
            continue
        data = ensure_data("short", rows)
        name = f"memory_{rows}"
        job = write_job(name, server.base_url, data)
        loop = timed_pipeline(server, name, job, rows)
        peak = loop.run.peak_rss_mb
        peaks[rows] = peak
        loops[rows] = loop
        log(
            f"memory: {rows:,} rows: peak {peak:.0f} MB (ru_maxrss {loop.run.maxrss_mb:.0f}, "
            f"VmHWM {loop.run.hwm_mb:.0f}), {loop.rps:,.0f} req/s {loop.problems or ''}"
        )
        measured = f"{peak:,.0f} MB ({loop.rps:,.0f} req/s, wall {loop.run.wall_s:,.1f} s)"
        target, verdict = "", ""
        if rows == MEMORY_ROWS[1] and MEMORY_ROWS[0] in peaks:
            growth = peak / peaks[MEMORY_ROWS[0]]
            measured += f"; {growth:.2f}× the {MEMORY_ROWS[0]:,}-row peak"
            target = f"≤ {MEMORY_GROWTH_LIMIT}× the {MEMORY_ROWS[0]:,}-row peak"
            verdict = "PASS" if growth <= MEMORY_GROWTH_LIMIT else "FAIL"
        elif rows >= 1_000_000:
            target = f"≤ {MEMORY_LIMIT_MB:.0f} MB"
            verdict = "PASS" if peak <= MEMORY_LIMIT_MB else "FAIL"
        if loop.problems:
            verdict = "ERROR: " + "; ".join(loop.problems)
        rows_out.append(Row(label, measured, target, verdict))
    small, large = MEMORY_ROWS[0], MEMORY_ROWS[-1]
    if small in loops and large in loops:
        a, b = loops[large], loops[small]
        ratio = a.rps / b.rps
        problems = a.problems + b.problems
        rows_out.append(
            Row(
                f"3. linear cost: req/s at {large:,} rows / req/s at {small:,} rows",
                f"{ratio:.1%} ({a.rps:,.0f} / {b.rps:,.0f} req/s); client CPU {a.cpu_ms:.3f} / {b.cpu_ms:.3f} ms/req "
                f"= {a.cpu_ms / b.cpu_ms:.1%}; other processes busy {a.other_cores:.1f} / {b.other_cores:.1f} cores",
                f"≥ {LINEAR_TARGET:.0%}",
                ("ERROR: " + "; ".join(problems)) if problems else ("PASS" if ratio >= LINEAR_TARGET else "FAIL"),
            )
        )
    return rows_out


def bench_dry_run(log: Any) -> list[Row]:
    data = ensure_data("long", DRY_ROWS)
    # base_url is never contacted by a dry run; the instant server's is as good as any.
    job = write_job("dryrun", "http://127.0.0.1:9/v1", data)
    clean_output("dryrun")
    run = run_child(pipeline_argv(job, "--dry-run", "--json"))
    label = f"4. dry run, {DRY_ROWS:,} rows of ~100 words"
    try:
        report = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [Row(label, "no JSON report", f"≥ {DRY_TARGET_ROWS_PER_S:,} rows/s", run.describe_failure())]
    wall_rate = DRY_ROWS / run.wall_s
    log(f"dry run: {wall_rate:,.0f} rows/s wall, rows_per_s {report.get('rows_per_s')}")
    problems = []
    if run.returncode != 0:
        problems.append(run.describe_failure())
    if report.get("rows") != DRY_ROWS:
        problems.append(f"report counts {report.get('rows')} rows")
    verdict = "PASS" if wall_rate >= DRY_TARGET_ROWS_PER_S else "FAIL"
    return [
        Row(
            label,
            f"{wall_rate:,.0f} rows/s (whole command, {run.wall_s:.1f} s); report's rows_per_s "
            f"{report.get('rows_per_s'):,}; {report.get('input_tokens', 0):,} input tokens "
            f"({report.get('tokenizer')}); peak RSS {run.peak_rss_mb:,.0f} MB",
            f"≥ {DRY_TARGET_ROWS_PER_S:,} rows/s (2x 2026-11-27's 19,153)",
            ("ERROR: " + "; ".join(problems)) if problems else verdict,
        )
    ]


# -------------------------------------------------------------------------------- report


def bench_startup(log: Any) -> list[Row]:
    """Wall time of ``pipeline --help`` and of reruns of a finished 20,000-row job (nothing to send).

    The first rerun after the run that finished the job reads the input once to
    find every row done; later ones find the journal's record of that pass still
    true and skip it. The first kind is timed by deleting that record before each
    run. Median of ``STARTUP_REPEATS`` runs each, after one untimed run of each.
    """
    name = "startup_noop"
    with fake_server() as server:
        data = ensure_data("short", OVERHEAD_ROWS)
        job = write_job(name, server.base_url, data)
        output = clean_output(name)
        finish = run_child(pipeline_argv(job, "--quiet"))
        if finish.returncode != 0 or server.stats()["requests"] != OVERHEAD_ROWS:
            return [Row("5. start-up: finishing the job", finish.describe_failure(), "", "ERROR")]
        journal = output.with_name(output.name + ".journal.sqlite")

        def forget_settled() -> None:
            with contextlib.closing(sqlite3.connect(journal)) as conn, conn:
                conn.execute("DELETE FROM meta WHERE key = 'settled'")

        kinds: list[tuple[str, list[str], Any]] = [
            ("`pipeline --help`", [PY, "-m", "pipeline", "--help"], None),
            (f"no-op rerun of a finished {OVERHEAD_ROWS:,}-row job, the first one", pipeline_argv(job), forget_settled),
            (f"no-op rerun of a finished {OVERHEAD_ROWS:,}-row job, later ones", pipeline_argv(job), None),
        ]
        rows = []
        for label, argv, before in kinds:
            runs = []
            for i in range(STARTUP_REPEATS + 1):  # the first is untimed: page cache, bytecode
                if before is not None:
                    before()
                run = run_child(argv)
                if run.returncode != 0:
                    rows.append(Row(f"5. start-up: {label}", run.describe_failure(), "", "ERROR"))
                    break
                if i:
                    runs.append(run)
                    log(f"start-up: {label} run {i}: {run.wall_s:.3f} s wall, {run.cpu_s:.3f} s CPU")
            else:
                wall = statistics.median(r.wall_s for r in runs)
                cpu = statistics.median(r.cpu_s for r in runs)
                walls = ", ".join(f"{r.wall_s:.2f}" for r in runs)
                rows.append(
                    Row(
                        f"5. start-up: {label}",
                        f"{wall:.2f} s wall, {cpu:.2f} s CPU (median of {len(runs)}: {walls} s)",
                        f"≤ {STARTUP_TARGET_S:.1f} s",
                        "PASS" if wall <= STARTUP_TARGET_S else "FAIL",
                    )
                )
        sent = server.stats()["requests"] - OVERHEAD_ROWS
        if sent or parquet_rows(output) != OVERHEAD_ROWS:
            rows.append(
                Row("5. start-up: reruns", f"sent {sent} requests; output {parquet_rows(output)} rows", "", "ERROR")
            )
    return rows


def machine() -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {model}, {os.cpu_count()} cores ({usable} usable)",
        # No interpreter path: results.md is committed, and a path names one machine's layout.
        f"- Python {platform.python_version()} (the virtualenv's python), {platform.system()} {platform.release()}",
    ]


def table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| Benchmark | Measured | Target | Pass/fail |", "|---|---|---|---|"]
    lines += [f"| {cell(r.benchmark)} | {cell(r.measured)} | {cell(r.target)} | {cell(r.result)} |" for r in rows]
    return "\n".join(lines)


def _kept_sections() -> str:
    """Sections other scripts (benchmarks/adaptive.py) wrote after their marker: kept as they are."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    return "\n" + KEPT_MARKER + old.split(KEPT_MARKER, 1)[1] if KEPT_MARKER in old else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the pipeline against the fake server.")
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-row memory run")
    parser.add_argument(
        "--repeats", type=int, default=OVERHEAD_REPEATS, help="alternating overhead pairs (the median counts)"
    )
    parser.add_argument("--only-overhead", action="store_true", help="run only benchmark 1 (and print its rows)")
    parser.add_argument("--only-startup", action="store_true", help="run only benchmark 5 (and print its rows)")
    parser.add_argument("--generate", nargs=3, metavar=("KIND", "ROWS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        kind, count, path = args.generate
        generate(kind, int(count), Path(path))
        return 0

    started = time.perf_counter()
    load_start = load_average()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    compile_bytecode()
    if args.only_startup:
        rows = bench_startup(log)
        print(table(rows))
        return 0 if all(r.result in ("", "PASS") for r in rows) else 1
    rows: list[Row] = bench_overhead(max(1, args.repeats), log)
    if args.only_overhead:
        print(table(rows))
        return 0 if all(r.result in ("", "PASS") for r in rows) else 1
    with fake_server() as server:
        log(f"fake server at {server.base_url}")
        rows += bench_cap(server, log)
        rows += bench_memory(server, args.quick, log)
    rows += bench_dry_run(log)
    rows += bench_startup(log)

    header = [
        *machine(),
        f"- load average {load_start} at the start, {load_average()} at the end "
        "(1, 5, 15 min; the start figure is other processes' load: well above 0 means noisier figures)",
    ]
    mode = "quick (--quick: no 1,000,000-row memory run)" if args.quick else "full"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"`python benchmarks/run.py{' --quick' if args.quick else ''}`, {mode}, {stamp}, "
            f"took {time.perf_counter() - started:,.0f} s",
            "",
            *header,
            "",
            table(rows),
            "",
        ]
    )
    RESULTS.write_text(text + _kept_sections(), encoding="utf-8")
    print("\n".join(header))
    print()
    print(table(rows))
    failed = any(r.result.startswith(("FAIL", "ERROR")) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
