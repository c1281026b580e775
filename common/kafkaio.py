"""Kafka client factories and topic creation, configured once from Settings.

Written for Apache Kafka and checked against the embedded broker, which
differs in ways that matter (FACTS.md): group joins take session_timeout / 2,
a waiting fetch does not return early, end offsets can be wrong and
``read_committed`` is ignored. So: short session timeouts, short fetch waits,
manual commits after the verdicts are acknowledged, and no reliance on end
offsets for correctness.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from common.config import Settings
from common.errors import ModstreamError


class KafkaSetupError(ModstreamError):
    """Topics could not be created or the cluster could not be reached."""


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (acks=all)."""
    config: dict[str, Any] = {
        **settings.kafka_client_kwargs(),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": settings.limits.max_bytes * 2,  # inline base64 images are 4/3 larger
        "key_serializer": _encode_key,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def make_consumer(settings: Settings, topics: Iterable[str] | None, group_id: str | None,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits; subscribe to ``topics`` unless None (assign later)."""
    kafka = settings.kafka
    config: dict[str, Any] = {
        **settings.kafka_client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",  # honoured by Kafka, ignored by the embedded broker
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
        "fetch_max_bytes": kafka.fetch_max_bytes,
    }
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    if topics is not None:
        consumer.subscribe(list(topics))
    return consumer


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**settings.kafka_client_kwargs())


def pipeline_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic modstream reads or writes, with its topic-level configs."""
    topics = settings.topics
    state = {"cleanup.policy": "compact"}
    return {
        topics.uploads: {},
        topics.verdicts: {},
        topics.reviews: {},
        topics.dlq: {},
        f"{topics.state_prefix}.dedup": state,
        f"{topics.state_prefix}.references": state,
        f"{topics.state_prefix}.banks": state,
    }


def ensure_topics(settings: Settings, topics: dict[str, dict[str, str]] | None = None,
                  timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    wanted = pipeline_topics(settings) if topics is None else topics
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = make_admin(settings)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"cannot reach Kafka at {settings.kafka.bootstrap}: {exc}") from exc
            time.sleep(0.5)
    try:
        missing = [name for name in wanted if name not in set(admin.list_topics())]
        new_topics = [
            NewTopic(name, settings.topics.partitions, settings.topics.replication_factor,
                     topic_configs=wanted[name])
            for name in missing
        ]
        if new_topics:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race: fine
                admin.create_topics(new_topics)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot create topics {sorted(wanted)}: {exc}") from exc
    finally:
        admin.close()


def read_from_beginning(consumer: KafkaConsumer, topics: Iterable[str], timeout_s: float = 30.0
                        ) -> list[TopicPartition]:
    """Assign every partition of ``topics`` (no group) and seek to their start.

    A topic created moments ago may not be in the client's metadata yet:
    refresh and wait for it rather than assign nothing.
    """
    deadline = time.monotonic() + timeout_s
    partitions: list[TopicPartition] = []
    for topic in topics:
        while not consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"topic {topic} does not exist on {consumer.config['bootstrap_servers']}")
            consumer.topics()  # refresh metadata
            time.sleep(0.2)
        partitions += [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    return partitions


def _encode_key(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()
