"""An input file edited while the run is in flight: the output for what was paid, the right row named.

Every row was read (and paid for) before the edit; the output pass reads the
file again and meets a value that no longer converts. The run writes the rows
before it, stops with exit 2 and one line naming the file, the row (counted from
1 as data rows are everywhere else) and what to do; the rerun on the fixed file
pays nothing again. Realtime and batch run as real subprocesses against the
loopback fakes; the Python API runs in process while a thread edits the file.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from tests.conftest import spawn, write_job
from tests.fakes.batch import FakeBatchServer
from tests.fakes.server import FakeServer, expected_reply

OUTPUT = Path("data/out/job.parquet")
ROWS, BAD = 40, 30  # the value at index 30 (row 31) stops converting


def rows(bad: int | None = None, n: int = ROWS) -> list[dict[str, Any]]:
    return [{"id": i, "qty": "many" if i == bad else i, "text": f"review number {i}"} for i in range(n)]


def write_input(path: Path, data: list[dict[str, Any]]) -> None:
    """The file as a whole, replaced at once (as an editor saves it)."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        tmp.write_text("id,qty,text\n" + "".join(f"{r['id']},{r['qty']},{r['text']}\n" for r in data))
    elif path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        # A bad value makes the column text: the file's type changes too.
        text = any(isinstance(r["qty"], str) for r in data)
        qty = pa.array([str(r["qty"]) if text else r["qty"] for r in data])
        ids, texts = pa.array([r["id"] for r in data]), pa.array([r["text"] for r in data])
        pq.write_table(pa.table({"id": ids, "qty": qty, "text": texts}), tmp)
    tmp.replace(path)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) too early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not end: {proc.communicate()[1][-2000:]}") from None
    return proc.returncode, err


