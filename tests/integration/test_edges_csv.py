"""CSV numbers written like ``3.0`` or ``1.50``: the prompt shows the file's text, the output a float.

pandas reads such a column as float64, so a user's ``df.price.mean()`` on the output must
work; the prompt (and the journal key) must still see exactly what the file holds. Text
that pandas would turn into numbers only by changing it (``007``, ``+3``) and the id column
stay text, as they are today.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli, write_job
from tests.fakes.server import FakeServer, last_user_content

ROWS = [
    # id, price, ratio, code, plus, note
    ["1.0", "3.0", "1e3", "007", "+3", "a"],
    ["2.0", "1.50", "2.5", "012", "+4", "b"],
    ["3.5", "", "-0.25", "100", "5", "c"],
]
HEADER = ["id", "price", "ratio", "code", "plus", "note"]


def write_csv(path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(ROWS)


@pytest.mark.parametrize("out", ["parquet", "csv", "jsonl"])
def test_decimal_text_becomes_float_in_the_output_but_not_in_the_prompt(
    workdir: Path, server: FakeServer, out: str
) -> None:
    write_csv(workdir / "data" / "in.csv")
    write_job(
        workdir,
        server.base_url,
        input_path="data/in.csv",
        user="price={price} ratio={ratio} code={code} plus={plus} id={id} note={note}",
        output=f"data/out/job.{out}",
    )
    assert run_cli("job") == 0
    prompts = sorted(last_user_content(b["body"]["messages"]) for b in server.stats()["bodies"])
    assert prompts == sorted(f"price={r[1]} ratio={r[2]} code={r[3]} plus={r[4]} id={r[0]} note={r[5]}" for r in ROWS)
    path = workdir / "data" / "out" / f"job.{out}"
    if out == "parquet":
        table = pq.read_table(path)
        assert table.schema.field("price").type == pa.float64()
        assert table.schema.field("ratio").type == pa.float64()
        assert table.schema.field("code").type == pa.string()
        assert table.schema.field("plus").type == pa.string()
        assert table.schema.field("id").type == pa.string()  # the id column stays text
        df = table.to_pandas()
    elif out == "csv":
        df = pd.read_csv(path, dtype={"id": str, "code": str, "plus": str})
    else:
        df = pd.read_json(io.StringIO(path.read_text()), lines=True, dtype={"id": str, "code": str, "plus": str})
    assert df["price"].tolist()[:2] == [3.0, 1.5] and pd.isna(df["price"].tolist()[2])
    assert df["price"].mean() == pytest.approx(2.25)
    assert df["ratio"].tolist() == [1000.0, 2.5, -0.25]
    assert df["code"].tolist() == ["007", "012", "100"]
    # A rerun finds every row done: typing the output changes no journal key.
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 3
