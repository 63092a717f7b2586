"""Everything checked before the first request: the run's plan.

A plan is built from a job file and the dataset's metadata. Every user
mistake (missing file, unknown column, duplicate ids, missing key, a budget
without prices) is raised here as a one-line UserError, so a bad job never
sends anything.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config.job import Job, identity_hash
from pipeline.engine.pricing import ModelInfo, default_cache_dir, model_info
from pipeline.engine.prompts import PromptRenderer, RenderedBatch, require_text_columns
from pipeline.engine.tokens import TokenCounter, counter_for
from pipeline.errors import InputError, JobError, JournalError
from pipeline.io import fs
from pipeline.io.base import DataSource
from pipeline.io.fs import DataPath
from pipeline.io.output import OUTPUT_FORMATS, RESULT_COLUMNS, check_journal_location, check_output_location
from pipeline.io.source import Source, check_id_column, row_keys
from pipeline.providers import provider_for
from pipeline.providers.dialect import Dialect
from pipeline.providers.provider import Provider
from pipeline.secrets import key_from_environment
from pipeline.store.journal import read_meta
from pipeline.store.meta import Meta

if TYPE_CHECKING:
    from pipeline.structured import StructuredSpec

# Tokens a chat template can add around the messages: an upper bound used to
# skip tokenizing prompts that obviously fit the context window.
TEMPLATE_SLACK = 16


class KeyScheme(StrEnum):
    """How a row is identified in the journal, so a rerun knows what is done."""

    ID = "id"  # the id column's value, as text
    CONTENT = "content"  # the rendered prompt, plus its occurrence number among equal prompts
    ROW_NUMBER = "row_number"  # journals written before content keys, without an id column


@dataclass
class Plan:
    job: Job
    source: DataSource
    renderer: PromptRenderer
    structured: StructuredSpec | None
    info: ModelInfo
    model_name: str
    total_rows: int
    api_key: str | None
    journal_path: Path
    output_path: DataPath | None  # None: the Python API assembles a table in memory
    key_scheme: KeyScheme = KeyScheme.CONTENT

    @cached_property
    def provider(self) -> Provider:
        return provider_for(self.job.model)

    @cached_property
    def context_length(self) -> int | None:
        if self.job.model.context_length:
            return self.job.model.context_length
        return self.provider.context_length(self.job.model) or self.info.context_length

    @cached_property
    def counter(self) -> TokenCounter:
        return counter_for(self.model_name)

    def dialect(self, base_url: str | None = None) -> Dialect:
        spec = self.job.model
        if base_url is not None:
            spec = spec.model_copy(update={"base_url": base_url})
        provider = self.provider
        fields = provider.structured_fields(copy.deepcopy(self.structured.schema)) if self.structured else {}
        return Dialect(spec, self.model_name, fields, provider, cache_key=f"pipeline-{self.identity_hash}")

    def identity(self) -> dict[str, Any]:
        return self.job.identity(self.structured.identity() if self.structured else None, self.provider.name)

    @property
    def identity_hash(self) -> str:
        return identity_hash(self.identity())

    def worst_cost(self, prompt_tokens: int) -> float | None:
        """The most a request can cost: its prompt plus a full ``max_tokens`` reply."""
        return self.info.cost(prompt_tokens, self.job.model.max_tokens)

    def batches(self) -> Iterator[tuple[pa.RecordBatch, list[str], RenderedBatch]]:
        """Input batches with their row keys and rendered prompts."""
        occurrences: dict[str, int] = {}
        offset = 0
        for batch in self.source.batches():
            rendered = self.renderer.render(batch)
            yield batch, self._keys(batch, rendered, offset, occurrences), rendered
            offset += batch.num_rows

    def keyed_batches(self) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
        """Input batches with their row keys (rendering prompts only where keys need them)."""
        if self.key_scheme == KeyScheme.CONTENT:
            for batch, keys, _ in self.batches():
                yield batch, keys
            return
        offset = 0
        for batch in self.source.batches():
            yield batch, self._keys(batch, None, offset, {})
            offset += batch.num_rows

    def _keys(
        self, batch: pa.RecordBatch, rendered: RenderedBatch | None, offset: int, occurrences: dict[str, int]
    ) -> list[str]:
        if self.key_scheme == KeyScheme.ID:
            return row_keys(batch, self.job.input.id_column, offset)
        if self.key_scheme == KeyScheme.ROW_NUMBER or rendered is None:
            return row_keys(batch, None, offset)
        return content_keys(rendered, occurrences)

    def input_changed(self) -> bool:
        """True when the input file was written since the plan opened it (an in-memory input never is)."""
        return isinstance(self.source, Source) and self.source.changed()

    def fits_without_counting(self, rendered: RenderedBatch, i: int) -> bool:
        return fits_without_counting(rendered, i, self.context_length, self.job.model.max_tokens)


def fits_without_counting(rendered: RenderedBatch, i: int, context_length: int | None, max_tokens: int) -> bool:
    """True when a prompt surely fits the context window without tokenizing it.

    Byte-level BPE never makes more tokens than UTF-8 bytes, and a character
    is at most 4 bytes: the cheap character bound settles almost every row.
    """
    if context_length is None:
        return True
    budget = context_length - max_tokens - TEMPLATE_SLACK
    chars = len(rendered.users[i]) + (len(rendered.systems[i]) if rendered.systems is not None else 0)
    if 4 * chars <= budget:
        return True
    size = len(rendered.users[i].encode())
    if rendered.systems is not None:
        size += len(rendered.systems[i].encode())
    return size <= budget


def content_keys(rendered: RenderedBatch, occurrences: dict[str, int]) -> list[str]:
    """Keys that survive inserted and deleted rows: the prompt's hash, numbered among equal prompts.

    ``occurrences`` counts the prompts seen so far in this pass over the input.
    """
    keys = []
    for i in range(len(rendered.users)):
        h = rendered.prompt_hash(i)
        n = occurrences.get(h, 0) + 1
        occurrences[h] = n
        keys.append(h if n == 1 else f"{h}#{n}")
    return keys


def prepare(
    job: Job,
    *,
    need_key: bool = True,
    data: Any = None,
    output: DataPath | None = None,
    journal: Path | None = None,
) -> Plan:
    """Validate the job against its dataset and environment; nothing is sent.

    ``data`` (Python API) replaces ``[input] path``; ``output`` replaces
    ``[output] path`` for this run only (the journal stays the job's);
    ``journal`` overrides where the journal lives.
    """
    provider = provider_for(job.model)  # first: an unknown provider is a job error, whatever the data
    source = _open_source(job, data)
    renderer = PromptRenderer(job.prompt.user, job.prompt.system)
    renderer.check_columns(source.columns, str(source.path))
    require_text_columns(renderer, source.schema)
    check_result_column_clash(source)
    output_path = output or job.output.path
    if output_path is not None:
        check_output_path(source.path, output_path)
        if not fs.is_uri(output_path):
            check_output_location(Path(output_path))
    structured = _structured_spec(job)
    if structured is not None:
        structured.check_clashes(source.columns)
    id_column = job.input.id_column
    total = check_id_column(source, id_column) if id_column else source.count_rows()
    model_name = provider.model_name(job.model)
    info = model_info(
        model_name,
        free=provider.free,
        input_price=job.model.input_price_per_million,
        output_price=job.model.output_price_per_million,
        cached_input_price=job.model.cached_input_price_per_million,
        cache_write_price=job.model.cache_write_price_per_million,
        provider=provider.name,
        service_tier=job.model.service_tier,
    )
    if job.limits.budget_usd is not None and (info.input_per_million is None or info.output_per_million is None):
        raise JobError(
            f"[limits] budget_usd: no price known for model {model_name!r}: set [model] "
            "input_price_per_million and output_price_per_million, or run `pipeline prices --refresh`"
        )
    api_key = _api_key(job) if need_key and provider.needs_key else None
    plan = Plan(job, source, renderer, structured, info, model_name, total, api_key, Path(), output_path)
    plan.journal_path = journal or job.output.journal_path or _cached_journal(job, plan.identity_hash)
    check_journal_location(plan.journal_path)
    plan.key_scheme = KeyScheme.ID if id_column else stored_key_scheme(plan.journal_path)
    return plan


def _open_source(job: Job, data: Any) -> DataSource:
    if data is None or isinstance(data, (str, Path)):
        path = fs.parse_data_path(data) if data is not None else job.input.path
        if path is None:
            raise JobError("[input] path: required key is missing (or pass data to pipeline.run)")
        ids = (job.input.id_column,) if job.input.id_column else ()
        return Source.open(path, job.input.batch_size, job.input.dtypes, keep_text=ids)
    from pipeline.io.memory import MemorySource, to_table

    return MemorySource(to_table(data), job.input.batch_size)


def _cached_journal(job: Job, identity: str) -> Path:
    """A job without an output file (Python API) keeps its journal in the cache, named by its identity."""
    return default_cache_dir() / "journals" / f"{job.name}-{identity}.journal.sqlite"


def stored_key_scheme(journal_path: Path) -> KeyScheme:
    """Content keys, unless an existing journal was written with row-number keys."""
    if not journal_path.exists():
        return KeyScheme.CONTENT
    try:
        stored = read_meta(journal_path, Meta.KEY_SCHEME)
    except JournalError:
        return KeyScheme.CONTENT  # opening it for the run says what is wrong (or --fresh sets it aside)
    return KeyScheme(stored) if stored else KeyScheme.CONTENT


def _structured_spec(job: Job) -> StructuredSpec | None:
    prompt = job.prompt
    if prompt.labels is None and prompt.json_schema is None and prompt.json_schema_file is None:
        return None  # and jsonschema need not be imported
    from pipeline.structured import StructuredSpec

    return StructuredSpec.from_job(
        labels=prompt.labels,
        json_schema=prompt.json_schema,
        json_schema_file=prompt.json_schema_file,
        column_prefix=prompt.column_prefix,
    )


def check_result_column_clash(source: DataSource) -> None:
    """An input that already has a ``completion`` column (an earlier output?) would repeat it."""
    clash = [name for name, _ in RESULT_COLUMNS if name in source.columns]
    if clash:
        raise InputError(
            f"{source.path}: input column {clash[0]!r} has the name of a result column; rename it "
            f"(is this an earlier output? result columns: {', '.join(n for n, _ in RESULT_COLUMNS)})"
        )


def check_output_path(input_path: DataPath, output_path: DataPath) -> None:
    """The output must not overwrite the input or land inside an input folder."""
    if fs.inside(output_path, input_path):
        raise JobError(f"[output] path: {output_path} would overwrite or sit inside the input {input_path}")
    if fs.is_uri(output_path) and fs.suffix(output_path) not in OUTPUT_FORMATS:
        raise JobError(f"[output] path: {output_path}: unsupported extension; use .parquet, .csv or .jsonl")
    problem = fs.output_problem(output_path)
    if problem:
        raise JobError(f"[output] path: {problem}")


def _api_key(job: Job) -> str | None:
    """The key comes from the environment only."""
    env = job.model.api_key_env
    if not env:
        return None
    return key_from_environment(env)
