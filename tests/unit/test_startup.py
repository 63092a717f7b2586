"""Start-up stays light: what ``import pipeline`` and ``pipeline --help`` load.

Each check runs a fresh interpreter and lists the modules it imported; timing
is left to ``benchmarks/`` (a timed test would be flaky on a shared machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def _lookup_in_fresh_interpreter(cache: Path, model: str) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom dataclasses import asdict\nfrom pipeline.engine.price_catalog import catalog_prices\n"
        f"found = catalog_prices({model!r}, 'openrouter')\n"
        "print(json.dumps({'found': found and asdict(found), 'imported': 'genai_prices' in sys.modules}))"
    )
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(cache)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("model", ["mistralai/ministral-8b", "no-such-vendor/no-such-model"])
def test_a_catalog_lookup_is_kept_on_disk_and_the_rerun_skips_the_package(tmp_path: Path, model: str) -> None:
    first = _lookup_in_fresh_interpreter(tmp_path, model)
    assert first["imported"]  # looked up in the snapshot...
    assert list(tmp_path.glob("catalog-*.json"))  # ...and kept, named by the installed version
    second = _lookup_in_fresh_interpreter(tmp_path, model)
    assert second == {"found": first["found"], "imported": False}
    if model.startswith("mistralai/"):
        assert first["found"]["standard"]["input"] is not None


def test_a_corrupt_catalog_cache_reads_as_a_miss(tmp_path: Path) -> None:
    first = _lookup_in_fresh_interpreter(tmp_path, "mistralai/ministral-8b")
    for path in tmp_path.glob("catalog-*.json"):
        path.write_text('{"openrouter\\tmistralai/ministral-8b": {"model_id": 3}}')
    again = _lookup_in_fresh_interpreter(tmp_path, "mistralai/ministral-8b")
    assert again == {"found": first["found"], "imported": True}


def test_prices_that_change_with_the_clock_are_not_kept() -> None:
    from pipeline.engine.price_catalog import _timeless

    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    past = SimpleNamespace(start_date=date(2026, 1, 1))
    later = SimpleNamespace(start_date=date(2026, 7, 1))
    off_peak = SimpleNamespace(start_time=time(16, 30), end_time=time(0, 30))

    def model(*constraints: object, variant: object = None) -> SimpleNamespace:
        prices = [SimpleNamespace(constraint=c) for c in constraints] if constraints else SimpleNamespace()
        return SimpleNamespace(prices=prices, price_variants=[SimpleNamespace(constraint=variant)])

    assert _timeless(model(), now)
    assert _timeless(model(None, past), now)
    assert not _timeless(model(None, later), now)
    assert not _timeless(model(None, off_peak), now)
    assert not _timeless(model(variant=off_peak), now)


@pytest.mark.parametrize(
    "module", ["pipeline.cli.report", "pipeline.config.job", "pipeline.engine.run", "pipeline.engine.plan"]
)
def test_what_a_rerun_imports_loads_no_http_client_and_no_price_catalog(module: str) -> None:
    """A rerun with nothing to send needs neither aiohttp nor genai-prices: both load where first used."""
    loaded = _imported_after(f"import {module}")
    assert not loaded & {"aiohttp", "genai_prices", "tiktoken", "mistral_common", "tokenizers"}, sorted(loaded)
