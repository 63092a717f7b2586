"""Result columns built without pandas: the same arrays as ``pa.array``, and no pandas import in a CLI run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import arrow_values
from pipeline.io.arrow_values import arrays_from_values
from tests.conftest import ROOT, reviews, write_job, write_parquet
from tests.fakes.server import FakeServer

STR, INT, FLOAT, BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()

CASES: list[tuple[str, list[Any], pa.DataType]] = [
    ("plain text", ["positive", "negative", ""], STR),
    ("nulls everywhere", [None, None], STR),
    ("unicode and escapes", ['é "quoted" \\ back\nslash', "\u2028\u2029", "\x00\x1f", "🙂 emoji", "日本語"], STR),
    ("empty column", [], STR),
    ("token counts", [0, 1, None, 2**63 - 1, -(2**63)], INT),
    ("costs", [0.1 + 0.2, 1.2345678901234567e-06, 5e-324, 1.7976931348623157e308, -0.0, None], FLOAT),
    ("whole-number floats", [1.0, 3.0e-6, 2.0**60], FLOAT),
    ("ints in a float column", [1, 2, None], FLOAT),
    ("flags", [True, False, None], BOOL),
]


@pytest.mark.parametrize(("name", "values", "kind"), CASES, ids=[c[0] for c in CASES])
def test_json_route_gives_what_pa_array_gives(name: str, values: list[Any], kind: pa.DataType) -> None:
    (got,) = arrow_values._by_json([values], [kind])
    expected = pa.array(values, type=kind)
    assert got.type == expected.type
    assert got.equals(expected), name
    if kind == FLOAT:  # bit-exact, including the sign of zero
        assert [math.copysign(1, v) if v == 0 else v for v in got.to_pylist() if v is not None] == [
            math.copysign(1, v) if v == 0 else v for v in values if v is not None
        ]


FALLBACKS: list[tuple[str, list[Any], pa.DataType]] = [
    ("NaN", [math.nan, 1.0], FLOAT),
    ("infinity", [math.inf, -math.inf], FLOAT),
    ("lone surrogate", ["\ud800"], STR),
    ("text in an int column", ["7"], INT),
    ("number in a text column", [7], STR),
    ("bool in an int column", [True], INT),
    ("int beyond int64", [2**64], INT),
    ("nested type", [[1, 2]], pa.list_(INT)),
]


@pytest.mark.parametrize(("name", "values", "kind"), FALLBACKS, ids=[c[0] for c in FALLBACKS])
def test_what_json_cannot_carry_behaves_exactly_like_pa_array(
    name: str, values: list[Any], kind: pa.DataType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "pandas", raising=False)  # take the JSON route first
    try:
        expected: Any = pa.array(values, type=kind)
    except Exception as exc:  # whatever pa.array raises, the same must be raised
        with pytest.raises(type(exc)):
            arrays_from_values([values], [kind])
        return
    (got,) = arrays_from_values([values], [kind])
    assert got.type == expected.type
    assert repr(got.to_pylist()) == repr(expected.to_pylist()), name  # repr: NaN equals NaN


def test_several_columns_keep_their_order_and_length() -> None:
    columns = [["a", None, "c"], [1, 2, None], [None, 0.5, 0.25]]
    got = arrow_values._by_json(columns, [STR, INT, FLOAT])
    assert [a.to_pylist() for a in got] == columns


def test_a_cli_run_never_imports_pandas(server: FakeServer, workdir: Path) -> None:
    """pyarrow imports pandas on its first conversion of Python values: 0.24 s a run does not need."""
    write_parquet(workdir / "data" / "in.parquet", reviews(30))
    write_job(workdir, server.base_url)
    script = textwrap.dedent(
        """
        import sys
        from pipeline.cli.app import main
        code = main(["run", "jobs/job.toml", "--quiet"])
        print("pandas" in sys.modules, code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.stdout.split() == ["False", "0"], done.stderr
    table = pq.read_table(workdir / "data" / "out" / "job.parquet")
    assert table.num_rows == 30 and table.column("error").null_count == 30
    assert pc.sum(table.column("prompt_tokens")).as_py() == server.stats()["prompt_tokens"]
