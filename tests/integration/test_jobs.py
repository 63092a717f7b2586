"""Bad jobs fail before anything is sent: exit 2, one ``pipeline: error:`` line, no traceback.

Every case runs the real CLI (in-process, or as a subprocess for two of them) against
the loopback fake server, and checks that the server received no request at all and
that no journal or output was created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.app import main
from tests.conftest import read_output, reviews, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_reply

SCHEMA_EXTRA = """
[prompt.json_schema]
type = "object"
[prompt.json_schema.properties.summary]
type = "string"
"""


# --------------------------------------------------------------------------- helpers


def run_main(*args: str) -> int:
    """``pipeline run ARGS --quiet`` in this process."""
    return main(["run", *args, "--quiet"])


def error_line(stderr: str) -> str:
    """The single stderr line of a user error, after checking its shape."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {stderr!r}"
    assert lines[0].startswith("pipeline: error: "), lines[0]
    return lines[0]


def assert_user_error(
    code: int, capsys: pytest.CaptureFixture[str], server: FakeServer, workdir: Path, *names: str
) -> str:
    """Exit 2, one error line naming every ``names``, nothing sent, nothing written."""
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}, stderr {err!r}"
    line = error_line(err)
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    assert "Traceback" not in out
    assert server.stats()["requests"] == 0
    assert not (workdir / "data" / "out").exists(), "a bad job must not create a journal or output"
    return line


def good_input(workdir: Path, n: int = 5) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(n))


def edit_job(path: Path, old: str, new: str) -> None:
    """Replace one exact fragment of a job file (it must be there)."""
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in job file"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


# ------------------------------------------------------------------------ job file


def test_job_file_missing(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job path that does not exist is named in the error."""
    code = run_main("jobs/nope.toml")
    assert_user_error(code, capsys, server, workdir, "jobs/nope.toml", "not found")


def test_job_name_missing_names_resolved_path(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipeline run NAME`` looks for jobs/NAME.toml and says so when it is absent."""
    code = run_main("ghost")
    assert_user_error(code, capsys, server, workdir, "jobs/ghost.toml")


def test_invalid_toml(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TOML syntax error names the file and says it is invalid TOML."""
    good_input(workdir)
    (workdir / "jobs" / "broken.toml").write_text('[input\npath = "data/in.parquet"\n', encoding="utf-8")
    code = run_main("broken")
    assert_user_error(code, capsys, server, workdir, "broken.toml", "invalid TOML")


def test_unknown_key(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt key (max_tokenz) is refused and named with its section."""
    good_input(workdir)
    write_job(workdir, server.base_url, model={"max_tokenz": 5})
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "max_tokenz", "[model]")


def test_unknown_section(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A section the schema does not know is refused and named."""
    good_input(workdir)
    path = write_job(workdir, server.base_url)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n[extras]\nfoo = 1\n")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "extras")


def test_wrong_type(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``concurrency = "lots"`` is a type error naming the key."""
    good_input(workdir)
    write_job(workdir, server.base_url, limits={"concurrency": "lots"})
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "concurrency", "[limits]")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("limits", "concurrency", 0), ("model", "max_tokens", -1)],
)
def test_out_of_range(
    section: str, key: str, value: int, server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Values outside their range are refused with the key named."""
    good_input(workdir)
    override: dict[str, Any] = {key: value}
    if section == "limits":
        write_job(workdir, server.base_url, limits=override)
    else:
        write_job(workdir, server.base_url, model=override)
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, key, f"[{section}]")


def test_missing_required_key(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job without ``[prompt] user`` names the missing key."""
    good_input(workdir)
    path = write_job(workdir, server.base_url)
    edit_job(path, 'user = "Summarise in one sentence:\\n\\n{text}"\n', "")
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "[prompt] user")
    assert "missing" in line


def test_authorization_header_refused(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A key written into ``[model] headers`` is refused: keys come from the environment."""
    good_input(workdir)
    write_job(workdir, server.base_url, model={"headers": {"Authorization": "Bearer sk-in-the-file"}})
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "headers", "Authorization")
    assert "sk-in-the-file" not in line


def test_labels_and_json_schema_both_set(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labels and a JSON schema together are refused."""
    good_input(workdir)
    write_job(workdir, server.base_url, prompt_extra='labels = ["a", "b"]\n' + SCHEMA_EXTRA)
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "labels")
    assert "schema" in line.lower()


# ------------------------------------------------------------------------- prompts


def test_template_names_missing_column(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A placeholder for a column the dataset lacks names that column."""
    good_input(workdir)
    write_job(workdir, server.base_url, user="Review: {review_body}")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "review_body")


def test_bad_template_syntax(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unclosed brace is a template error naming ``[prompt] user``."""
    good_input(workdir)
    write_job(workdir, server.base_url, user="Summarise {text")
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "[prompt] user")
    assert "template" in line


