"""The Python API's edges: sample, outputs in every format, the caller's index, overlapping data, Ctrl-C.

Each test calls ``pipeline.run`` (or runs a script that does, where a signal is the
point) against the loopback chat server, and checks what the caller gets back and
what the server was asked: each prompt paid once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import pipeline
from tests.conftest import ROOT
from tests.fakes.server import FakeServer, expected_reply


def job_dict(base_url: str | None, id_column: str | None = None, **limits: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "api",
        "prompt": {"user": "Summarise: {text}"},
        "model": {"base_url": base_url, "max_tokens": 32},
        "limits": {"requests_per_minute": 60000, "concurrency": 4, "max_attempts": 3, "timeout_s": 5, **limits},
    }
    if id_column:
        job["input"] = {"id_column": id_column}
    return job


def frame(n: int, word: str = "note") -> pd.DataFrame:
    return pd.DataFrame({"id": list(range(n)), "text": [f"{word} {i} about parcel {i * 3 % 11}" for i in range(n)]})


def answers(texts: Any) -> list[str]:
    return [expected_reply(f"Summarise: {t}") for t in texts]


# ------------------------------------------------------------------ sample


@pytest.mark.parametrize("sample", [0, -1, True, False, 2.5, "3"])
def test_sample_is_validated_like_the_cli(server: FakeServer, workdir: Path, sample: Any) -> None:
    with pytest.raises(pipeline.UserError, match="sample"):
        pipeline.run(frame(20), job_dict(server.base_url), sample=sample, progress=False)
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize(("sample", "expected"), [(5, 5), (20, 20), (5000, 20)])
def test_a_sampled_run_returns_its_rows_with_answers(
    server: FakeServer, workdir: Path, sample: int, expected: int
) -> None:
    df = frame(20)
    result = pipeline.run(df, job_dict(server.base_url), sample=sample, progress=False)
    out = result.to_pandas()
    assert len(out) == expected and server.stats()["requests"] == expected
    assert out["completion"].tolist() == answers(out["text"])
    # The rows keep their place in the input: the caller's index says which they are.
    assert df.loc[out.index, "text"].tolist() == out["text"].tolist()


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_an_output_in_every_format_returns_a_result(server: FakeServer, workdir: Path, suffix: str) -> None:
    df = frame(6)
    path = workdir / "data" / f"out{suffix}"
    for _ in range(2):  # the second call pays nothing and still returns the rows
        result = pipeline.run(df, job_dict(server.base_url), output=path, progress=False)
        out = result.to_pandas()
        assert out["completion"].tolist() == answers(df["text"])
        assert out["id"].tolist() == df["id"].tolist()
        assert path.exists()
    assert server.stats()["requests"] == 6


# ------------------------------------------------------------------ the caller's index


def _indexed_frames() -> list[pd.DataFrame]:
    base = frame(30)
    filtered = base[base["id"] % 3 != 0]  # a filtered frame: gaps in its RangeIndex
    strings = frame(5).set_index(pd.Index([f"r{i}" for i in range(5)], name="name"))
    multi = frame(6).set_index(pd.MultiIndex.from_product([["a", "b"], [1, 2, 3]], names=["grp", "n"]))
    dups = frame(4).set_index(pd.Index([7, 7, 3, 3]))
    shuffled = frame(8).sample(frac=1.0, random_state=1)
    return [filtered, strings, multi, dups, shuffled]


@pytest.mark.parametrize("df", _indexed_frames(), ids=["filtered", "strings", "multiindex", "duplicates", "shuffled"])
def test_the_callers_index_is_kept(server: FakeServer, workdir: Path, df: pd.DataFrame) -> None:
    result = pipeline.run(df, job_dict(server.base_url), progress=False)
    out = result.to_pandas()
    assert out.index.equals(df.index)
    assert out.index.names == df.index.names
    if df.index.is_unique:
        # The idiom the issue names: answers land on their own rows.
        copy = df.copy()
        copy["completion"] = out["completion"]
        assert copy["completion"].tolist() == answers(copy["text"])


# ------------------------------------------------------------------ one job, two frames


@pytest.mark.parametrize("id_column", ["id", None])
def test_two_frames_with_overlapping_ids_each_prompt_paid_once(
    server: FakeServer, workdir: Path, id_column: str | None
) -> None:
    train, test = frame(100, "train"), frame(100, "test")  # both numbered from 0
    job = job_dict(server.base_url, id_column=id_column)
    for _ in range(2):
        for df in (train, test):
            out = pipeline.run(df, job, progress=False).to_pandas()
            assert out["completion"].tolist() == answers(df["text"])
    assert server.stats()["requests"] == 200
    assert server.duplicates() == 0


# ------------------------------------------------------------------ data mistakes


class _Weird:
    pass


MISTAKES: list[Any] = [
    [{"text": "a"}, {"text": 1}],  # mixed types in a list of dicts
    pd.DataFrame({"text": ["a", 1, 2.5]}),  # an object column Arrow cannot type
    pd.DataFrame({"text": ["a", _Weird()]}),
    pd.DataFrame([["a", "b"]], columns=["text", "text"]),  # duplicate column names
    pd.DataFrame({"other": ["a"]}),  # the prompt's column is missing
    pd.Series(["a", "b"], name="text"),
    {"text": ["a", "b"]},  # a dict of lists
    [1, 2, 3],
    np.array(["a", "b"]),
    "data/missing.parquet",
]


@pytest.mark.parametrize("data", MISTAKES, ids=[str(i) for i in range(len(MISTAKES))])
def test_data_mistakes_raise_user_errors_with_one_line(server: FakeServer, workdir: Path, data: Any) -> None:
    with pytest.raises(pipeline.UserError) as info:
        pipeline.run(data, job_dict(server.base_url), progress=False)
    assert "\n" not in str(info.value) and str(info.value)
    with pytest.raises(pipeline.UserError):
        pipeline.estimate(data, job_dict(server.base_url))
    assert server.stats()["requests"] == 0


def test_mixed_id_types_raise_a_user_error(server: FakeServer, workdir: Path) -> None:
    df = pd.DataFrame({"id": [1, "two", 3.5], "text": ["a", "b", "c"]})
    with pytest.raises(pipeline.UserError):
        pipeline.run(df, job_dict(server.base_url, id_column="id"), progress=False)
    assert server.stats()["requests"] == 0


# ------------------------------------------------------------------ Ctrl-C

SCRIPTS = {
    # A plain script: asyncio.run's Ctrl-C cancels the task running the job.
    "script": "pipeline.run(df, job, progress=False)",
    # A notebook cell: a running loop, so run() works on a helper thread; Ctrl-C raises in the main thread.
    "notebook": textwrap.dedent(
        """
        import asyncio
        async def cell():
            return pipeline.run(df, job, progress=False)
        asyncio.new_event_loop().run_until_complete(cell())
        """
    ),
    # await pipeline.arun(...) in a cell, interrupted: the front end cancels the task.
    "arun": textwrap.dedent(
        """
        import asyncio, signal
        loop = asyncio.new_event_loop()
        task = loop.create_task(pipeline.arun(df, job, progress=False))
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise SystemExit(3)
        """
    ),
}


@pytest.mark.parametrize("how", list(SCRIPTS))
def test_ctrl_c_journals_the_replies_in_flight(server: FakeServer, workdir: Path, how: str) -> None:
    server.config.latency_s = 1.5
    job = job_dict(server.base_url, concurrency=4, timeout_s=30)
    script = (
        textwrap.dedent(
            f"""
        import pandas as pd, pipeline
        df = pd.DataFrame({{"id": list(range(12)), "text": [f"note {{i}}" for i in range(12)]}})
        job = {job!r}
        """
        )
        + SCRIPTS[how]
    )
    env = {"PYTHONPATH": str(ROOT), "PIPELINE_CACHE_DIR": str(workdir / "cache"), "OPENROUTER_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=workdir, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while server.stats()["in_flight"] < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    stats = server.stats()
    assert stats["cancelled"] == 0, f"{stats['cancelled']} requests in flight were given up (paid, not journaled)"
    journals = list((workdir / "cache" / "journals").glob("*.sqlite"))
    assert len(journals) == 1, err
    with sqlite3.connect(journals[0]) as conn:
        done = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0]
    assert done == stats["ok"] >= 4, err
    assert stats["requests"] < 12  # it stopped: no new requests after Ctrl-C


# ------------------------------------------------------------------ --workers


@pytest.mark.parametrize("workers", [100000, 0, -2])
def test_ray_workers_are_bounded(server: FakeServer, workdir: Path, workers: int) -> None:
    started = time.monotonic()
    with pytest.raises(pipeline.UserError, match="workers"):
        pipeline.run(frame(3), job_dict(server.base_url), engine="ray", workers=workers, progress=False)
    assert time.monotonic() - started < 10
    assert server.stats()["requests"] == 0
