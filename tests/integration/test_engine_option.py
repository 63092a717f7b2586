"""``--engine``, ``--workers`` and ``--address`` on the command line (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.engine.drivers.ray import cluster as ray_engine
from tests.conftest import reviews, run_cli, write_job, write_parquet
from tests.fakes.server import FakeServer


@pytest.mark.parametrize("flags", [["--workers", "2"], ["--address", "127.0.0.1:6379"]])
def test_ray_flags_need_the_ray_engine(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url or "")
    assert run_cli("job", *flags) == 2
    assert "go with --engine ray" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


def test_ray_engine_without_ray_installed(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_engine, "ray_available", lambda: False)
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url or "")
    assert run_cli("job", "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert "pip install 'pipeline[ray]'" in err and err.count("\n") == 1
    assert server.stats()["requests"] == 0
    assert not (workdir / "data" / "out" / "job.parquet.journal.sqlite").exists()


@pytest.mark.parametrize(
    ("limits", "model", "message"),
    [
        ({"requests_per_minute": "auto"}, {}, 'requests_per_minute = "auto" is learned by one process'),
        ({"tokens_per_minute": "auto"}, {}, 'tokens_per_minute = "auto" is learned by one process'),
        ({}, {"mode": "batch"}, "--engine ray sends rows in realtime"),
    ],
)
def test_ray_engine_refuses_what_it_cannot_keep(
    workdir: Path,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    limits: dict[str, object],
    model: dict[str, object],
    message: str,
) -> None:
    """Checked before Ray starts: exit 2, one line, nothing sent."""
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url or "", limits=limits, model=model)
    assert run_cli("job", "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert server.stats()["requests"] == 0