def test_structured_column_clashes_with_input(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A labels job over data that already has a ``label`` column must be told to use a prefix."""
    data = reviews(4)
    data["label"] = ["x", "y", "z", "w"]
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(workdir, server.base_url, prompt_extra='labels = ["positive", "negative"]')
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "'label'", "column_prefix")


# --------------------------------------------------------------------------- input


def test_column_name_with_line_break_keeps_error_on_one_line(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spreadsheet header with a line break ("Customer\\nName") must not split the error line."""
    (workdir / "data" / "in.csv").write_text('id,"Customer\nName",text\n1,Bob,hi\n', encoding="utf-8")
    write_job(workdir, server.base_url, input_path="data/in.csv", user="{texts}")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "texts")


def test_input_column_named_like_result_column(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running a job over an earlier output (it has ``completion``) must be refused, not write duplicate columns."""
    data = reviews(3)
    data["completion"] = ["earlier reply a", "earlier reply b", "earlier reply c"]
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(workdir, server.base_url)
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "completion")


def test_missing_input_file(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing dataset names its path."""
    write_job(workdir, server.base_url, input_path="data/absent.parquet")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "data/absent.parquet")


def test_unsupported_input_extension(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that exists but has an unknown extension is named, with the supported ones."""
    (workdir / "data" / "in.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    write_job(workdir, server.base_url, input_path="data/in.xlsx")
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "in.xlsx")
    assert ".parquet" in line


def test_id_column_missing(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An id_column that is not in the data is named."""
    good_input(workdir)
    write_job(workdir, server.base_url, id_column="review_uid")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "review_uid", "id_column")


def test_id_column_duplicates(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Duplicate ids are refused; the message names the column and a duplicated value."""
    write_parquet(
        workdir / "data" / "in.parquet",
        {"rid": ["r-1", "r-2", "dup-42", "r-3", "dup-42"], "text": [f"t{i}" for i in range(5)]},
    )
    write_job(workdir, server.base_url, id_column="rid")
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "'rid'", "dup-42")


def test_id_column_nulls(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Null ids are refused and the column named."""
    write_parquet(workdir / "data" / "in.parquet", {"id": [1, None, 3], "text": ["a", "b", "c"]})
    write_job(workdir, server.base_url)
    code = run_main("job")
    line = assert_user_error(code, capsys, server, workdir, "'id'")
    assert "null" in line


# ---------------------------------------------------------------------------- keys


def test_missing_api_key(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the key's environment variable the run refuses and names the variable."""
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    good_input(workdir)
    write_job(workdir, server.base_url)
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "OPENROUTER_API_KEY")


def test_dry_run_needs_no_key(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dry-run`` works without a key and sends nothing."""
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    good_input(workdir, 3)
    write_job(workdir, server.base_url)
    code = main(["run", "job", "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert out.strip().startswith("{")
    assert server.stats()["requests"] == 0


def test_empty_api_key_env_needs_no_key(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``api_key_env = ""`` runs without any key and sends no Authorization header."""
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    good_input(workdir, 3)
    write_job(workdir, server.base_url, model={"api_key_env": ""})
    code = run_main("job")
    _, err = capsys.readouterr()
    assert code == 0, err
    stats = server.stats()
    assert stats["requests"] == 3
    assert all("Authorization" not in b["headers"] for b in stats["bodies"])


# ----------------------------------------------------------------------- budget


def test_budget_without_price(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget for a model whose price is unknown is refused: it could not be enforced."""
    good_input(workdir)
    write_job(workdir, server.base_url, model={"name": "unknown/model"}, limits={"budget_usd": 1.0})
    code = run_main("job")
    assert_user_error(code, capsys, server, workdir, "budget_usd", "unknown/model")


# ------------------------------------------------------------------- name lookup


def test_run_name_resolves_jobs_folder(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pipeline run NAME`` runs jobs/NAME.toml (and writes that job's output)."""
    good_input(workdir, 4)
    write_job(workdir, server.base_url, name="reviews_nightly")
    code = run_main("reviews_nightly")
    _, err = capsys.readouterr()
    assert code == 0, err
    assert server.stats()["requests"] == 4
    table = read_output(workdir / "data" / "out" / "reviews_nightly.parquet")
    texts = table.column("text").to_pylist()
    expected = [expected_reply(f"Summarise in one sentence:\n\n{t}") for t in texts]
    assert table.column("completion").to_pylist() == expected


# ------------------------------------------------------------ real subprocesses


def test_subprocess_unknown_key_no_traceback(server: FakeServer, workdir: Path) -> None:
    """As a real process: a misspelt key gives exit 2 and one stderr line, no traceback."""
    good_input(workdir)
    write_job(workdir, server.base_url, model={"max_tokenz": 5})
    proc = spawn(workdir, "run", "job")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "max_tokenz" in error_line(err)
    assert "Traceback" not in out
    assert server.stats()["requests"] == 0


def test_subprocess_missing_key_no_traceback(
    server: FakeServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a real process without the key variable: exit 2, the variable named, nothing sent."""
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    good_input(workdir)
    write_job(workdir, server.base_url)
    proc = spawn(workdir, "run", "job")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "OPENROUTER_API_KEY" in error_line(err)
    assert "Traceback" not in out
    assert server.stats()["requests"] == 0
    assert not (workdir / "data" / "out").exists()
