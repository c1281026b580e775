"""modstream's configuration: one typed model, filled from flags, then
``MODSTREAM_*`` environment variables, then a YAML file, then defaults.

Secrets (``SecretStr`` fields) never reach an error message, a log line or a
repr: configuration errors name the setting, never its value, and the values
of secrets handed to kafka-python are redacted from its loggers.

The environment is read here and nowhere else. Every setting lives in a
section; its variable is ``MODSTREAM_<SECTION>_<FIELD>`` in upper case (for
example ``MODSTREAM_KAFKA_BOOTSTRAP`` or ``MODSTREAM_CLASSIFIER_NUM_GPUS``), its
YAML key ``section: {field: value}``, and the Helm chart's ``config:`` value
maps one-to-one onto the YAML.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from common.errors import ModstreamError
from common.fetch import EVERYDAY_FORMATS, ImageFormat, LoadLimits

ENV_PREFIX = "MODSTREAM_"
REDACTED = "**********"  # what pydantic's SecretStr shows, so a redacted log reads like a repr


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


CompressionType = Literal["none", "gzip", "snappy", "lz4", "zstd"]
COMPRESSION_TYPES: tuple[str, ...] = get_args(CompressionType)
KafkaClient = Literal["kafka-python", "librdkafka"]


class KafkaConfig(_Section):
    """Client settings. ``bootstrap`` empty means: start the embedded broker."""

    bootstrap: str = ""
    # librdkafka (confluent-kafka, C threads) or kafka-python (pure Python, about four times the CPU per
    # record and fifteen times per idle consumer; README, "The Kafka client").
    client: KafkaClient = "librdkafka"
    group_id: str = "modstream"
    client_id: str = "modstream"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Of modstream's own output (verdicts, dead letters, changelogs); its consumers read every codec.
    # zstd: the smallest batches for a few microseconds of CPU per record (`modstream bench compression`,
    # README "The broker"); gzip for consumers whose client lacks zstd.
    compression_type: CompressionType = "zstd"
    # The embedded broker joins a group in about session_timeout_ms / 2 (README, "The broker").
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    max_poll_interval_ms: int = Field(60000, ge=1000)
    # A waiting fetch does not return early on this broker: latency follows this.
    fetch_max_wait_ms: int = Field(50, ge=0)
    # The same for consumers that follow quiet topics in the background (hash banks, reviews): the
    # wait sets how often an idle consumer asks, and at 50 ms each cost its actor 2-4% of a core.
    follower_fetch_max_wait_ms: int = Field(500, ge=0)
    max_partition_fetch_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    fetch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class LimitsConfig(_Section):
    """What one image may cost to fetch and decode (common.fetch.LoadLimits documents each).

    file_roots is empty by default: file:// URIs are refused until folders are named.
    formats beyond the everyday JPEG, PNG, WebP and GIF (BMP, TIFF, AVIF) must be asked for.
    Every decode runs in a worker process held to decode_cpu_s of CPU and
    decode_memory_mb of memory; decode_workers such processes per modstream process.
    """

    max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    fetch_timeout_s: float = Field(10.0, gt=0)
    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()
    file_roots: tuple[str, ...] = ()
    http_ports: tuple[int, ...] = (80, 443)
    formats: tuple[ImageFormat, ...] = EVERYDAY_FORMATS  # type: ignore[assignment]
    decode_cpu_s: float = Field(2.0, gt=0)
    decode_memory_mb: int = Field(384, ge=16)
    decode_workers: int = Field(2, ge=1)

    _split = field_validator("allow_hosts", "allow_networks", "file_roots", "http_ports", mode="before")(_split_csv)

    @field_validator("formats", mode="before")
    @classmethod
    def _format_names(cls, value: Any) -> Any:
        """Comma-separated or a list, in any case: "jpeg,png,tiff"."""
        value = _split_csv(value)
        return tuple(str(name).upper() for name in value) if isinstance(value, list | tuple) else value

    @field_validator("http_ports")
    @classmethod
    def _valid_ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(not 0 < port < 65536 for port in value):
            raise ValueError("ports are 1..65535, at least one")
        return value


class PipelineConfig(_Section):
    ingest_actors: int = Field(1, ge=1)
    poll_records: int = Field(32, ge=1)  # measured: 32 beat 16 and 64 on throughput and p99 (docs/benchmarks.md)
    max_inflight_batches: int = Field(4, ge=1)
    dedup_shards: int = Field(2, ge=1)
    pdq_max_distance: int = Field(31, ge=0, le=63)  # PDQ bits; copies of photos move <= ~31, distinct ones ~100
    pdq_dihedral: bool = False  # also match rotated and mirrored copies (8 PDQ variants per lookup)
    dedup_max_images: int | None = Field(None, ge=1)  # per shard; the oldest unreviewed are evicted first
    dedup_max_age_s: float | None = Field(None, gt=0)  # unreviewed verdicts older than this are evicted
    knn_replicas: int = Field(1, ge=1)
    knn_k: int = Field(10, ge=1)
    knn_ef: int = Field(100, ge=1)
    draft_size: int = Field(256, ge=32)
    # Features (hashes, histogram, size) of the images each ingest actor loaded lately, by MD5, so
    # an exact copy is not decoded again (common/knownfeatures.py); ~2 KB each, 0: off.
    known_features: int = Field(20_000, ge=0)
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

    # -- reviews against uploads (workers/review.py) --
    # Start-up scores no upload before the review backlog is applied, waiting at most this long.
    review_backlog_wait_s: float = Field(120.0, ge=0)
    # A review re-issues corrected verdicts for copies scored up to this long before it (0: off).
    reissue_window_s: float = Field(0.0, ge=0)


class ClassifierConfig(_Section):
    """Ray Serve settings of the CNN deployment.

    A request is one caller's batch of images, so ``target_ongoing_requests`` and
    ``max_ongoing_requests`` count batches; None derives them from the batch size
    (workers.classifier.classifier_options says how).
    """

    app_name: str = Field("modstream", min_length=1)  # the Serve application holding the Classifier
    num_replicas: int = Field(1, ge=1)
    autoscaling: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1)
    # Images per model call within a Serve batch; None: 8 on CPU, where the CNN costs least per image
    # there (open_nsfw 36 CPU ms vs 43 at 32; docs/benchmarks.md), the whole batch on a GPU.
    model_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)


class ThresholdConfig(_Section):
    """Overrides of the bundle's block/review thresholds; None (the default) keeps the bundle's."""

    block: float | None = Field(None, ge=0, le=1)
    review: float | None = Field(None, ge=0, le=1)


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
            "sasl_plain_password": _unwrap_for_kafka(kafka.sasl_password),
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
                          allow_networks=limits.allow_networks, file_roots=limits.file_roots,
                          http_ports=limits.http_ports, formats=limits.formats, decode_cpu_s=limits.decode_cpu_s,
                          decode_memory_bytes=limits.decode_memory_mb * 1024 * 1024,
                          decode_workers=limits.decode_workers)

    def with_bootstrap(self, bootstrap: str) -> Settings:
        """A copy pointing at ``bootstrap`` (used once the embedded broker is up)."""
        return self.model_copy(update={"kafka": self.kafka.model_copy(update={"bootstrap": bootstrap})})


class _RedactSecrets(logging.Filter):
    """Replaces known secret values in the records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it when it formats the record
            return True
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, ()
        return True


