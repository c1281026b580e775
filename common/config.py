"""modstream's configuration: one typed model, filled from flags, then
``MODSTREAM_*`` environment variables, then a YAML file, then defaults.

The environment is read here and nowhere else. Every setting lives in a
section; its variable is ``MODSTREAM_<SECTION>_<FIELD>`` in upper case (for
example ``MODSTREAM_KAFKA_BOOTSTRAP`` or ``MODSTREAM_CLASSIFIER_NUM_GPUS``), its
YAML key ``section: {field: value}``, and the Helm chart's ``config:`` value
maps one-to-one onto the YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from common.errors import ModstreamError
from common.fetch import LoadLimits

ENV_PREFIX = "MODSTREAM_"


class ConfigError(ModstreamError):
    """A setting is missing, malformed or out of range; the message names it."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _split_csv(value: Any) -> Any:
    """Environment variables carry lists as comma-separated strings."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


class TopicConfig(_Section):
    uploads: str = "images.uploads"
    verdicts: str = "images.verdicts"
    reviews: str = "images.reviews"
    dlq: str = "images.uploads.dlq"
    state_prefix: str = "modstream.state"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)


class KafkaConfig(_Section):
    """Client settings. ``bootstrap`` empty means: start the embedded broker."""

    bootstrap: str = ""
    group_id: str = "modstream"
    client_id: str = "modstream"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # The embedded broker joins a group in about session_timeout_ms / 2 (FACTS.md).
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    max_poll_interval_ms: int = Field(60000, ge=1000)
    # A waiting fetch does not return early on this broker: latency follows this.
    fetch_max_wait_ms: int = Field(50, ge=0)
    max_partition_fetch_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    fetch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class LimitsConfig(_Section):
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    fetch_timeout_s: float = Field(10.0, gt=0)
    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()
    file_roots: tuple[str, ...] = ()

    _split = field_validator("allow_hosts", "allow_networks", "file_roots", mode="before")(_split_csv)


class PipelineConfig(_Section):
    ingest_actors: int = Field(1, ge=1)
    poll_records: int = Field(32, ge=1)  # measured: 32 beat 16 and 64 on throughput and p99 (docs/benchmarks.md)
    max_inflight_batches: int = Field(4, ge=1)
    dedup_shards: int = Field(2, ge=1)
    phash_max_distance: int = Field(10, ge=0, le=24)
    knn_replicas: int = Field(1, ge=1)
    knn_k: int = Field(10, ge=1)
    knn_ef: int = Field(100, ge=1)
    draft_size: int = Field(256, ge=32)
    # How often a failing batch step (dedup lookup, model call, publishing) is tried before the
    # batch is split to find the record to blame; a dependency that is down is waited for instead.
    batch_attempts: int = Field(3, ge=1)
    # How long a batch waits for ReviewFeedback to apply every review published before its newest
    # record; past it the batch is scored anyway (counted in modstream_review_sync_timeouts_total).
    # Reviews are polled every 200 ms, so 2 s covers a busy review topic without stalling ingest.
    review_sync_timeout_s: float = Field(2.0, ge=0)
    # How long a revoked partition's in-flight batches may take to settle before its offsets are
    # committed and it is handed over; what is not settled by then is replayed by the next owner.
    revoke_drain_timeout_s: float = Field(30.0, gt=0)


class ClassifierConfig(_Section):
    """Ray Serve settings of the CNN deployment (see FACTS.md on batching)."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)


class ThresholdConfig(_Section):
    block: float = Field(0.9, ge=0, le=1)
    review: float = Field(0.5, ge=0, le=1)


class Settings(_Section):
    """Everything a modstream process can be told."""

    kafka: KafkaConfig = KafkaConfig()
    topics: TopicConfig = TopicConfig()
    limits: LimitsConfig = LimitsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    thresholds: ThresholdConfig = ThresholdConfig()
    bundle: str = ""  # empty: the default bundle, created on first use
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no /metrics endpoint
    ray_address: str = ""  # empty: start a local Ray

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Connection and security settings shared by producers, consumers and admins."""
        kafka = self.kafka
        kwargs: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap.split(","),
            "client_id": kafka.client_id,
            "security_protocol": kafka.security_protocol,
        }
        optional = {
            "sasl_mechanism": kafka.sasl_mechanism,
            "sasl_plain_username": kafka.sasl_username,
            "sasl_plain_password": kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            "ssl_cafile": kafka.ssl_cafile,
            "ssl_certfile": kafka.ssl_certfile,
            "ssl_keyfile": kafka.ssl_keyfile,
        }
        kwargs.update({key: value for key, value in optional.items() if value is not None})
        return kwargs

    def load_limits(self) -> LoadLimits:
        """The caps every fetch and decode runs under (ingest and the offline jobs alike)."""
        limits = self.limits
        return LoadLimits(max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                          fetch_timeout_s=limits.fetch_timeout_s, allow_hosts=frozenset(limits.allow_hosts),
                          allow_networks=limits.allow_networks, file_roots=limits.file_roots)

    def with_bootstrap(self, bootstrap: str) -> Settings:
        """A copy pointing at ``bootstrap`` (used once the embedded broker is up)."""
        return self.model_copy(update={"kafka": self.kafka.model_copy(update={"bootstrap": bootstrap})})


_SECTIONS = {name: field.annotation for name, field in Settings.model_fields.items()
             if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)}


def env_var_name(section: str | None, field: str) -> str:
    """The variable that sets ``section.field`` (or a top-level ``field``)."""
    parts = [section, field] if section else [field]
    return ENV_PREFIX + "_".join(parts).upper()


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        section_type = _SECTIONS.get(name)
        if section_type is None:
            variable = env_var_name(None, name)
            if variable in env:
                values[name] = env[variable]
            continue
        for sub in section_type.model_fields:
            variable = env_var_name(name, sub)
            if variable in env:
                values.setdefault(name, {})[sub] = env[variable]
    return values


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge; a None in ``override`` means "not given" and keeps the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping):
            merged[key] = _merge(dict(merged.get(key) or {}), value)
        elif value is not None:
            merged[key] = value
    return merged


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings with precedence flags > environment > YAML file > defaults.

    ``flags`` uses the same nested shape as the YAML file; a None value means
    "flag not given". ``config_file`` falls back to ``MODSTREAM_CONFIG``.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    layered: dict[str, Any] = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
        layered = _merge(layered, loaded)
    layered = _merge(layered, _from_env(env))
    layered = _merge(layered, flags or {})
    try:
        return Settings.model_validate(layered)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    """Name each bad setting by its YAML path and its environment variable."""
    lines = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        section, field = (location[0], location[1]) if len(location) > 1 else (None, location[0])
        lines.append(f"{'.'.join(location)} ({env_var_name(section, field)}): {error['msg']}")
    return "invalid configuration: " + "; ".join(lines)
