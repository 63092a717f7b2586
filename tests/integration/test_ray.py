"""``--engine ray`` end to end: real Ray instances, real subprocesses, a real loopback server.

Each test starts the CLI as a subprocess (so this test process never imports
Ray) that starts its own local Ray instance. Marked ``ray`` (and ``slow``):
``pytest -m "not ray"`` skips them; a plain ``pytest`` runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, reviews, spawn, write_job, write_parquet
from tests.fakes.s3store import BUCKET, s3, s3_endpoint
from tests.fakes.server import FakeServer, expected_reply, max_per_window

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]
__all__ = ["s3", "s3_endpoint"]  # fixtures

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::")


def _is_ray(proc: psutil.Process) -> bool:
    try:
        text = proc.name() + " " + " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return False
    return any(name in text for name in RAY_PROCESS_NAMES) or "/ray/" in text


def _ray_processes() -> set[tuple[int, float]]:
    """Every Ray process on the machine, as (pid, start time)."""
    found = set()
    for proc in psutil.process_iter():
        with_time = None
        try:
            if _is_ray(proc):
                with_time = (proc.pid, proc.create_time())
        except psutil.Error:
            continue
        if with_time:
            found.add(with_time)
    return found


def _alive(processes: set[tuple[int, float]]) -> set[tuple[int, float]]:
    alive = set()
    for pid, created in processes:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.add((pid, created))
        except psutil.Error:
            continue
    return alive


@pytest.fixture
def no_stray_ray() -> Iterator[set[tuple[int, float]]]:
    """The Ray processes that existed before the test; after it, none of the test's may remain."""
    before = _ray_processes()
    yield before
    deadline = time.monotonic() + 30
    while _alive(_ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(_ray_processes() - before), "Ray processes outlived the run"


def _run_ray(workdir: Path, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = spawn(workdir, "run", "job", "--engine", "ray", *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _check_output(path: Path, rows: int) -> None:
    out = pq.read_table(path).to_pylist()
    assert [r["id"] for r in out] == list(range(rows))
    for row in out:
        assert row["completion"] == expected_reply(row["text"]), row
        assert row["error"] is None


def test_cap_held_across_two_workers(workdir: Path, no_stray_ray: set[tuple[int, float]]) -> None:
    """4,000 rows, a server that refuses more than 3,000 a minute, two workers: no 429, every row once."""
    rows = 4000
    server = FakeServer(rps=50, latency_s=0.05, record_client_pids=True, record_bodies=False)
    with server.running():
        write_parquet(workdir / "data" / "in.parquet", reviews(rows))
        write_job(
            workdir,
            server.base_url or "",
            system=None,
            user="{text}",
            limits={"requests_per_minute": 3000, "concurrency": 16, "max_attempts": 3},
        )
        code, out, err = _run_ray(workdir, "--workers", "2", "--json")
        stats = server.stats()
    assert code == 0, err
    summary = json.loads(out)  # one JSON object, nothing else on stdout
    assert summary["engine"] == "ray" and summary["workers"] == 2
    assert summary["rows_ok"] == rows and summary["requests"] == rows
    _check_output(workdir / "data" / "out" / "job.parquet", rows)
    assert stats["ok"] == rows and server.duplicates() == 0
    assert stats["status_counts"] == {200: rows} and stats["rate_limited"] == 0
    assert max_per_window(stats["arrivals"], 60.0) <= 3000
    senders = {pid: n for pid, n in stats["client_pids"].items() if n > 100}
    assert len(senders) >= 2, stats["client_pids"]
    assert all(psutil.Process(pid).name().startswith("ray::") for pid in senders if psutil.pid_exists(pid))


def test_driver_killed_leaves_no_ray_process_and_rerun_pays_little_twice(
    workdir: Path, no_stray_ray: set[tuple[int, float]]
) -> None:
    rows, concurrency = 1500, 8
    server = FakeServer(latency_s=0.2, record_bodies=False)
    with server.running():
        write_parquet(workdir / "data" / "in.parquet", reviews(rows))
        write_job(
            workdir,
            server.base_url or "",
            system=None,
            user="{text}",
            limits={"requests_per_minute": 6000, "concurrency": concurrency},
        )
        driver = spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--quiet")
        _wait_for(lambda: server.stats()["ok"] >= 200, 120, "the first 200 replies")
        started = _alive(_ray_processes() - no_stray_ray)
        assert any("RowWorker" in psutil.Process(pid).name() for pid, _ in started)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        killed_at = time.monotonic()
        while _alive(started) and time.monotonic() - killed_at < 30:
            time.sleep(0.5)
        assert not _alive(started), "Ray processes of the killed run still alive after 30 s"
        paid_before_rerun = server.stats()["ok"]
        assert paid_before_rerun < rows

        code, out, err = _run_ray(workdir, "--workers", "2", "--json")
        assert code == 0, err
        assert json.loads(out)["rows_resumed"] > 0
        _check_output(workdir / "data" / "out" / "job.parquet", rows)
        # Only requests in flight at the kill (at most `concurrency`) were paid twice.
        assert server.duplicates() <= concurrency
        assert server.stats()["ok"] <= rows + concurrency


def test_dead_worker_has_its_rows_sent_by_another(workdir: Path, no_stray_ray: set[tuple[int, float]]) -> None:
    rows, concurrency = 1200, 8
    server = FakeServer(latency_s=0.1, record_bodies=False)
    with server.running():
        write_parquet(workdir / "data" / "in.parquet", reviews(rows))
        write_job(
            workdir,
            server.base_url or "",
            system=None,
            user="{text}",
            limits={"requests_per_minute": 6000, "concurrency": concurrency},
        )
        driver = spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--json")
        _wait_for(lambda: server.stats()["ok"] >= 200, 120, "the first 200 replies")
        workers = [
            psutil.Process(pid)
            for pid, _ in _alive(_ray_processes() - no_stray_ray)
            if "RowWorker" in psutil.Process(pid).name()
        ]
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    summary = json.loads(out)
    assert summary["rows_ok"] + summary["rows_resumed"] == rows
    _check_output(workdir / "data" / "out" / "job.parquet", rows)
    assert server.duplicates() <= concurrency


def test_s3_input_read_by_the_workers(
    workdir: Path, s3: pafs.S3FileSystem, no_stray_ray: set[tuple[int, float]]
) -> None:
    rows = 300
    pq.write_table(pa.table(reviews(rows)), f"{BUCKET}/in/part-0.parquet", filesystem=s3, row_group_size=100)
    server = FakeServer()
    with server.running():
        write_job(
            workdir,
            server.base_url or "",
            input_path=f"s3://{BUCKET}/in/",
            output=f"s3://{BUCKET}/out/result.parquet",
            system=None,
            user="{text}",
        )
        code, out, err = _run_ray(workdir, "--workers", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["rows_ok"] == rows
    local = workdir / "result.parquet"
    pafs.copy_files(f"{BUCKET}/out/result.parquet", str(local), source_filesystem=s3)
    _check_output(local, rows)


def test_sigint_stops_cleanly_and_resumes(workdir: Path, no_stray_ray: set[tuple[int, float]]) -> None:
    rows = 600
    server = FakeServer(latency_s=0.2, record_bodies=False)
    with server.running():
        write_parquet(workdir / "data" / "in.parquet", reviews(rows))
        write_job(workdir, server.base_url or "", system=None, user="{text}", limits={"concurrency": 8})
        driver = spawn(workdir, "run", "job", "--engine", "ray", "--json")
        _wait_for(lambda: server.stats()["ok"] >= 50, 120, "the first 50 replies")
        driver.send_signal(signal.SIGINT)
        stopped_at = time.monotonic()
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 3, err
        # In-flight rows finish within their latency: the 30 s grace period is not needed.
        assert time.monotonic() - stopped_at < 20
        summary = json.loads(out)
        assert summary["stop_reason"] == "interrupted by SIGINT"
        # Everything paid was journaled: the rerun sends only what is left.
        code, out, err = _run_ray(workdir, "--json")
        assert code == 0, err
        assert server.duplicates() == 0
    _check_output(workdir / "data" / "out" / "job.parquet", rows)


def test_python_api_engine_ray(workdir: Path, no_stray_ray: set[tuple[int, float]]) -> None:
    rows = 200
    server = FakeServer()
    with server.running():
        script = f"""
import json, pyarrow as pa, pipeline
table = pa.table({{"id": list(range({rows})), "text": [f"row {{i}}" for i in range({rows})]}})
job = {{
    "prompt": {{"user": "{{text}}"}},
    "input": {{"id_column": "id"}},
    "model": {{"base_url": "{server.base_url}"}},
    "limits": {{"requests_per_minute": 6000}},
}}
result = pipeline.run(table, job, engine="ray", workers=2, progress=False)
print("RESULT " + json.dumps({{
    "engine": result.summary.engine,
    "workers": result.summary.workers,
    "exit_code": int(result.exit_code),
    "rows": result.table.select(["text", "completion"]).to_pylist(),
}}))
"""
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert (result["engine"], result["workers"], result["exit_code"]) == ("ray", 2, 0)
    assert [r["completion"] for r in result["rows"]] == [expected_reply(r["text"]) for r in result["rows"]]
    assert len(result["rows"]) == rows and server.duplicates() == 0