_REDACT_SECRETS = _RedactSecrets()


def _unwrap_for_kafka(secret: SecretStr | None) -> str | None:
    """The value for kafka-python, after making sure kafka-python's loggers cannot show it.

    KafkaAdminClient logs its whole configuration at DEBUG, password included. A
    filter on a logger only sees that logger's own records, so it goes on every
    ``kafka.*`` logger that exists (kafka-python creates them at import) and on
    the admin client's by name.
    """
    if secret is None:
        return None
    value = secret.get_secret_value()
    if value:
        _REDACT_SECRETS.secrets.add(value)
        names = {"kafka", "kafka.admin.client"} | {name for name in logging.root.manager.loggerDict
                                                    if name.startswith("kafka.")}
        for name in names:
            logger = logging.getLogger(name)
            if _REDACT_SECRETS not in logger.filters:
                logger.addFilter(_REDACT_SECRETS)
    return value


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
        layered = _merge(layered, _read_config_file(config_file))
    layered = _merge(layered, _from_env(env))
    layered = _merge(layered, flags or {})
    try:
        return Settings.model_validate(layered)
    except ValidationError as exc:
        problem = _describe(exc)
    # Raised outside the except block: a chained ValidationError would show the input values, secrets included.
    raise ConfigError(problem)


def _read_config_file(config_file: str | Path) -> dict[str, Any]:
    """The YAML file's mapping. Its errors give the position only: PyYAML's own message
    quotes the offending line, which may be the one holding a password."""
    problem = None
    try:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
    except OSError as exc:
        problem = f"cannot read config file {config_file}: {exc.strerror or type(exc).__name__}"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = (f"cannot read config file {config_file}: not valid YAML{where} "
                   "(the text is not shown, it may hold a secret)")
    if problem is not None:  # raised outside the except block, so no chained exception carries the text
        raise ConfigError(problem)
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
    return loaded


def _describe(exc: ValidationError) -> str:
    """Name each bad setting by its YAML path and its environment variable; pydantic's
    messages describe the expected value and never repeat the input."""
    lines = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        section, field = (location[0], location[1]) if len(location) > 1 else (None, location[0])
        lines.append(f"{'.'.join(location)} ({env_var_name(section, field)}): {error['msg']}")
    return "invalid configuration: " + "; ".join(lines)
