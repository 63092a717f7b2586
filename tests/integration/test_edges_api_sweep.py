"""More of the Python API's edges, of the kinds issue 22 names: sample, output, index, overlap.

Variants the first tests (``test_edges_api.py``) do not try: numpy and odd
numbers for ``sample``, output paths with an upper-case or no suffix or a
folder, frames whose index is named, dated or repeated with a sample, and one
job over frames whose ids overlap while their prompts differ. Each checks what
the caller gets back and that each prompt is paid once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from tests.fakes.server import FakeServer
from tests.integration.test_edges_api import answers, frame, job_dict

# ------------------------------------------------------------------ sample


@pytest.mark.parametrize(
    "sample", [np.bool_(True), 3.0, float("nan"), "", -0, np.int64(-4), [3], 10**100 * 0 - 1], ids=str
)
def test_odd_samples_are_refused_before_sending(server: FakeServer, workdir: Path, sample: Any) -> None:
    with pytest.raises(pipeline.UserError, match="sample") as caught:
        pipeline.run(frame(10), job_dict(server.base_url), sample=sample, progress=False)
    assert "\n" not in str(caught.value)
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize("sample", [np.int64(4), np.int32(4)], ids=["int64", "int32"])
def test_a_numpy_whole_number_is_a_sample(server: FakeServer, workdir: Path, sample: Any) -> None:
    """``sample=len(df) // 10`` on numpy figures is a numpy integer: taken like an int."""
    result = pipeline.run(frame(10), job_dict(server.base_url), sample=sample, progress=False)
    assert len(result.to_pandas()) == 4 and server.stats()["requests"] == 4


def test_a_huge_sample_sends_every_row_once(server: FakeServer, workdir: Path) -> None:
    df = frame(7)
    out = pipeline.run(df, job_dict(server.base_url), sample=10**12, progress=False).to_pandas()
    assert out["completion"].tolist() == answers(df["text"])
    assert server.stats()["requests"] == 7


def test_a_sample_in_batch_mode_is_refused_before_sending(server: FakeServer, workdir: Path) -> None:
    job = job_dict(server.base_url)
    job["model"] |= {"mode": "batch", "provider": "openai"}
    with pytest.raises(pipeline.UserError, match="sample"):
        pipeline.run(frame(5), job, sample=2, progress=False)
    assert server.stats()["requests"] == 0


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("name", ["out.PARQUET", "out.Csv", "out.JSONL", "out.ndjson", "out.pq"])
def test_output_suffixes_in_any_case_return_a_result(server: FakeServer, workdir: Path, name: str) -> None:
    df = frame(4)
    path = workdir / "data" / name
    for _ in range(2):
        out = pipeline.run(df, job_dict(server.base_url), output=path, progress=False).to_pandas()
        assert out["completion"].tolist() == answers(df["text"])
    assert path.exists() and server.stats()["requests"] == 4


@pytest.mark.parametrize("name", ["out", "out.txt", "folder"])
def test_an_output_without_a_known_suffix_or_a_folder_is_refused_before_sending(
    server: FakeServer, workdir: Path, name: str
) -> None:
    (workdir / "data" / "folder").mkdir()
    with pytest.raises(pipeline.UserError, match="output") as caught:
        pipeline.run(frame(4), job_dict(server.base_url), output=str(workdir / "data" / name), progress=False)
    assert "\n" not in str(caught.value)
    assert server.stats()["requests"] == 0


def test_the_output_file_matches_what_the_call_returns(server: FakeServer, workdir: Path) -> None:
    df = frame(6).set_index(pd.Index([f"k{i}" for i in range(6)]))
    path = workdir / "data" / "out.parquet"
    out = pipeline.run(df, job_dict(server.base_url), output=path, progress=False).to_pandas()
    written = pq.read_table(path).to_pandas()
    assert written["completion"].tolist() == out["completion"].tolist() == answers(df["text"])


# ------------------------------------------------------------------ the caller's index


def _frames() -> dict[str, pd.DataFrame]:
    base = frame(6)
    return {
        "datetime": base.set_index(pd.date_range("2026-01-01", periods=6, freq="D", name="day")),
        "columns_reordered": base[["text", "id"]],
        "named_like_a_column": base.set_index(pd.Index(range(10, 16), name="id2")),
        "multi_dups": base.set_index(pd.MultiIndex.from_tuples([("a", 1)] * 3 + [("b", 2)] * 3, names=["g", "n"])),
        "descending": base.iloc[::-1],
    }


