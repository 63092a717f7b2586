"""Start-up stays light: what ``import pipeline`` and ``pipeline --help`` load.

Each check runs a fresh interpreter and lists the modules it imported; timing
is left to ``benchmarks/`` (a timed test would be flaky on a shared machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("pyarrow", "pandas", "aiohttp", "pydantic", "matplotlib", "ray", "mistral_common", "tiktoken", "jsonschema")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out.strip().splitlines()[-1])}


def test_import_pipeline_loads_no_heavy_library() -> None:
    loaded = _imported_after("import pipeline")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_loads_no_heavy_library() -> None:
    code = "import contextlib, io\nfrom pipeline.cli.app import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    code += "    try:\n        main(['--help'])\n    except SystemExit:\n        pass"
    loaded = _imported_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("name", ["run", "Job", "ExitCode", "Evaluation", "status"])
def test_public_names_resolve_on_first_use(name: str) -> None:
    import pipeline

    assert name in pipeline.__all__
    assert getattr(pipeline, name) is not None


def test_every_public_name_resolves_and_unknown_names_raise() -> None:
    import pipeline

    for name in pipeline.__all__:
        getattr(pipeline, name)
    assert set(pipeline.__all__) <= set(dir(pipeline))
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


def test_help_exits_0_and_lists_the_commands() -> None:
    res = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert all(word in res.stdout for word in ("run", "status", "prices"))
