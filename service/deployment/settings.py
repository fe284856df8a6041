"""Deployment settings of the service (API and worker), read from `DSCGUARD_*` environment variables.

One class for both processes, so the API and the worker agree on the Redis namespace and limits.
The experiment itself (profile, seed, strategy, any config field) is described here too and turned
into the one `ExperimentConfig` by `experiment_config()`.

>>> settings = ServiceSettings(profile="digits", strategy="st", config_overrides={"burnin": {"epochs": 5,
...                            "auxiliary_epoch": 5}})
>>> cfg = settings.experiment_config()
>>> cfg.strategy.name, cfg.burnin.epochs
('st', 5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.config import ExperimentConfig
from service.core.strategy_registry import StrategyName


def default_checkpoint_dir(cache_dir: Path | None, namespace: str) -> Path:
    """Where a worker keeps its checkpoints unless DSCGUARD_CHECKPOINT_DIR says otherwise: in the cache
    directory (DSCGUARD_CACHE_DIR, else ~/.cache/dscguard), one folder per namespace, never in the
    working directory (a worker started from a checkout would otherwise write into the repository).

    >>> default_checkpoint_dir(Path("/var/cache/dscguard"), "prod")
    PosixPath('/var/cache/dscguard/checkpoints/prod')
    """
    from service.core.data.locations import cache_dir_path  # here: service.core.data imports torch, settings need not

    return (cache_dir if cache_dir is not None else cache_dir_path()) / "checkpoints" / namespace


# `.env.example`'s values (change-me-...) and the FastAPI template's: a deployment that kept one has no secret
PLACEHOLDER_SECRETS = ("change-me", "changeme", "changethis")


class MissingSecretError(ValueError):
    """A secret the command needs is not set."""


def is_placeholder(secret: str) -> bool:
    """An empty key, or one still carrying a template's placeholder.

    >>> is_placeholder("change-me-client-key"), is_placeholder(""), is_placeholder("3f9c0d7e51a2b8")
    (True, True, False)
    """
    normalised = secret.strip().lower()
    return not normalised or normalised.startswith(PLACEHOLDER_SECRETS)


class ServiceSettings(BaseSettings):
    """Every knob of the deployed service; each field is read from `DSCGUARD_<FIELD NAME IN CAPITALS>`."""

    model_config = SettingsConfigDict(env_prefix="DSCGUARD_", extra="ignore")

    # Where the queue lives: every key of this deployment starts with `namespace:`.
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field("dscguard", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_timeout_seconds: float = Field(2.0, gt=0, description="socket connect/read timeout")

    # The experiment the worker serves (the one config object, built by `experiment_config`).
    bundle: Path | None = Field(None, description="a model bundle directory (`dscguard bundle create`), served in "
                                "place of the profile's burn-in: its models, trusted set, stream and defense "
                                "settings (DSCGUARD_STRATEGY still names another defense)")
    profile: str = "digits"
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto: CUDA when present, CPU otherwise")
    torch_threads: int = Field(0, ge=0, description="worker's CPU threads (0: torch's default, every core); leave "
                               "a core to the API when both share a small machine")
    strategy: StrategyName | None = Field(None, description="defense strategy (default: the profile's, guard)")
    config_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='JSON: section overrides, e.g. {"burnin": {"epochs": 5}}')
    cache_dir: Path | None = Field(None, description="burn-in and dataset cache (default: ~/.cache/dscguard)")

    # Access.
    api_key: SecretStr | None = Field(None, description="X-API-Key for ingest, predict and status")
    admin_token: SecretStr | None = Field(None, description="X-API-Key for /v1/model (unset: route disabled)")

    # Limits of the API.
    max_batch_samples: int = Field(1024, ge=1)
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request line and headers must arrive within "
                                          "this (from the connection's start or the next request's first byte); "
                                          "else 408 and the connection is closed")
    body_timeout_seconds: float = Field(30.0, gt=0, description="a request body must arrive within this once its "
                                        "head is in; else 408")
    keep_alive_timeout_seconds: float = Field(5.0, gt=0, description="an idle connection is closed after this")
    max_connections: int = Field(1000, ge=1, description="per API process: connections and requests in flight "
                                 "(long-poll waits included); more: 503")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="size of a request head; more: 400")
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    queue_max_length: int = Field(1000, ge=1, description="stream entries (waiting, in flight, or applied "
                                  "and kept for a checkpoint fallback); more: 429")
    retry_after_seconds: int = Field(1, ge=1)
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1, description="how long a batch_id is remembered")

    # The worker.
    checkpoint_dir: Path = Field(default_factory=lambda fields: default_checkpoint_dir(fields["cache_dir"],
                                                                                  fields["namespace"]),
                                 description="the worker's checkpoints (default: <cache dir>/checkpoints/<namespace>)")
    checkpoint_every: int = Field(50, ge=1, description="batches between checkpoints (and XACKs)")
    checkpoints_kept: int = Field(2, ge=1)
    recent_batch_ids: int = Field(10_000, ge=1, description="applied batch ids remembered in checkpoints")
    audit_max_length: int = Field(10_000, ge=1)
    dead_letter_max_length: int = Field(10_000, ge=1)
    heartbeat_ttl_seconds: float = Field(10.0, gt=0, description="readiness: worker heartbeat younger than this")
    read_block_ms: int = Field(500, ge=1)
    read_count: int = Field(16, ge=1, description="entries taken per read")
    publish_interval_seconds: float = Field(0.25, ge=0, description="under a backlog, publish weights and records "
                                            "at least this often (always once the stream is drained; 0: after "
                                            "every read)")
    consumer_name: str | None = Field(None, description="consumer in the group (default: host-pid)")
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="0: no metrics server")
    canary_every: int = Field(0, ge=0, description="canary accuracy every N batches (0: off)")
    canary_samples: int = Field(200, ge=1, description="canary size, taken from the trusted calibration split")

    @field_validator("api_key", "admin_token")
    @classmethod
    def _no_placeholder(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and is_placeholder(secret.get_secret_value()):
            raise PydanticCustomError("placeholder_secret", "is empty or still the placeholder of .env.example: set "
                                      "a real secret (e.g. `openssl rand -hex 24`) or leave it unset")
        return secret

    def client_key(self, needed_by: str) -> str:
        """The client key (DSCGUARD_API_KEY), or a one-line error saying what refuses to run without it."""
        if self.api_key is None:
            raise MissingSecretError(f"set DSCGUARD_API_KEY (the client key) before starting {needed_by} "
                                     "(see .env.example)")
        return self.api_key.get_secret_value()

    def experiment_config(self) -> ExperimentConfig:
        overrides = {section: dict(fields) for section, fields in self.config_overrides.items()}
        if self.strategy:
            overrides.setdefault("strategy", {})["name"] = self.strategy
        return ExperimentConfig.from_profile(self.profile, seed=self.seed, device=self.device, **overrides)
