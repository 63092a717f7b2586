"""Everything checked before the first request: the run's plan.

A plan is built from a job file and the dataset's metadata. Every user
mistake (missing file, unknown column, duplicate ids, missing key, a budget
without prices) is raised here as a one-line UserError, so a bad job never
sends anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config.job import Job, identity_hash
from pipeline.engine.pricing import ModelInfo, model_info
from pipeline.engine.prompts import PromptRenderer, RenderedBatch, require_text_columns
from pipeline.engine.tokens import TokenCounter, counter_for
from pipeline.errors import CredentialsError, InputError, JobError
from pipeline.io.output import RESULT_COLUMNS
from pipeline.io.source import Source, check_id_column, row_keys
from pipeline.providers.base import Dialect

if TYPE_CHECKING:
    from pipeline.config.structured import StructuredSpec

# Tokens a chat template can add around the messages: an upper bound used to
# skip tokenizing prompts that obviously fit the context window.
TEMPLATE_SLACK = 16


@dataclass
class Plan:
    job: Job
    source: Source
    renderer: PromptRenderer
    structured: StructuredSpec | None
    info: ModelInfo
    model_name: str
    total_rows: int
    api_key: str | None

    @property
    def local(self) -> bool:
        return self.job.model.profile == "local"

    @property
    def context_length(self) -> int | None:
        if self.job.model.context_length:
            return self.job.model.context_length
        return self.job.model.n_ctx if self.local else self.info.context_length

    @cached_property
    def counter(self) -> TokenCounter:
        return counter_for(self.model_name)

    def dialect(self, base_url: str | None = None) -> Dialect:
        spec = self.job.model
        if base_url is not None:
            spec = spec.model_copy(update={"base_url": base_url})
        fields = self.structured.request_fields(spec.profile) if self.structured else {}
        return Dialect(spec, self.model_name, fields)

    def identity(self) -> dict[str, Any]:
        return self.job.identity(self.structured.identity() if self.structured else None)

    @property
    def identity_hash(self) -> str:
        return identity_hash(self.identity())

    def worst_cost(self, prompt_tokens: int) -> float | None:
        """The most a request can cost: its prompt plus a full ``max_tokens`` reply."""
        return self.info.cost(prompt_tokens, self.job.model.max_tokens)

    def batches(self) -> Iterator[tuple[pa.RecordBatch, list[str], RenderedBatch]]:
        """Input batches with their row keys and rendered prompts."""
        for batch, keys in self.keyed_batches():
            yield batch, keys, self.renderer.render(batch)

    def keyed_batches(self) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
        """Input batches with their row keys, without rendering prompts."""
        offset = 0
        for batch in self.source.batches():
            yield batch, row_keys(batch, self.job.input.id_column, offset)
            offset += batch.num_rows

    def fits_without_counting(self, rendered: RenderedBatch, i: int) -> bool:
        """True when a prompt surely fits the context window without tokenizing it.

        Byte-level BPE never makes more tokens than UTF-8 bytes, and a character
        is at most 4 bytes: the cheap character bound settles almost every row.
        """
        limit = self.context_length
        if limit is None:
            return True
        budget = limit - self.job.model.max_tokens - TEMPLATE_SLACK
        chars = len(rendered.users[i]) + (len(rendered.systems[i]) if rendered.systems is not None else 0)
        if 4 * chars <= budget:
            return True
        size = len(rendered.users[i].encode())
        if rendered.systems is not None:
            size += len(rendered.systems[i].encode())
        return size <= budget


def prepare(job: Job, *, need_key: bool = True) -> Plan:
    """Validate the job against its dataset and environment; nothing is sent."""
    source = Source.open(job.input.path, job.input.batch_size)
    renderer = PromptRenderer(job.prompt.user, job.prompt.system)
    renderer.check_columns(source.columns, str(job.input.path))
    require_text_columns(renderer, source.schema)
    check_result_column_clash(source)
    check_output_path(job)
    structured = _structured_spec(job)
    if structured is not None:
        structured.check_clashes(source.columns)
    id_column = job.input.id_column
    total = check_id_column(source, id_column) if id_column else source.count_rows()
    model_name = _model_name(job)
    info = model_info(
        model_name,
        local=job.model.profile == "local",
        input_price=job.model.input_price_per_million,
        output_price=job.model.output_price_per_million,
    )
    if job.limits.budget_usd is not None and (info.input_per_million is None or info.output_per_million is None):
        raise JobError(
            f"[limits] budget_usd: no price known for model {model_name!r}: set [model] "
            "input_price_per_million and output_price_per_million, or run `pipeline prices --refresh`"
        )
    api_key = _api_key(job) if need_key else None
    return Plan(job, source, renderer, structured, info, model_name, total, api_key)


def _structured_spec(job: Job) -> StructuredSpec | None:
    prompt = job.prompt
    if prompt.labels is None and prompt.json_schema is None and prompt.json_schema_file is None:
        return None  # and jsonschema need not be imported
    from pipeline.config.structured import StructuredSpec

    return StructuredSpec.from_job(
        labels=prompt.labels,
        json_schema=prompt.json_schema,
        json_schema_file=prompt.json_schema_file,
        column_prefix=prompt.column_prefix,
    )


def check_result_column_clash(source: Source) -> None:
    """An input that already has a ``completion`` column (an earlier output?) would repeat it."""
    clash = [name for name, _ in RESULT_COLUMNS if name in source.columns]
    if clash:
        raise InputError(
            f"{source.path}: input column {clash[0]!r} has the name of a result column; rename it "
            f"(is this an earlier output? result columns: {', '.join(n for n, _ in RESULT_COLUMNS)})"
        )


def check_output_path(job: Job) -> None:
    """The output must not overwrite the input or land inside an input folder."""
    source = job.input.path.resolve()
    target = job.output.path.resolve()
    if target == source or source in target.parents:
        raise JobError(f"[output] path: {job.output.path} would overwrite or sit inside the input {job.input.path}")


def _model_name(job: Job) -> str:
    if job.model.profile == "local" and "name" not in job.model.model_fields_set:
        return "local/smollm2-135m-instruct" if job.model.path is None else f"local/{job.model.path.stem}"
    return job.model.name


def _api_key(job: Job) -> str | None:
    """The key comes from the environment only; local servers need none."""
    env = job.model.api_key_env
    if job.model.profile == "local" or not env:
        return None
    key = os.environ.get(env, "").strip()
    if not key:
        raise CredentialsError(
            f"[model] api_key_env: environment variable {env} is not set; export your API key "
            'there (or set api_key_env = "" for a server that needs none; --dry-run needs no key)'
        )
    return key
