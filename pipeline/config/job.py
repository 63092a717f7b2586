"""Job files: TOML validated into pydantic models.

Every key is checked: an unknown key (a typo such as ``max_tokenz``), a wrong
type or an out-of-range value is a :class:`~pipeline.errors.JobError` whose
one-line message names the key. Relative paths in a job file resolve against
the **working directory** (run jobs from the project root), never against the
job file's folder.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import JobError

DEFAULT_MODEL = "mistralai/ministral-8b"
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
PROVIDERS = ("openrouter", "openai", "mistral", "local")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Section):
    path: Path | None = None  # required unless the Python API is given data
    id_column: str | None = None
    batch_size: int = Field(default=8192, gt=0)


class PromptSpec(_Section):
    system: str | None = None
    user: str
    labels: list[str] | None = None
    json_schema: dict[str, Any] | None = None
    json_schema_file: Path | None = None
    column_prefix: str = ""
    retry_invalid: int = Field(default=0, ge=0, le=10)  # every retry is paid: keep it bounded


class ModelSpec(_Section):
    name: str = DEFAULT_MODEL
    provider: Literal["openrouter", "openai", "mistral", "local"] | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"
    max_tokens: int = Field(default=256, gt=0)
    temperature: float | None = Field(default=0.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    input_price_per_million: float | None = Field(default=None, ge=0)
    output_price_per_million: float | None = Field(default=None, ge=0)
    context_length: int | None = Field(default=None, gt=0)
    path: Path | None = None  # local GGUF file (provider = "local")
    n_ctx: int = Field(default=4096, gt=0)  # local server context size

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, value: dict[str, str]) -> dict[str, str]:
        # The key comes from the environment only, so it never sits in a job file.
        if any(name.lower() == "authorization" for name in value):
            raise ValueError("set the key through api_key_env, not an Authorization header")
        return value

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "messages", "max_tokens", "stream", "n"} & set(value)
        if reserved:
            raise ValueError(f"{sorted(reserved)[0]!r} is set by the pipeline, not by params")
        return value

    @property
    def profile(self) -> str:
        """The provider's name, explicit or guessed from ``base_url`` (each provider knows its own URL)."""
        from pipeline.providers import provider_for

        return provider_for(self).name


class LimitsSpec(_Section):
    requests_per_minute: int = Field(default=600, ge=0)  # 0: no cap
    tokens_per_minute: int = Field(default=0, ge=0)
    concurrency: int = Field(default=32, gt=0, le=4096)
    max_attempts: int = Field(default=6, ge=1)
    timeout_s: float = Field(default=60, gt=0)
    budget_usd: float | None = Field(default=None, gt=0)
    stop_grace_s: float = Field(default=30, ge=0)


class OutputSpec(_Section):
    path: Path | None = None  # required by the CLI; the Python API returns a table without it
    journal: Path | None = None

    @property
    def journal_path(self) -> Path | None:
        """Where the journal lives: ``journal``, else beside the job's own output path.

        The journal belongs to the job, not to where one run writes its output:
        ``--output`` moves the output file only.
        """
        if self.journal is not None:
            return self.journal
        return None if self.path is None else self.path.with_name(self.path.name + ".journal.sqlite")


class VariantSpec(_Section):
    """One ``[[variants]]`` table: a name and overrides merged over the base job's sections.

    Only ``pipeline eval`` reads variants; ``pipeline run`` ignores them. Each
    override is an inline table whose keys replace the base section's keys
    (``model = { name = "mistralai/ministral-3b" }`` keeps the base model's
    ``max_tokens``, ``base_url``, ...). The input and output cannot be
    overridden: every variant answers the same rows.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: dict[str, Any] = Field(default_factory=dict)
    prompt: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class Job(_Section):
    input: InputSpec = Field(default_factory=InputSpec)
    prompt: PromptSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    variants: list[VariantSpec] = Field(default_factory=list)
    name: str = Field(default="job", exclude=True)

    @model_validator(mode="after")
    def _check_structured(self) -> Job:
        if self.prompt.labels is not None and (
            self.prompt.json_schema is not None or self.prompt.json_schema_file is not None
        ):
            raise ValueError("set either [prompt] labels or a JSON schema, not both")
        if self.prompt.json_schema is not None and self.prompt.json_schema_file is not None:
            raise ValueError("set either [prompt] json_schema or json_schema_file, not both")
        names = [v.name for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"[[variants]] name {twice[0]!r} appears twice")
        for variant in self.variants:
            self.variant_job(variant)  # a bad override is a job error at load time, naming the variant
        return self

    def variant_job(self, variant: VariantSpec) -> Job:
        """The base job with a variant's overrides merged in (``pipeline eval`` gives it its own journal)."""
        raw = self.model_dump(exclude_unset=True, exclude={"variants"})
        for section in ("model", "prompt", "limits"):
            override = getattr(variant, section)
            if override:
                raw[section] = {**raw.get(section, {}), **override}
        try:
            job = Job.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"[[variants]] {variant.name}: {describe_validation_error(exc)}") from None
        return job.model_copy(update={"name": f"{self.name}-{variant.name}"})

    def identity(self, structured: dict[str, Any] | None) -> dict[str, Any]:
        """What determines the results. Limits are deliberately not part of it."""
        return {
            "model": self.model.name,
            "base_url": self.model.base_url,
            "provider": self.model.profile,
            "system": self.prompt.system,
            "user": self.prompt.user,
            "id_column": self.input.id_column,
            "max_tokens": self.model.max_tokens,
            "temperature": self.model.temperature,
            "params": self.model.params,
            "structured": structured,
        }


def identity_hash(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resolve_job_path(name_or_path: str, jobs_dir: Path = Path("jobs")) -> Path:
    """``pipeline run reviews`` means ``jobs/reviews.toml``; a path is taken as is."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.parent != Path("."):
        return path
    return jobs_dir / f"{name_or_path}.toml"


def load_job(name_or_path: str) -> Job:
    """Read and validate a job file; every problem is a one-line JobError."""
    path = resolve_job_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read job file: {exc}") from None
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        raise JobError(f"{path}: {describe_validation_error(exc)}") from None
    return job.model_copy(update={"name": path.stem})


def describe_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's report into one line naming the key, e.g. ``[model] max_tokenz``."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else (loc[0] if loc else "")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling)"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{key}: {message}{more}" if key else f"{message}{more}"
