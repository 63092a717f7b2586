"""Shared fixtures: the loopback chat-completions server, a temporary data/ and job files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.fakes.server import FakeServer

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A real aiohttp chat-completions server on loopback, in a background thread."""
    srv = FakeServer()
    with srv.running():
        yield srv


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary project folder with data/ and jobs/, as the working directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "jobs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENROUTER_API_KEY", TEST_KEY)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def reviews(n: int, prefix: str = "review") -> dict[str, list[Any]]:
    return {"id": list(range(n)), "text": [f"{prefix} number {i} about item {i * 7 % 13}" for i in range(n)]}


def write_job(
    workdir: Path,
    base_url: str,
    *,
    name: str = "job",
    input_path: str = "data/in.parquet",
    id_column: str | None = "id",
    user: str = "Summarise in one sentence:\\n\\n{text}",
    system: str | None = "You are a concise analyst.",
    limits: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    prompt_extra: str = "",
    output: str | None = None,
) -> Path:
    """Write jobs/NAME.toml pointing at ``base_url``; ``limits``/``model`` override keys."""
    lim = {"requests_per_minute": 60000, "concurrency": 8, "max_attempts": 4, "timeout_s": 5, **(limits or {})}
    mod = {
        "name": "mistralai/ministral-8b",
        "base_url": base_url,
        "max_tokens": 64,
        "temperature": 0.0,
        **(model or {}),
    }
    lines = ["[input]", f'path = "{input_path}"']
    if id_column:
        lines.append(f'id_column = "{id_column}"')
    lines += ["", "[prompt]"]
    if system is not None:
        lines.append(f'system = "{system}"')
    lines.append(f'user = "{user}"')
    if prompt_extra:
        lines.append(textwrap.dedent(prompt_extra).strip())
    lines += ["", "[model]"] + [f"{k} = {_toml(v)}" for k, v in mod.items()]
    lines += ["", "[limits]"] + [f"{k} = {_toml(v)}" for k, v in lim.items()]
    lines += ["", "[output]", f'path = "{output or f"data/out/{name}.parquet"}"', ""]
    path = workdir / "jobs" / f"{name}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def run_cli(*args: str) -> int:
    """Run the CLI in this process (fast); returns its exit code."""
    return main(["run", *args, "--quiet"]) if args and args[0] not in ("status", "prices") else main(list(args))


def read_output(path: Path) -> pa.Table:
    return pq.read_table(path)


def spawn(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Run ``python -m pipeline ARGS`` as a real subprocess in ``workdir``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
