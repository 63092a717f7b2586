"""The command line: ``pipeline run | status | eval | report | prices``.

``asyncio.run`` is called only by the front ends: here and in the Python
API's synchronous functions (:mod:`pipeline.api`); the engine never starts a
loop.

Exit codes: 0 every row succeeded; 1 finished, some rows failed; 2 usage,
job or input error (nothing sent); 3 stopped early, resumable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sqlite3
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.cli.signals import STOP_SIGNALS
from pipeline.errors import ExitCode, JobError, PipelineError, UserError
from pipeline.secrets import Redactor, looks_like_key

# Everything heavier (pydantic, pyarrow, aiohttp) is imported where a command needs
# it: `pipeline --help` and a rerun with nothing to do start in a fraction of a second.
if TYPE_CHECKING:
    from pipeline.config.job import Job
    from pipeline.engine.drivers.ray.cluster import RaySettings
    from pipeline.engine.plan import Plan
    from pipeline.engine.session import RunOptions, RunResult
    from pipeline.io.fs import DataPath

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_STOPPED = (
    ExitCode.OK,
    ExitCode.ROWS_FAILED,
    ExitCode.USAGE,
    ExitCode.STOPPED,
)
DEFAULT_KEY_ENV = "OPENROUTER_API_KEY"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error can be raised as a :class:`UserError` (for ``--json``) instead of exiting."""

    raise_errors = False

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise UserError(f"{self.prog}: {message}")
        super().error(message)


def build_parser(*, raise_errors: bool = False) -> argparse.ArgumentParser:
    """The parser; ``raise_errors``: a usage error raises ``UserError`` instead of printing usage and exiting."""

    class Parser(_Parser):
        pass

    Parser.raise_errors = raise_errors  # this call's parser and its subcommands' (argparse builds them of its class)
    parser = Parser(prog="pipeline", description="Run batches of LLM requests over datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (resumes where the last run stopped)")
    run.add_argument("job", help="a job file, or a name in jobs/ (NAME means jobs/NAME.toml)")
    run.add_argument("--dry-run", action="store_true", help="count tokens and cost; send nothing, need no key")
    run.add_argument("--sample", type=_positive, metavar="N", help="send N random rows and extrapolate the cost")
    run.add_argument("--json", action="store_true", help="print the report or summary as one JSON object")
    run.add_argument("--quiet", action="store_true", help="print only errors (for cron)")
    run.add_argument("--fresh", action="store_true", help="start over: set the old journal aside")
    run.add_argument("--retry-failed", action="store_true", help="also retry rows that failed permanently")
    run.add_argument("--output", metavar="PATH", help="write the output here instead of [output] path")
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="batch mode: submit, collect what has finished, write the output, exit 3 while batches are pending",
    )
    run.add_argument(
        "--no-canary",
        action="store_true",
        help="send every row at once, without judging a first slice of them (the canary) before the rest",
    )
    run.add_argument(
        "--engine", choices=("default", "ray"), default="default", help="send from this process, or from Ray workers"
    )
    run.add_argument("--workers", type=_positive, metavar="N", help="--engine ray: worker actors (default 2)")
    run.add_argument("--address", metavar="ADDR", help="--engine ray: join this Ray cluster (default: start one)")
    status = sub.add_parser("status", help="show a job's progress from its journal")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    _add_eval_commands(sub)
    prices = sub.add_parser("prices", help="show or refresh the price table")
    prices.add_argument("model", nargs="?", help="show one model (without it: list the known models)")
    prices.add_argument("--refresh", action="store_true", help="fetch prices from OpenRouter into the local cache")
    prices.add_argument("--base-url", help="default: OpenRouter's API")
    return parser


