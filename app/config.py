"""Settings: every knob of SPEC §10, from the environment and `.env`.

No configuration at all is the embedded default: a SQLite file under
`DATA_DIR` and Celery tasks executed in-process. `DATABASE_URL` (or the seed's
`DATABASE_HOST/PORT/NAME/USER/PASSWORD`) and `REDIS_URL` switch to MySQL +
Redis + real workers without any code change.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import quote_plus
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from limits import parse_many
from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(RuntimeError):
    """A setting has a bad value; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Storage
    database_url: str | None = None
    database_host: str | None = None
    database_port: PositiveInt = 3306
    database_name: str = "auto_session"
    database_user: str = "root"
    database_password: str = ""
    data_dir: Path = Path("var")
    redis_url: str | None = None
    redis_key_prefix: str = "auto-session"

    # Timeouts (seconds) and limits, with the seed's defaults
    default_session_timeout: PositiveInt = 1800
    pending_timeout: PositiveInt = 1800
    human_session_timeout: PositiveInt = 28800
    transfer_timeout: PositiveInt = 300
    max_concurrent_sessions: PositiveInt = 10
    batch_size: PositiveInt = 100
    session_gap: PositiveInt = 1800
    timezone: str = "UTC"

    # Slot lock: how long a holder may keep it, how long a caller waits for it
    slot_lock_ttl: PositiveFloat = 10.0
    slot_lock_wait: PositiveFloat = 5.0

    # Idempotency-Key answers: kept at least this long (s), purged hourly by beat
    idempotency_ttl: PositiveInt = 86400
    maintenance_interval: PositiveFloat = 3600.0

    # Beat sweeps
    sweep_interval: PositiveFloat = 30.0
    sweep_batch_size: PositiveInt = 500
    transfer_sweep_interval: PositiveFloat = 15.0

    # Webhook delivery from the outbox
    delivery_interval: PositiveFloat = 15.0
    webhook_timeout: PositiveFloat = 5.0
    webhook_max_attempts: PositiveInt = 12
    webhook_retry_base: PositiveFloat = 2.0
    webhook_retry_max: PositiveFloat = 3600.0

    # Optional LLM transfer detection (any OpenAI-compatible endpoint)
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout: PositiveFloat = 10.0

    # Input limits (SPEC §4 Limits, §8 Bad input)
    max_json_field_bytes: PositiveInt = 64 * 1024
    max_request_bytes: PositiveInt = 2 * 1024 * 1024
    max_upload_bytes: PositiveInt = 64 * 1024 * 1024
    max_upload_expanded_bytes: PositiveInt = 1024 * 1024 * 1024

    # Webhook URL policy: loopback, private, link-local and reserved targets are refused
    # unless this is true (tests, closed networks)
    webhook_allow_private: bool = False

    # Rate limits (Flask-Limiter notation); counters in Redis, in-process when embedded
    rate_limit_enabled: bool = True
    rate_limit_bot: str = "500/second"
    rate_limit_desk: str = "100/second"
    rate_limit_admin: str = "50/second"
    rate_limit_auth_failures: str = "20/minute"

    # Web
    secret_key: str | None = Field(default=None, description="Flask secret for the admin console")
    host: str = "127.0.0.1"
    port: PositiveInt = 8000
    # Reverse proxies in front of the web processes whose X-Forwarded-For/-Proto/-Host
    # are trusted (Werkzeug's ProxyFix); 0 trusts none, so a client cannot spoof its
    # address into the per-address limits.
    proxy_hops: int = Field(default=0, ge=0, le=10)

    # Import grouping (SPEC §4 a-d): threads, reply chains, gap rule, optional LLM review.
    # (issue 16: settings of the grouping pipeline go below this line)
    # The review's OpenAI-compatible endpoint; unset, each falls back to its LLM_* twin.
    grouping_llm_base_url: str | None = None
    grouping_llm_model: str | None = None
    grouping_llm_api_key: str | None = None
    grouping_llm_timeout: PositiveFloat | None = None
    # Gap-rule boundaries whose gap lies in [MIN_GAP, MAX_GAP] seconds are reviewed; a
    # verdict `continues` at or above CONFIDENCE merges; at most MAX_CALLS calls a job.
    grouping_review_min_gap: PositiveInt = 600
    grouping_review_max_gap: PositiveInt = 86400
    grouping_review_confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    grouping_review_max_calls: int = Field(default=200, ge=0)
    # An upload's `review` option when it gives none (off: review costs nothing).
    grouping_review: bool = False

    @field_validator("grouping_llm_base_url", "grouping_llm_model", "grouping_llm_api_key",
                     mode="before")
    @classmethod
    def _grouping_blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("grouping_review_max_gap")
    @classmethod
    def _review_gaps_ordered(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("grouping_review_min_gap")
        if low is not None and value < low:
            raise ValueError(f"must be at least GROUPING_REVIEW_MIN_GAP ({low})")
        return value

    @field_validator("grouping_review")
    @classmethod
    def _review_has_an_endpoint(cls, value: bool, info: ValidationInfo) -> bool:
        data = info.data
        if value and not ((data.get("grouping_llm_base_url") or data.get("llm_base_url"))
                          and (data.get("grouping_llm_model") or data.get("llm_model"))):
            raise ValueError("review needs an endpoint: set GROUPING_LLM_BASE_URL and "
                             "GROUPING_LLM_MODEL (or LLM_BASE_URL and LLM_MODEL)")
        return value

    @property
    def grouping_review_endpoint(self) -> tuple[str, str, str | None, float] | None:
        """(base URL, model, API key, timeout) of the review, or None if none is set."""
        url = self.grouping_llm_base_url or self.llm_base_url
        model = self.grouping_llm_model or self.llm_model
        if not url or not model:
            return None
        return (url, model, self.grouping_llm_api_key or self.llm_api_key,
                self.grouping_llm_timeout or self.llm_timeout)

    # Live desk (SPEC §12): hand-back, one agent speaks, first-response timer.
    first_response_timeout: PositiveInt = 120

    # Live desk (SPEC §12): the event stream's own process type.
    # (issue 17: settings of the stream go below this line)
    # Port of the Procfile's `stream` process (the embedded default serves the stream on
    # PORT); keep-alive comment and outbox poll intervals (s); streams one process serves
    # at most (the embedded default: EMBEDDED_STREAMS, each holds one of its threads);
    # extra origins whose pages may open the stream with the console's cookie (this
    # host at PORT is always allowed); the stream's origin as browsers reach it, when a
    # proxy does not serve it at http(s)://<host>:STREAM_PORT.
    stream_port: PositiveInt = 8001
    stream_keepalive_interval: PositiveFloat = 15.0
    stream_poll_interval: float = Field(default=0.2, ge=0.01, le=10.0)
    stream_max_connections: PositiveInt = 2000
    stream_cors_origins: str | None = None
    stream_public_url: str | None = None

    @field_validator("stream_public_url", "stream_cors_origins", mode="before")
    @classmethod
    def _stream_origins(cls, value: object) -> object:
        """Each an http(s) origin (`STREAM_CORS_ORIGINS` a comma-separated list of them);
        blank is unset."""
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            return value
        for origin in filter(None, (o.strip() for o in value.split(","))):
            parsed = urlsplit(origin)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"not an http(s) origin: {origin!r}")
        return value.strip() or None

    # Operations (SPEC §13): metrics and logs.
    # (issue 18: metrics/log settings go below this line)
    metrics_enabled: bool = True
    # Bearer token for /metrics from anywhere but loopback (unset: loopback only)
    metrics_token: str | None = None
    # Where the web and worker processes of one machine keep their samples (unset:
    # DATA_DIR/metrics); one folder per Procfile role, cleaned when that role starts
    metrics_dir: Path | None = None
    log_format: str = "text"  # text | json (one JSON object a line)
    log_level: str = "INFO"

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _long_enough_token(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and len(value.strip()) < 16:
            raise ValueError("at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value.strip() if isinstance(value, str) else value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value.strip().lower() not in ("text", "json"):
            raise ValueError("one of text, json")
        return value.strip().lower()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.strip().upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
        return value.strip().upper()

    # Retention (SPEC §6, §13): kept this long (s), then purged by beat in bounded batches.
    events_retention: PositiveInt = 604800
    deliveries_retention: PositiveInt = 2592000

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator(
        "rate_limit_bot", "rate_limit_desk", "rate_limit_admin", "rate_limit_auth_failures"
    )
    @classmethod
    def _one_rate_limit(cls, value: str) -> str:
        """One limit in Flask-Limiter's notation (`50/second`, `20 per minute`), at least 1:
        a typo stops start-up here instead of surfacing on the first request."""
        try:
            parsed = parse_many(value)
        except ValueError:
            raise ValueError(
                f"not a rate limit {value!r}; write COUNT/second|minute|hour|day, "
                "e.g. 50/second"
            ) from None
        if len(parsed) != 1:
            raise ValueError("one limit per setting, e.g. 50/second")
        if parsed[0].amount < 1:
            raise ValueError("the count must be at least 1 (RATE_LIMIT_ENABLED=false turns "
                             "rate limiting off)")
        return value

    @field_validator("database_url", "redis_url", "llm_base_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL: DATABASE_URL, else the seed's parts, else the SQLite file."""
        if self.database_url:
            url = self.database_url
            if url.startswith("mysql://"):
                url = "mysql+pymysql://" + url.removeprefix("mysql://")
            return url
        if self.database_host:
            password = quote_plus(self.database_password)
            auth = f"{quote_plus(self.database_user)}:{password}" if password else quote_plus(
                self.database_user
            )
            return (
                f"mysql+pymysql://{auth}@{self.database_host}:{self.database_port}/"
                f"{self.database_name}?charset=utf8mb4"
            )
        return f"sqlite:///{(self.data_dir / 'auto_session.sqlite3').resolve()}"

    @property
    def embedded(self) -> bool:
        """True when tasks run in-process (no Redis configured)."""
        return self.redis_url is None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD")
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def _shown(name: str, value: object) -> str:
    """A refused value as start-up may print it: never a secret, never a URL's password."""
    if _SECRET_NAME.search(name):
        return "value not shown"
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(r"\1:***@", value)
    return f"got {value!r}"


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation failure into a message naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper() or "SETTINGS"
            problem = f"{name}: {error['msg']} ({_shown(name, error.get('input'))})"
            problems.append(_URL_PASSWORD.sub(r"\1:***@", problem))
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    return load_settings()
