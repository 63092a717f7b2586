"""The report pages on a phone, in a real browser: no sideways scrolling at 375 px.

Headless Chromium will not make its window narrower than 500 px, so each page
is shown in an iframe 375 px wide (a phone's viewport). A script added to the
page posts its document's ``scrollWidth`` and ``clientWidth`` to the outer
page, which ``--dump-dom`` prints: equal widths mean nothing sticks out.
Skipped where Chromium is not installed (``apt-get install chromium``); the
CSS contract itself is checked without a browser in
``tests/unit/test_report_charts.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.app import main
from tests.conftest import write_job, write_parquet
from tests.fakes.server import FakeServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")

PHONE_PX = 375
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
PROBE = (
    "<script>addEventListener('load', () => { const e = document.documentElement;"
    " parent.postMessage(e.scrollWidth + 'x' + e.clientWidth, '*'); });</script>"
)
OUTER = (
    "<!DOCTYPE html><html><body style='margin:0'>"
    "<iframe src='page.html' style='width:{width}px;height:800px;border:0'></iframe>"
    "<script>addEventListener('message', m => document.body.setAttribute('data-probe', m.data));</script>"
    "</body></html>"
)


def widths_on_a_phone(html: str) -> tuple[int, int]:
    """(scrollWidth, clientWidth) of the page's document in a 375 px viewport."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "page.html").write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        outer = Path(tmp) / "outer.html"
        outer.write_text(OUTER.format(width=PHONE_PX), encoding="utf-8")
        done = subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp}/profile", "--window-size=800,900",
             "--virtual-time-budget=5000", "--dump-dom", outer.as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    found = re.search(r'data-probe="(\d+)x(\d+)"', done.stdout)
    assert found, f"the page reported no widths: {done.stderr[-500:]}"
    return int(found.group(1)), int(found.group(2))


def test_the_probe_sees_a_page_that_is_too_wide() -> None:
    """The measurement can fail: a 480 px wide block makes the page scroll sideways."""
    scroll, client = widths_on_a_phone("<html><body><div style='width:480px'>wide</div></body></html>")
    assert client == PHONE_PX and scroll > PHONE_PX


def test_report_and_evaluation_pages_fit_a_phone(workdir: Path, capsys: Any) -> None:
    labels = ["positive", "negative", "neutral"]
    long_word = "a-very-long-unbroken-word-" * 6
    rows = {
        "id": list(range(90)),
        "text": [f"item {i}: this one is {labels[i % 3]} {long_word if i % 10 == 0 else ''}" for i in range(90)],
        "gold": [labels[(i + (i % 4 == 0)) % 3] for i in range(90)],
    }
    write_parquet(workdir / "data/in.parquet", rows)
    server = FakeServer(label_mode="text")
    with server.running():
        server.config.script = {"item 4:": ["400"]}
        write_job(workdir, server.base_url, user="Classify: {text}", prompt_extra=f"labels = {json.dumps(labels)}")
        job = workdir / "jobs/job.toml"
        job.write_text(
            job.read_text()
            + '\n[[variants]]\nname = "ministral-8b-with-a-rather-long-variant-name"\n'
            + '\n[[variants]]\nname = "ministral-3b"\nmodel = { name = "mistralai/ministral-3b" }\n'
        )
        assert main(["run", "job", "--quiet"]) == 1
        assert main(["report", "job", "--json"]) == 0
        report = Path(json.loads(capsys.readouterr().out)["report"])
        assert main(["eval", "job", "--gold", "gold", "--json"]) == 0
        evaluation = Path(json.loads(capsys.readouterr().out)["report"])
    for page in (report, evaluation):
        scroll, client = widths_on_a_phone(page.read_text(encoding="utf-8"))
        assert (scroll, client) == (PHONE_PX, PHONE_PX), f"{page.name} scrolls sideways on a phone"