def assert_stopped_on_row_31(code: int, err: str, path: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{path}: row {BAD + 1}:" in err, err
    assert "fix the input and rerun" in err, err


def assert_partial_output() -> None:
    out = pq.read_table(OUTPUT).to_pylist()
    assert [r["id"] for r in out] == list(range(BAD)), "the output holds every row before the bad one"
    assert all(r["completion"] and r["error"] is None for r in out)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_realtime_writes_what_was_paid_and_names_the_row(workdir: Path, server: FakeServer, suffix: str) -> None:
    path = workdir / f"data/in{suffix}"
    write_input(path, rows())
    write_job(workdir, server.base_url, input_path=f"data/in{suffix}", user="Summarise {text} ({qty})")
    server.config.latency_s = 0.05
    proc = spawn(workdir, "run", "job", "--quiet", "--no-canary")
    wait_for(lambda: server.stats()["requests"] >= 8, proc)
    write_input(path, rows(bad=BAD))
    code, err = finish(proc)
    paid = server.stats()["requests"]
    assert paid == ROWS, "every row was read before the edit"
    assert_stopped_on_row_31(code, err, f"data/in{suffix}")
    assert_partial_output()
    assert f"the output holds the first {BAD} rows" in err, err
    # Fixed: the rerun writes every row and pays nothing again.
    write_input(path, rows())
    code, err = finish(spawn(workdir, "run", "job", "--quiet"))
    assert code == 0, err
    assert server.stats()["requests"] == ROWS and server.duplicates() == 0
    assert pq.read_table(OUTPUT).num_rows == ROWS


def test_batch_mode_writes_what_was_paid_and_names_the_row(workdir: Path) -> None:
    fake = FakeBatchServer(flavour="openai", complete_after_s=1.5)
    with fake.running():
        path = workdir / "data/in.csv"
        write_input(path, rows())
        spec = {"mode": "batch", "provider": "openai", "batch_poll_s": 0.05}
        write_job(workdir, fake.base_url, input_path="data/in.csv", user="Summarise {text} ({qty})", model=spec)
        proc = spawn(workdir, "run", "job", "--quiet", "--no-canary")
        wait_for(lambda: sum(n for _, n in fake.submissions) == ROWS, proc)
        write_input(path, rows(bad=BAD))
        code, err = finish(proc)
        assert_stopped_on_row_31(code, err, "data/in.csv")
        assert f"the output holds the first {BAD} rows" in err, err
        assert_partial_output()
        write_input(path, rows())
        code, err = finish(spawn(workdir, "run", "job", "--quiet"))
        assert code == 0, err
        assert len(fake.submissions) == 1 and fake.duplicates() == 0
        assert pq.read_table(OUTPUT).num_rows == ROWS


def test_the_python_api_raises_the_same_line_and_the_rerun_pays_nothing(workdir: Path, server: FakeServer) -> None:
    path = workdir / "data/in.csv"
    write_input(path, rows())
    job = {
        "name": "job",
        "input": {"path": "data/in.csv", "id_column": "id"},
        "prompt": {"user": "Summarise {text} ({qty})"},
        "model": {"name": "m", "base_url": server.base_url, "max_tokens": 32},
        "limits": {"requests_per_minute": 60000, "concurrency": 4},
        "output": {"path": str(OUTPUT)},
    }
    server.config.latency_s = 0.05

    def edit() -> None:
        wait_for(lambda: server.stats()["requests"] >= 8)
        write_input(path, rows(bad=BAD))

    editor = threading.Thread(target=edit)
    editor.start()
    try:
        with pytest.raises(pipeline.UserError) as caught:
            pipeline.run(None, job, progress=False, canary=False)
    finally:
        editor.join()
    message = str(caught.value)
    assert "\n" not in message and f"data/in.csv: row {BAD + 1}:" in message, message
    assert "fix the input and rerun" in message
    assert server.stats()["requests"] == ROWS
    assert_partial_output()
    write_input(path, rows())
    result = pipeline.run(None, job, progress=False)
    assert result.ok and len(result.to_pandas()) == ROWS
    assert server.stats()["requests"] == ROWS and server.duplicates() == 0


def test_a_prompt_edited_after_it_was_answered_is_not_written_with_the_old_answer(
    workdir: Path, server: FakeServer
) -> None:
    """Row 3's text changes after it was sent: the output must not pair the new text with the old answer."""
    path = workdir / "data/in.csv"
    write_input(path, rows())
    write_job(workdir, server.base_url, input_path="data/in.csv", user="Summarise {text} ({qty})")
    server.config.latency_s = 0.05
    proc = spawn(workdir, "run", "job", "--quiet", "--no-canary")
    wait_for(lambda: server.stats()["ok"] >= 8, proc)
    edited = rows()
    edited[3]["text"] = "an entirely different review"
    write_input(path, edited)
    code, err = finish(proc)
    assert server.stats()["requests"] == ROWS
    out = pq.read_table(OUTPUT).to_pylist()
    assert out[3]["text"] == "an entirely different review"
    assert out[3]["completion"] is None and out[3]["error"], out[3]
    assert code == 1, err
    # The rerun asks for the new prompt only.
    code, err = finish(spawn(workdir, "run", "job", "--quiet"))
    assert code == 0, err
    assert server.stats()["requests"] == ROWS + 1
    assert pq.read_table(OUTPUT).to_pylist()[3]["completion"] == expected_reply(
        "Summarise an entirely different review (3)"
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_reader_yields_the_rows_before_a_changed_value_and_names_its_row(workdir: Path, suffix: str) -> None:
    """Read in batches of 8: rows 1-30 come out, then the error names row 31 (not the batch's first row)."""
    from pipeline.errors import RecordError
    from pipeline.io.source import Source

    path = workdir / f"data/in{suffix}"
    write_input(path, rows())
    source = Source.open(path, batch_size=8)
    write_input(path, rows(bad=BAD))
    if suffix == ".jsonl":  # blank lines are not rows
        path.write_text(path.read_text().replace("\n", "\n\n", 5))
    seen: list[int] = []
    with pytest.raises(RecordError) as caught:
        for batch in source.batches():
            seen += batch.column("id").to_pylist()
    assert seen == list(range(BAD))
    assert caught.value.row == BAD + 1 and f"row {BAD + 1}:" in str(caught.value)
