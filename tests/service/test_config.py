"""Settings groups: one declaration per setting, flat access, a typed slice per concern, files and env."""

from __future__ import annotations

import os

import pytest

from decoding import modes
from service.config import (
    SETTINGS_GROUPS,
    ConfigError,
    DecodingSettings,
    GatewaySettings,
    ModelSettings,
    SplitWorkerSettings,
    TandemSettings,
)


@pytest.fixture(autouse=True)
def no_tandem_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("TANDEM_"):
            monkeypatch.delenv(key)


def test_the_groups_partition_the_settings_in_order():
    names = [name for group in SETTINGS_GROUPS for name in group.model_fields]
    assert names == list(TandemSettings.model_fields)  # each setting in exactly one group
    assert all(issubclass(TandemSettings, group) for group in SETTINGS_GROUPS)


def test_every_setting_explains_itself():
    for name, field in TandemSettings.model_fields.items():
        assert field.description, name
        if field.get_default(call_default_factory=True) is None:  # --help shows no default: say what unset means
            assert "Default:" in field.description, name


def test_mode_is_the_routers_mode():
    from decoding import speculative

    assert TandemSettings.model_fields["mode"].annotation is modes.Mode is speculative.Mode
    assert speculative.MODES is modes.MODES == ("speculative", "verifier-only", "drafter-only")


def test_a_group_is_its_slice_of_the_settings():
    settings = TandemSettings.load(max_concurrency=9, api_keys=["k"], allow_weak_keys=True, split_session_ttl_s=5, num_draft_tokens=2)
    assert settings.max_concurrency == 9  # flat, as before
    gateway = settings.group(GatewaySettings)
    assert type(gateway) is GatewaySettings and set(type(gateway).model_fields) == set(GatewaySettings.model_fields)
    assert gateway.max_concurrency == 9 and gateway.api_keys[0].get_secret_value() == "k"
    worker = settings.group(SplitWorkerSettings)
    assert worker.model_dump() == {"split_session_ttl_s": 5.0, "split_max_kv_bytes": 1 << 30, "split_max_body_bytes": 64 << 20}
    assert settings.group(DecodingSettings).num_draft_tokens == 2
    assert settings.group(ModelSettings).remote_verifier is False
    assert TandemSettings.load(verifier="http://h:1").group(ModelSettings).remote_verifier is True


def test_a_group_validates_alone():
    with pytest.raises(ValueError, match="min_draft_tokens <= num_draft_tokens"):
        DecodingSettings(num_draft_tokens=9)
    with pytest.raises(ValueError, match="extra"):
        SplitWorkerSettings(max_concurrency=1)


def test_a_slice_stands_in_for_the_whole_settings():
    from service.backends import spec_options

    settings = TandemSettings.load(mode="verifier-only", adaptive_draft=False)
    assert spec_options(settings.group(DecodingSettings)) == spec_options(settings)
    assert spec_options(settings).mode == "verifier-only" and spec_options(settings).adaptive is False


@pytest.mark.parametrize(
    "filename, text",
    [
        ("tandem.yaml", "max-concurrency: 3\nmode: drafter-only\napi_keys: [a, b]\nallow_weak_keys: true\nsplit_max_kv_bytes: 2048\n"),
        ("tandem.toml", 'max_concurrency = 3\nmode = "drafter-only"\napi-keys = ["a", "b"]\nallow-weak-keys = true\nsplit_max_kv_bytes = 2048\n'),
    ],
)
def test_config_file_keys_are_the_flat_setting_names(tmp_path, filename, text):
    path = tmp_path / filename
    path.write_text(text)
    settings = TandemSettings.load(path)
    assert (settings.max_concurrency, settings.mode, settings.split_max_kv_bytes) == (3, "drafter-only", 2048)
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b"]


def test_env_overrides_the_file_and_explicit_values_override_env(tmp_path, monkeypatch):
    path = tmp_path / "tandem.yaml"
    path.write_text("max_queue: 1\nport: 1\nhost: file\n")
    monkeypatch.setenv("TANDEM_MAX_QUEUE", "2")
    monkeypatch.setenv("TANDEM_PORT", "2")
    settings = TandemSettings.load(path, port=3)
    assert (settings.host, settings.max_queue, settings.port) == ("file", 2, 3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_concurrency": 0}, "invalid setting 'max_concurrency': Input should be greater than or equal to 1 (got 0)"),
        ({"max_queeu": 3}, "invalid setting 'max_queeu': unknown setting"),
        ({"split_layers": "x"}, "invalid setting 'split_layers': String should match pattern"),
        ({"mode": "fast"}, "invalid setting 'mode': Input should be 'speculative', 'verifier-only' or 'drafter-only'"),
        ({"split_max_body_bytes": 10}, "invalid setting 'split_max_body_bytes': Input should be greater than or equal to 1024"),
        ({"min_draft_tokens": 6, "max_draft_tokens": 2}, "draft lengths must satisfy min_draft_tokens <= num_draft_tokens"),
    ],
)
def test_invalid_values_name_the_setting(tmp_path, values, message):
    path = tmp_path / "tandem.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in values.items()))
    with pytest.raises(ConfigError) as exc:
        TandemSettings.load(path)
    assert message in str(exc.value)