def _add_eval_commands(sub: argparse._SubParsersAction[Any]) -> None:
    ev = sub.add_parser("eval", help="score the job's answers against a gold column; compare [[variants]]")
    ev.add_argument("job", help="a job file, or a name in jobs/")
    ev.add_argument("--gold", required=True, metavar="COLUMN", help="the input column holding the right answers")
    ev.add_argument("--sample", type=_positive, metavar="N", help="evaluate N random rows with a gold label")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    ev.add_argument("--field", metavar="NAME", help="the schema property to compare (default: label)")
    ev.add_argument("--min-accuracy", type=float, metavar="A", help="recommend the cheapest variant this accurate")
    ev.add_argument("--fresh", action="store_true", help="start over: set the old journals aside")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    report = sub.add_parser("report", help="write an HTML page with charts of the job's journal")
    report.add_argument("job", help="a job file, or a name in jobs/")
    report.add_argument("--json", action="store_true", help="print one JSON object")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (not a caller passing arguments): the process is ours
        # Its own models (the job file) use no pydantic plugin, and looking plugins up scans
        # every installed package's entry points: 0.02 s of every command. An explicit
        # PYDANTIC_DISABLE_PLUGINS (even empty) is kept.
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    argv = sys.argv[1:] if argv is None else argv
    # Known before parsing, so that a usage error is answered in JSON too: with
    # --json, stdout holds exactly one JSON object on every exit (cron parses it).
    as_json = "--json" in argv
    errors = _ErrorPrinter(as_json)
    try:
        args = build_parser(raise_errors=as_json).parse_args(argv)
        return _dispatch(args, errors)
    except UserError as exc:
        return errors.fail(str(exc), EXIT_USAGE)
    except PipelineError as exc:
        return errors.fail(str(exc), exc.exit_code)
    except sqlite3.Error as exc:
        return errors.fail(f"journal error: {exc}", EXIT_STOPPED)
    except KeyboardInterrupt:
        return errors.fail("interrupted", EXIT_STOPPED)
    except Exception as exc:  # a bug: keep the traceback, but a script still gets its one JSON object
        if as_json:
            errors.fail(f"internal error: {type(exc).__name__}: {exc}", ExitCode.ROWS_FAILED)
        raise


class _ErrorPrinter:
    """Prints an error as one line, with the job's key (once known) and any bearer token masked.

    The line goes to stderr always (``--quiet`` promises errors); with ``--json``
    stdout also gets ``{"error": ..., "exit_code": N}``, the command's one JSON object.
    """

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self.redactor = Redactor(os.environ.get(DEFAULT_KEY_ENV))

    def use_job(self, job: Job) -> None:
        env = job.model.api_key_env
        # A value that looks like a key where the variable's name belongs is masked too.
        self.redactor = Redactor(os.environ.get(env) if env else None, env if env and looks_like_key(env) else None)

    def fail(self, message: str, code: int) -> int:
        # One line, whatever the message quotes (a column name may hold a line break).
        text = self.redactor.redact(" ".join(message.split()))
        if self.as_json:
            print(json.dumps({"error": text, "exit_code": int(code)}))
        print(f"pipeline: error: {text}", file=sys.stderr)
        return int(code)


def _dispatch(args: argparse.Namespace, errors: _ErrorPrinter) -> int:
    if args.command == "prices":
        return _prices(args)
    from pipeline.config.job import load_job

    job = load_job(args.job)
    errors.use_job(job)
    _require_files(job)
    if args.command == "status":
        return _status(job, args.json)
    if args.command in ("eval", "report"):
        from pipeline.cli.evaluation import eval_command, report_command

        return eval_command(job, args) if args.command == "eval" else report_command(job, args)
    if args.engine != "ray" and (args.workers or args.address):
        raise UserError("--workers and --address go with --engine ray")
    if args.engine == "ray":
        from pipeline.api import check_workers

        check_workers(args.workers, args.address)
    if args.dry_run:
        return _dry_run(job, args.json)
    return _run(job, args)


def _require_files(job: Job) -> None:
    """A job run from the command line reads a file and writes one (the Python API need not)."""
    if job.input.path is None:
        raise JobError(f"jobs/{job.name}: [input] path: required key is missing")
    if job.output.path is None:
        raise JobError(f"jobs/{job.name}: [output] path: required key is missing")


def _check_mode(job: Job, args: argparse.Namespace) -> None:
    batch = job.model.mode == "batch"
    if args.no_wait and not batch:
        raise JobError('--no-wait applies to batch mode only: set [model] mode = "batch"')
    if args.sample and batch:
        raise JobError('--sample sends rows in realtime: run it without [model] mode = "batch", or use --dry-run')
    if args.engine == "ray" and batch:
        raise JobError('--engine ray sends rows in realtime: run it without [model] mode = "batch"')


