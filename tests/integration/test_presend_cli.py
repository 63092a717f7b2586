"""Every pre-send failure, as a real process: exit 2, exactly one stderr line, no traceback, nothing sent.

Each case builds its own project folder and runs ``python -m pipeline`` in it
against one loopback server; the processes run side by side to keep the test
short, and the server's request count proves that none of them sent anything.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import TEST_KEY, reviews, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer

LOOKS_LIKE_A_KEY = "sk-or-v1-feedfacecafe0123456789abcdef"


@dataclass
class Case:
    name: str
    setup: Callable[[Path, str], None]  # (project folder, server base URL)
    expected: list[str]  # texts the one stderr line must hold
    args: list[str] = field(default_factory=lambda: ["run", "job"])
    env: dict[str, str] = field(default_factory=dict)
    never: list[str] = field(default_factory=list)  # texts that must not appear anywhere


def parquet_in(d: Path) -> None:
    write_parquet(d / "data" / "in.parquet", reviews(4))


def add_to_section(d: Path, section: str, line: str) -> None:
    job = d / "jobs" / "job.toml"
    job.write_text(job.read_text().replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))


def folder_type_conflict(d: Path, url: str) -> None:
    write_parquet(d / "data" / "parts" / "a.parquet", {"id": [1, 2], "text": ["a", "b"]})
    write_parquet(d / "data" / "parts" / "b.parquet", {"id": ["3", "4"], "text": ["c", "d"]})
    write_job(d, url, input_path="data/parts")


def csv_bad_utf8(d: Path, url: str) -> None:
    (d / "data" / "in.csv").write_bytes(b"id,text,note\n1,a,x\n2,b,y\n3,c,caf\xe9\n")
    write_job(d, url, input_path="data/in.csv")


def jsonl_bad_utf8(d: Path, url: str) -> None:
    (d / "data" / "in.jsonl").write_bytes(b'{"id": 1, "text": "a"}\n{"id": 2, "text": "\xff"}\n')
    write_job(d, url, input_path="data/in.jsonl")


def jsonl_id_type_change(d: Path, url: str) -> None:
    lines = [json.dumps({"id": i, "text": f"t{i}"}) for i in range(50)] + [json.dumps({"id": "x", "text": "u"})]
    (d / "data" / "in.jsonl").write_text("\n".join(lines) + "\n")
    write_job(d, url, input_path="data/in.jsonl")


def csv_duplicate_columns(d: Path, url: str) -> None:
    (d / "data" / "in.csv").write_text("id,text,id\n1,a,2\n")
    write_job(d, url, input_path="data/in.csv")


def binary_ids(d: Path, url: str) -> None:
    table = pa.table({"id": pa.array([b"ok", b"\xc3\x28"], pa.binary()), "text": ["a", "b"]})
    pq.write_table(table, d / "data" / "in.parquet")
    write_job(d, url)


def typed_ids(kind: pa.DataType, values: list[object]) -> Callable[[Path, str], None]:
    def setup(d: Path, url: str) -> None:
        pq.write_table(pa.table({"id": pa.array(values, kind), "text": ["a", "b"]}), d / "data" / "in.parquet")
        write_job(d, url)

    return setup


def forced_dtype_misfit(d: Path, url: str) -> None:
    (d / "data" / "in.csv").write_text("id,text,zip\n1,a,02139\n2,b,none\n")
    write_job(d, url, input_path="data/in.csv")
    add_to_section(d, "input", 'dtypes = { zip = "int64" }')


def job_with(output: str | None = None, **model: object) -> Callable[[Path, str], None]:
    def setup(d: Path, url: str) -> None:
        parquet_in(d)
        write_job(d, url, output=output, model=model or None)

    return setup


def output_is_folder(d: Path, url: str) -> None:
    (d / "data" / "out" / "job.parquet").mkdir(parents=True)
    job_with()(d, url)


def output_under_file(d: Path, url: str) -> None:
    (d / "data" / "blocked").write_text("a file")
    job_with("data/blocked/job.parquet")(d, url)


def journal_unwritable(d: Path, url: str) -> None:
    job_with()(d, url)
    add_to_section(d, "output", 'journal = "/sys/job.journal.sqlite"')


def edit_job(old: str, new: str) -> Callable[[Path, str], None]:
    def setup(d: Path, url: str) -> None:
        job_with()(d, url)
        job = d / "jobs" / "job.toml"
        text = job.read_text()
        assert old in text, old
        job.write_text(text.replace(old, new, 1))

    return setup


CASES = [
    Case("folder types", folder_type_conflict, ["'id'", "a.parquet", "b.parquet"]),
    Case("csv utf-8", csv_bad_utf8, ["in.csv", "line 4", "UTF-8"]),
    Case("jsonl utf-8", jsonl_bad_utf8, ["in.jsonl", "line 2", "UTF-8"]),
    Case("jsonl id type", jsonl_id_type_change, ["in.jsonl", "'id'", "line 51"]),
    Case("csv duplicate names", csv_duplicate_columns, ["'id'", "twice"]),
    Case("binary ids", binary_ids, ["[input] id_column", "not UTF-8"]),
    Case("list ids", typed_ids(pa.list_(pa.int64()), [[1], [2]]), ["[input] id_column", "list"]),
    Case("struct ids", typed_ids(pa.struct([("a", pa.int64())]), [{"a": 1}, {"a": 2}]), ["[input] id_column"]),
    Case("forced dtype", forced_dtype_misfit, ["[input] dtypes", "'zip'", "'none'"]),
    Case("unknown dtype", edit_job("[input]\n", '[input]\ndtypes = { text = "varchar" }\n'), ["[input] dtypes"]),
    Case("output extension", job_with("data/out/job.txt"), ["[output] path", ".txt"]),
    Case("output folder", output_is_folder, ["[output] path", "is a folder"]),
    Case("output under a file", output_under_file, ["[output] path", "is a file"]),
    Case("output unwritable", job_with("/sys/job.parquet"), ["[output] path", "not writable"]),
    Case("journal unwritable", journal_unwritable, ["[output] journal", "not writable"]),
    Case("authorization header", job_with(headers={"Authorization ": "Bearer sk-in-file-123"}), ["headers"]),
    Case(
        "key with newline",
        job_with(),
        ["OPENROUTER_API_KEY", "line break"],
        env={"OPENROUTER_API_KEY": "sk-first-half\nsk-second-half"},
        never=["first-half", "second-half"],
    ),
    Case(
        "key in api_key_env",
        job_with(api_key_env=LOOKS_LIKE_A_KEY),
        ["api_key_env should name an environment variable, not hold the key"],
        never=[LOOKS_LIKE_A_KEY, "feedface"],
    ),
    Case("empty input path", edit_job('path = "data/in.parquet"', 'path = ""'), ["[input] path", "empty"]),
    Case("boolean concurrency", edit_job("concurrency = 8", "concurrency = true"), ["[limits] concurrency"]),
    Case("fraction concurrency", edit_job("concurrency = 8", "concurrency = 2.5"), ["[limits] concurrency"]),
    Case("unknown model price", lambda d, url: None, ["unknown model"], args=["prices", "nobody/none"]),
]


@pytest.mark.slow  # about 20 processes, run side by side
def test_every_presend_failure_is_exit_2_one_line(server: FakeServer, tmp_path: Path) -> None:
    assert server.base_url is not None
    runs: list[tuple[Case, subprocess.Popen[str]]] = []
    for i, case in enumerate(CASES):
        folder = tmp_path / f"case{i:02d}"
        (folder / "data").mkdir(parents=True)
        (folder / "jobs").mkdir()
        case.setup(folder, server.base_url)
        env = {"OPENROUTER_API_KEY": TEST_KEY, "PIPELINE_CACHE_DIR": str(folder / "cache"), **case.env}
        runs.append((case, spawn(folder, *case.args, env=env)))
    problems = []
    for case, proc in runs:
        out, err = proc.communicate(timeout=120)
        lines = err.splitlines()
        everything = out + err
        if proc.returncode != 2:
            problems.append(f"{case.name}: exit {proc.returncode}: {err[-500:]}")
        elif len(lines) != 1 or not lines[0].startswith("pipeline: error: "):
            problems.append(f"{case.name}: stderr is not one error line: {err[-500:]!r}")
        elif "Traceback" in everything:
            problems.append(f"{case.name}: traceback")
        else:
            missing = [text for text in case.expected if text not in lines[0]]
            leaked = [text for text in [TEST_KEY, *case.never] if text in everything]
            if missing or leaked:
                problems.append(f"{case.name}: missing {missing}, leaked {leaked}: {lines[0]}")
    assert problems == []
    assert server.stats()["requests"] == 0