@pytest.mark.parametrize("name", list(_frames()))
def test_the_index_and_columns_are_kept(server: FakeServer, workdir: Path, name: str) -> None:
    df = _frames()[name]
    out = pipeline.run(df, job_dict(server.base_url), progress=False).to_pandas()
    assert out.index.equals(df.index) and out.index.names == df.index.names
    assert list(out.columns[: len(df.columns)]) == list(df.columns)
    assert out["completion"].tolist() == answers(df["text"])


def test_a_sample_keeps_the_callers_index_with_duplicates(server: FakeServer, workdir: Path) -> None:
    df = frame(12).set_index(pd.Index([i // 2 for i in range(12)], name="pair"))
    out = pipeline.run(df, job_dict(server.base_url), sample=5, progress=False).to_pandas()
    assert len(out) == 5 and out.index.name == "pair"
    # Each returned row is the input row at that position: its text and its index label agree.
    positions = [df["text"].tolist().index(t) for t in out["text"]]
    assert out.index.tolist() == [df.index[p] for p in positions]
    assert out["completion"].tolist() == answers(out["text"])


# ------------------------------------------------------------------ one job, frames that overlap


def test_overlapping_ids_with_different_prompts_are_each_paid_once(server: FakeServer, workdir: Path) -> None:
    """Two frames share ids 0..49 but not their texts; then a third mixes rows of both."""
    first, second = frame(80, "first"), frame(50, "second")
    mixed = pd.concat([first.iloc[:10], second.iloc[:10]], ignore_index=True)
    job = job_dict(server.base_url, id_column=None)
    for _ in range(2):
        for df in (first, second, mixed):
            out = pipeline.run(df, job, progress=False).to_pandas()
            assert out["completion"].tolist() == answers(df["text"])
    assert server.stats()["requests"] == 130 and server.duplicates() == 0


def test_overlapping_ids_under_an_id_column_answer_each_frame_with_its_own_prompts(
    server: FakeServer, workdir: Path
) -> None:
    a = frame(30, "alpha")
    b = frame(30, "beta").iloc[5:]  # ids 5..29, shared with a, other texts
    job = job_dict(server.base_url, id_column="id")
    for _ in range(2):
        for df in (a, b):
            out = pipeline.run(df, job, progress=False).to_pandas()
            assert out["completion"].tolist() == answers(df["text"])
    assert server.stats()["requests"] == 55 and server.duplicates() == 0


# ------------------------------------------------------------------ a dict job's name


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".hidden", "", " pad", "x\\y", "tab\there", 7, None, "n" * 101])
def test_a_dict_jobs_name_that_cannot_name_a_file_is_refused(server: FakeServer, workdir: Path, name: Any) -> None:
    job = {**job_dict(server.base_url), "name": name}
    with pytest.raises(pipeline.UserError, match="name") as caught:
        pipeline.run(frame(3), job, progress=False)
    assert "\n" not in str(caught.value)
    assert server.stats()["requests"] == 0
    assert not (workdir / "cache" / "journals").exists() or not any((workdir / "cache" / "journals").rglob("*.sqlite"))


@pytest.mark.parametrize("name", ["my job", "spam-v2.1", "résumé_fr"])
def test_a_dict_jobs_plain_name_runs(server: FakeServer, workdir: Path, name: str) -> None:
    job = {**job_dict(server.base_url), "name": name}
    result = pipeline.run(frame(3), job, progress=False)
    assert result.ok and result.summary.job == name
    assert len(list((workdir / "cache" / "journals").glob("*.sqlite"))) == 1


def test_stop_kind_tells_why_a_run_stopped(server: FakeServer, workdir: Path) -> None:
    server.config.price_per_token = 20e-6
    job = job_dict(server.base_url, budget_usd=0.001)
    job["model"] |= {"input_price_per_million": 20.0, "output_price_per_million": 20.0}
    stopped = pipeline.run(frame(40), job, progress=False, canary=False)
    assert stopped.summary.stop_kind == "budget" and stopped.exit_code == 3
    done = pipeline.run(frame(2, "other"), {**job_dict(server.base_url), "name": "other"}, progress=False)
    assert done.summary.stop_kind is None