def _output(args: argparse.Namespace) -> DataPath | None:
    """``--output`` moves the output file only: the journal, lock and budget stay the job's.

    It takes what ``[output] path`` takes: a local path or an s3:// URI.
    """
    if not getattr(args, "output", None):
        return None
    from pipeline.io.fs import parse_data_path

    try:
        return parse_data_path(args.output)
    except ValueError as exc:
        raise JobError(f"--output: {exc}") from None


def _status(job: Job, as_json: bool) -> int:
    from pipeline.cli.status import format_status
    from pipeline.engine.status import job_status

    assert job.output.journal_path is not None, "the CLI requires [output] path"
    status = job_status(job, job.output.journal_path)
    print(json.dumps(status.to_dict()) if as_json else format_status(status))
    return EXIT_OK


def _dry_run(job: Job, as_json: bool) -> int:
    from pipeline.engine.estimate import dry_run, format_report
    from pipeline.engine.plan import prepare

    report = dry_run(prepare(job, need_key=False))
    print(json.dumps(report.to_dict()) if as_json else format_report(report))
    return EXIT_OK


def _run(job: Job, args: argparse.Namespace) -> int:
    from pipeline.cli.loop import run_async
    from pipeline.cli.report import print_summary
    from pipeline.engine.plan import prepare
    from pipeline.engine.session import RunOptions

    _check_mode(job, args)
    plan = prepare(job, output=_output(args))
    _tune_gc()
    options = RunOptions(
        quiet=args.quiet,
        fresh=args.fresh,
        retry_failed=args.retry_failed,
        sample=args.sample,
        wait=not args.no_wait,
        canary=not args.no_canary,
    )
    if args.engine == "ray":
        from pipeline.engine.drivers.ray.cluster import DEFAULT_WORKERS, RaySettings

        settings = RaySettings(args.workers or DEFAULT_WORKERS, args.address)
        # Ray prints some messages (a worker died, ...) on stdout; stdout is for the summary.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_async(_with_signals(plan, options, settings))
    else:
        result = run_async(_with_signals(plan, options))
    print_summary(plan, result, args)
    return result.exit_code


async def _with_signals(plan: Plan, options: RunOptions, ray: RaySettings | None = None) -> RunResult:
    """Run with Ctrl-C, SIGTERM and SIGHUP turned into a graceful stop (twice: at once)."""
    import asyncio

    from pipeline.engine.run import run_plan
    from pipeline.engine.session import Controls

    controls = Controls()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, controls.stop, f"interrupted by {sig.name}")
    try:
        return await run_plan(plan, options, controls, ray)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _tune_gc() -> None:
    """Keep the garbage collector off the hot path of a long run.

    Profiling showed a sizeable share of a fast run's CPU in collections that
    walk every object of the imported libraries (pyarrow, pydantic, aiohttp):
    freezing them moves them out of the collector's view, and a larger first
    generation means fewer collections among the per-request objects, which
    rarely form cycles.
    """
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _prices(args: argparse.Namespace) -> int:
    from pipeline.cli.loop import run_async
    from pipeline.cli.prices import format_model_prices, format_price_table
    from pipeline.engine.pricing import known_models, model_info, refresh_prices

    if args.refresh:
        from pipeline.config.job import DEFAULT_BASE_URL

        base_url = args.base_url or DEFAULT_BASE_URL
        path, count = run_async(refresh_prices(base_url))
        print(f"refreshed prices of {count} models from {base_url} into {path}")
    if args.model:
        info = model_info(args.model)
        if info.input_per_million is None or info.output_per_million is None:
            raise UserError(
                f"unknown model {args.model!r}: not in the price cache, the genai-prices catalog or the built-in "
                "table (`pipeline prices` lists the known models; `pipeline prices --refresh` fetches OpenRouter's "
                "list; a job sets [model] input_price_per_million and output_price_per_million)"
            )
        print(format_model_prices(info))
    elif not args.refresh:
        print(format_price_table(known_models()))
    return EXIT_OK
