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
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import JobError
from pipeline.io.fs import default_journal, is_uri, parse_data_path

DEFAULT_MODEL = "mistralai/ministral-8b"
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
# Types [input] dtypes may force a column to (see io/source/common.py).
DType = Literal["string", "int64", "float64", "bool", "timestamp"]
# HTTP header names are RFC 9110 tokens; anything else would be refused by the
# HTTP library at send time, after the job had started.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Section(BaseModel):
    # Integer and number keys are strict (StrictInt, StrictFloat below): TOML's
    # true is not 1, "8" is not 8, and 2.5 or 8.0 is not an integer.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_empty_path(value: Any) -> Any:
    """``path = ""`` would mean the working directory: refuse it instead."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


# A local path, or an ``s3://bucket/key`` URI kept as text (other schemes are refused).
DataPath = Annotated[Path | str, BeforeValidator(parse_data_path)]


class InputSpec(_Section):
    path: DataPath | None = None  # required unless the Python API is given data
    id_column: str | None = None
    batch_size: StrictInt = Field(default=8192, gt=0)
    dtypes: dict[str, DType] = Field(default_factory=dict)  # force a column's type (CSV types are inferred)

    _path = field_validator("path", mode="before")(_non_empty_path)


class PromptSpec(_Section):
    system: str | None = None
    user: str
    labels: list[str] | None = None
    json_schema: dict[str, Any] | None = None
    json_schema_file: Path | None = None
    column_prefix: str = ""
    retry_invalid: StrictInt = Field(default=0, ge=0, le=10)  # every retry is paid: keep it bounded

    _schema_file = field_validator("json_schema_file", mode="before")(_non_empty_path)


class ModelSpec(_Section):
    name: str = DEFAULT_MODEL
    provider: str | None = None  # a name in the provider registry (checked when the job is planned)
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"
    max_tokens: StrictInt = Field(default=256, gt=0)
    temperature: StrictFloat | None = Field(default=0.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    input_price_per_million: StrictFloat | None = Field(default=None, ge=0)
    output_price_per_million: StrictFloat | None = Field(default=None, ge=0)
    # Prompt-cache prices (USD per million tokens read from / written to the provider's cache).
    cached_input_price_per_million: StrictFloat | None = Field(default=None, ge=0)
    cache_write_price_per_million: StrictFloat | None = Field(default=None, ge=0)
    # OpenAI's service tier, sent with every request ("flex": batch prices, slower, may answer 429).
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    context_length: StrictInt | None = Field(default=None, gt=0)
    path: Path | None = None  # local GGUF file (provider = "local")
    n_ctx: StrictInt = Field(default=4096, gt=0)  # local server context size
    # Batch mode: rows go through the provider's asynchronous batch API (about half price).
    mode: Literal["realtime", "batch"] = "realtime"
    batch_url: str | None = None  # default: {base_url}/batches ({base_url}/batch/jobs for mistral)
    batch_discount: StrictFloat = Field(default=0.5, gt=0, le=1)  # batch price / list price, where usage has no cost
    batch_poll_s: StrictFloat = Field(default=30.0, gt=0)  # seconds between polls of pending batches
    batch_max_requests: StrictInt | None = Field(default=None, gt=0)  # rows per batch; default: the provider's limit

    _path = field_validator("path", mode="before")(_non_empty_path)

    @field_validator("base_url", "batch_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            # The key comes from the environment only, so it never sits in a job file;
            # "Authorization " or "AUTHORIZATION" is the same header to a server.
            if "".join(name.split()).lower() in ("authorization", "proxy-authorization"):
                raise ValueError("set the key through api_key_env, not an Authorization header")
            if not name or not set(name) <= _TOKEN_CHARS:
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
                raise ValueError(f"the value of {name!r} holds a line break or control character")
        return value

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "messages", "max_tokens", "stream", "n"} & set(value)
        if reserved:
            raise ValueError(f"{sorted(reserved)[0]!r} is set by the pipeline, not by params")
        return value


AUTO: Final = "auto"


def _rate_setting(value: Any) -> Any:
    """A whole number per minute (0: no cap), or "auto": learn the server's limit while running.

    Whole numbers only: 20.5 per minute would let a 60-s window hold 21.
    """
    if value == AUTO and isinstance(value, str):
        return value
    # Strict, like every other number in a job file: 600, not "600" or 600.0.
    if type(value) is int and value >= 0:
        return value
    raise ValueError(f'must be a whole number per minute (0: no cap) or "auto", not {value!r}')


# Checked before pydantic's union, so a bad value gets one plain message.
RateSetting = Annotated[int | Literal["auto"], BeforeValidator(_rate_setting)]


class LimitsSpec(_Section):
    requests_per_minute: RateSetting = AUTO
    tokens_per_minute: RateSetting = 0
    concurrency: StrictInt = Field(default=32, gt=0, le=4096)
    max_attempts: StrictInt = Field(default=6, ge=1)
    timeout_s: StrictFloat = Field(default=60, gt=0)
    budget_usd: StrictFloat | None = Field(default=None, gt=0)
    stop_grace_s: StrictFloat = Field(default=30, ge=0)
    # The canary (engine/canary.py): the first rows are sent alone and judged before the rest.
    # None: 20 rows when at least 100 are to be sent; 0: no canary.
    canary_rows: StrictInt | None = Field(default=None, ge=0)
    canary_invalid_share: StrictFloat = Field(default=0.5, gt=0, le=1)
    canary_truncated_share: StrictFloat = Field(default=0.5, gt=0, le=1)
    canary_failed_share: StrictFloat = Field(default=0.5, gt=0, le=1)  # empty replies or permanent errors
    canary_cost_factor: StrictFloat = Field(default=3.0, gt=1)  # x the dry run's expected cost per row


class OutputSpec(_Section):
    path: DataPath | None = None  # required by the CLI; the Python API returns a table without it
    journal: Path | None = None

    _paths = field_validator("path", "journal", mode="before")(_non_empty_path)

    @property
    def journal_path(self) -> Path | None:
        """Where the journal lives: ``journal``, else beside the job's own output path.

        The journal belongs to the job, not to where one run writes its output:
        ``--output`` moves the output file only. For an ``s3://`` output it
        stays on local disk, under ``.pipeline/`` in the working directory.
        """
        if self.journal is not None:
            return self.journal
        if self.path is None:
            return None
        if is_uri(self.path):
            return default_journal(str(self.path))
        path = Path(self.path)
        return path.with_name(path.name + ".journal.sqlite")


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

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_job_name(value)

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

    def identity(self, structured: dict[str, Any] | None, provider: str) -> dict[str, Any]:
        """What determines the results. Limits are deliberately not part of it."""
        return {
            "model": self.model.name,
            "base_url": self.model.base_url,
            "provider": provider,
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


def check_job_name(name: object) -> str:
    """A job's name names its journal file (and its progress bar): one file name, no folder in it."""
    text = name if isinstance(name, str) else None
    if (
        not text
        or text != text.strip()
        or text.startswith(".")
        or len(text) > 100
        or any(c in "/\\" or ord(c) < 32 for c in text)
    ):
        raise JobError(
            f"job: name {name!r} cannot name a journal file: use letters, digits, spaces, '-', '_' or '.' "
            "(not first), at most 100 characters, no '/'"
        )
    return text


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
        # utf-8-sig: a byte-order mark (Windows editors add one) is not part of the TOML.
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
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
    elif first["type"] == "int_type":
        message = 'must be a whole number such as 8 (not true/false, a quoted "8" or 8.5)'
    elif first["type"] == "float_type":
        message = 'must be a number such as 1.5 (not true/false or a quoted "1.5")'
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{key}: {message}{more}" if key else f"{message}{more}"
