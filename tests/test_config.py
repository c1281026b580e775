"""Configuration precedence, error messages and secrets (pure logic, plus one test with the broker)."""

from __future__ import annotations

import logging
import traceback
import uuid

import pytest

from common.config import REDACTED, ConfigError, load_settings


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path) -> None:
    config = tmp_path / "modstream.yaml"
    config.write_text("kafka: {bootstrap: 'file:1', group_id: from-file}\n"
                      "pipeline: {dedup_shards: 3, knn_k: 7}\nthresholds: {block: 0.8}\n")
    env = {"MODSTREAM_KAFKA_BOOTSTRAP": "env:1", "MODSTREAM_PIPELINE_DEDUP_SHARDS": "5"}
    settings = load_settings({"kafka": {"bootstrap": "flag:1", "group_id": None}}, config_file=config, env=env)
    assert settings.kafka.bootstrap == "flag:1"  # flag
    assert settings.pipeline.dedup_shards == 5  # environment over file
    assert settings.pipeline.knn_k == 7  # file
    assert settings.kafka.group_id == "from-file"  # a flag left unset keeps the lower layer
    assert settings.thresholds.block == 0.8 and settings.thresholds.review is None  # unset: the bundle's applies


def test_config_file_from_the_environment_and_lists_from_commas(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("limits: {max_bytes: 1000}\n")
    env = {"MODSTREAM_CONFIG": str(config), "MODSTREAM_LIMITS_ALLOW_HOSTS": "cdn.internal, img.local"}
    settings = load_settings(env=env)
    assert settings.limits.max_bytes == 1000
    assert settings.limits.allow_hosts == ("cdn.internal", "img.local")


def test_bad_values_name_the_setting_and_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"pipeline.dedup_shards \(MODSTREAM_PIPELINE_DEDUP_SHARDS\)"):
        load_settings(env={"MODSTREAM_PIPELINE_DEDUP_SHARDS": "zero"})
    with pytest.raises(ConfigError, match=r"thresholds\.block"):
        load_settings({"thresholds": {"block": 1.5}}, env={})


def test_unreadable_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=tmp_path / "missing.yaml", env={})


def test_sasl_settings_pass_through_and_the_password_stays_secret() -> None:
    settings = load_settings(env={"MODSTREAM_KAFKA_BOOTSTRAP": "k:9093",
                                  "MODSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                  "MODSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                                  "MODSTREAM_KAFKA_SASL_USERNAME": "ms", "MODSTREAM_KAFKA_SASL_PASSWORD": "s3cret"})
    kwargs = settings.kafka_client_kwargs()
    assert kwargs["bootstrap_servers"] == ["k:9093"] and kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == \
        ("SCRAM-SHA-512", "ms", "s3cret")
    assert "s3cret" not in repr(settings)


def test_output_compression_is_a_kafka_setting() -> None:
    assert load_settings(env={}).kafka.compression_type == "zstd"
    settings = load_settings(env={"MODSTREAM_KAFKA_COMPRESSION_TYPE": "gzip"})
    assert settings.kafka.compression_type == "gzip"
    with pytest.raises(ConfigError, match=r"kafka.compression_type \(MODSTREAM_KAFKA_COMPRESSION_TYPE\)"):
        load_settings(env={"MODSTREAM_KAFKA_COMPRESSION_TYPE": "brotli"})


@pytest.mark.parametrize(("setting", "client_value"), [("none", None), ("gzip", "gzip"), ("zstd", "zstd")])
def test_producers_compress_as_configured(setting: str, client_value: str | None) -> None:
    """make_producer hands the setting to kafka-python, which checks the codec library is installed,
    and to librdkafka as its property."""
    from common.kafkaio import make_producer
    from common.rdkafka import rdkafka_config

    settings = load_settings({"kafka": {"bootstrap": "127.0.0.1:1", "compression_type": setting,
                                        "client": "kafka-python"}}, env={})
    producer = make_producer(settings, bootstrap_servers=[], api_version=(2, 8))
    assert producer.config["compression_type"] == client_value
    assert rdkafka_config({"compression_type": producer.config["compression_type"]})["compression.type"] == setting
    producer.close(timeout=0)


PASSWORD = "Pa55-known-to-the-test-7f3c"


def _everything_about(exc: BaseException) -> str:
    """What any handler could show of an exception: message, repr, the whole chain."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def test_a_yaml_error_gives_the_position_but_not_the_line(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"kafka:\n  sasl_username: ms\n  sasl_password: {PASSWORD}: [\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config, env={})
    assert "line 3" in str(caught.value)
    assert PASSWORD not in _everything_about(caught.value)


@pytest.mark.parametrize("kafka_section", [
    {"sasl_password": {"nested": PASSWORD}},  # the secret field itself is invalid
    {"sasl_password": PASSWORD, "session_timeout_ms": "soon"},  # another field is invalid
    {"sasl_pasword": PASSWORD},  # a misspelt key holds the secret
])
def test_validation_errors_never_show_the_secret(kafka_section: dict) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.") as caught:
        load_settings({"kafka": kafka_section}, env={})
    assert PASSWORD not in _everything_about(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_settings_show_the_secret_nowhere_but_to_the_client() -> None:
    settings = load_settings(env={"MODSTREAM_KAFKA_SASL_PASSWORD": PASSWORD})
    shown = repr(settings) + str(settings) + settings.model_dump_json() + repr(settings.model_dump()) + \
        repr(settings.kafka) + repr(settings.kafka.sasl_password)
    assert PASSWORD not in shown
    assert settings.kafka_client_kwargs()["sasl_plain_password"] == PASSWORD


def test_cli_errors_on_stderr_do_not_show_the_secret(tmp_path, monkeypatch, capfd) -> None:
    from deploy.cli import main

    broken = tmp_path / "broken.yaml"
    broken.write_text(f"kafka: {{sasl_password: {PASSWORD}\n")
    monkeypatch.setenv("MODSTREAM_KAFKA_SASL_PASSWORD", PASSWORD)
    assert main(["verdicts", "--config", str(broken)]) == 2
    monkeypatch.setenv("MODSTREAM_KAFKA_SESSION_TIMEOUT_MS", "soon")
    assert main(["verdicts", "--bootstrap", "127.0.0.1:1"]) == 2
    out, err = capfd.readouterr()
    assert "not valid YAML" in err and "kafka.session_timeout_ms" in err
    assert PASSWORD not in out + err


@pytest.mark.integration
def test_kafka_clients_log_no_secret_at_debug(broker, caplog, capfd) -> None:
    """PLAINTEXT ignores the SASL settings but the clients still get them, as in production."""
    from common.kafkaio import ensure_topics, make_consumer, make_producer

    settings = load_settings({"kafka": {"bootstrap": broker.bootstrap, "sasl_mechanism": "PLAIN",
                                        "sasl_username": "ms"}},
                             env={"MODSTREAM_KAFKA_SASL_PASSWORD": PASSWORD})
    caplog.set_level(logging.DEBUG)
    topic = f"secret-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: {}})
    producer = make_producer(settings)
    producer.send(topic, b"x").get(timeout=10)
    producer.close()
    consumer = make_consumer(settings, topics=[topic], group_id=None)
    consumer.close()

    logged = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert "Starting KafkaAdminClient with configuration" in logged  # the line that held the password
    assert REDACTED in logged
    assert PASSWORD not in logged + "".join(capfd.readouterr())
