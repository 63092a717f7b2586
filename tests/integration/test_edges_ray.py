"""Issue 22's edges under ``--engine ray``: a 404 "no endpoints" mid-run, an input edited mid-run.

Ray's driver shares the session (settlement, the output pass) with the default
engine; these check that the shared parts hold when the requests come from Ray
worker actors. Marked ``ray`` and ``slow`` like ``test_ray.py``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import reviews, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer
from tests.integration.test_edges_midrun import BAD, ROWS, finish, rows, wait_for, write_input
from tests.integration.test_ray import no_stray_ray

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]
__all__ = ["no_stray_ray"]  # fixtures

NO_ENDPOINTS = "404:No endpoints found for mistralai/ministral-8b."


def test_no_endpoints_mid_run_under_ray_stops_and_journals_what_came_back(
    workdir: Path, server: FakeServer, no_stray_ray: set[tuple[int, float]]
) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(200))
    write_job(workdir, server.base_url, limits={"concurrency": 8})
    server.config.latency_s = 0.05
    server.config.script = {f"number {i} ": [NO_ENDPOINTS] * 5 for i in range(40, 200)}
    code, err = finish(spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--quiet", "--no-canary"), 300)
    assert code == 3, err
    assert "No endpoints found" in err and "Traceback" not in err
    stats = server.stats()
    assert stats["requests"] < 120, "it stopped: the rest were not sent"
    with sqlite3.connect("data/out/job.parquet.journal.sqlite") as conn:
        ok = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0]
        failed = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'failed'").fetchone()[0]
    assert ok == stats["ok"] and failed == 0
    server.config.script = {}
    code, err = finish(spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--quiet"), 300)
    assert code == 0, err
    assert server.stats()["ok"] == 200 and server.duplicates() == 0


def test_an_input_edited_mid_run_under_ray_writes_what_was_paid(
    workdir: Path, server: FakeServer, no_stray_ray: set[tuple[int, float]]
) -> None:
    path = workdir / "data/in.csv"
    write_input(path, rows())
    write_job(workdir, server.base_url, input_path="data/in.csv", user="Summarise {text} ({qty})")
    server.config.latency_s = 0.1
    proc = spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--quiet", "--no-canary")
    wait_for(lambda: server.stats()["requests"] >= 4, proc, timeout=120)
    write_input(path, rows(bad=BAD))
    code, err = finish(proc, 300)
    assert code == 2, err
    assert f"data/in.csv: row {BAD + 1}:" in err and "Traceback" not in err, err
    out = pq.read_table("data/out/job.parquet").to_pylist()
    assert [r["id"] for r in out] == list(range(BAD)) and all(r["completion"] for r in out)
    paid = server.stats()["requests"]
    write_input(path, rows())
    code, err = finish(spawn(workdir, "run", "job", "--quiet"), 120)
    assert code == 0, err
    assert server.stats()["requests"] == ROWS and paid <= ROWS and server.duplicates() == 0
