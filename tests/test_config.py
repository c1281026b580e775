"""Configuration precedence and error messages (pure logic, no broker)."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_settings


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
    with pytest.raises(ConfigError, match="thresholds.block"):
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
