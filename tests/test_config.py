"""Settings from the environment: defaults, overrides, validation messages, secrets never echoed."""

from __future__ import annotations

import pytest

from bridge.config import ENV_VARS, load_settings, render_settings_table, secret_values
from bridge.errors import ConfigError


def test_defaults_match_the_documented_ones() -> None:
    s = load_settings({})
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.topic == "vod.events"
    assert s.kafka.enable_idempotence is True
    assert (s.http.host, s.http.port, s.http.callback_path) == ("0.0.0.0", 8080, "/vod/callback")
    assert s.http.max_body_bytes == 1024 * 1024


def test_env_values_are_coerced_and_flags_override_env() -> None:
    s = load_settings(
        {
            "BRIDGE_HTTP_PORT": "9000",
            "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE": "false",
            "BRIDGE_KAFKA_LINGER_MS": "20",
            "BRIDGE_KAFKA_TOPIC_ROUTES": "NewFileUpload=vod.uploads, FileDeleted=vod.deletes",
            "BRIDGE_KAFKA_TOPIC": "from-env",
        },
        {"BRIDGE_KAFKA_TOPIC": "from-flag"},
    )
    assert s.http.port == 9000
    assert s.kafka.enable_idempotence is False
    assert s.kafka.linger_ms == 20
    assert s.kafka.topic == "from-flag"
    assert s.kafka.topic_for("NewFileUpload") == "vod.uploads"
    assert s.kafka.topic_for("PullComplete") == "from-flag"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_HTTP_PORT": "x"}, "BRIDGE_HTTP_PORT"),
        ({"BRIDGE_HTTP_PORT": "70000"}, "BRIDGE_HTTP_PORT"),
        ({"BRIDGE_KAFKA_ENABLE_IDEMPOTENCE": "maybe"}, "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE"),
        ({"BRIDGE_KAFKA_TOPIC": "bad topic!"}, "BRIDGE_KAFKA_TOPIC"),
        ({"BRIDGE_KAFKA_TOPIC_ROUTES": "PullComplete"}, "BRIDGE_KAFKA_TOPIC_ROUTES"),
        ({"BRIDGE_CALLBACK_PATH": "healthz"}, "BRIDGE_CALLBACK_PATH"),
        ({"BRIDGE_KAFKA_COMPRESSION": "brotli"}, "BRIDGE_KAFKA_COMPRESSION"),
        ({"BRIDGE_KAFKA_PUBLISH_TIMEOUT_S": "0"}, "BRIDGE_KAFKA_PUBLISH_TIMEOUT_S"),
        ({"BRIDGE_KAFKA_SASL_MECHANISM": "PLAIN"}, "BRIDGE_KAFKA_SASL_MECHANISM"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(env)


def test_secrets_are_masked_and_never_in_errors(tmp_path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cr3t-from-file\n")
    s = load_settings(
        {
            "BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "BRIDGE_KAFKA_SASL_MECHANISM": "PLAIN",
            "BRIDGE_KAFKA_SASL_USERNAME": "bridge",
            "BRIDGE_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        }
    )
    assert s.kafka.sasl_password == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in repr(s.kafka)


def test_every_setting_has_one_env_var() -> None:
    names = [var.name for var in ENV_VARS]
    assert len(names) == len(set(names))
    assert all(name.startswith("BRIDGE_") for name in names)


def test_readme_table_is_the_settings_list() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = render_settings_table()
    assert table in readme, "README's settings table is stale; paste bridge.config.render_settings_table():\n" + table


def test_cli_flags_are_the_flagged_settings() -> None:
    from bridge.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings if option.startswith("--")}
    expected = {var.flag_name for var in ENV_VARS if var.flag}
    assert expected <= flags
    assert {"--workers", "--bootstrap-servers", "--enable-idempotence"} <= expected


def test_callback_secrets_are_masked() -> None:
    s = load_settings({"BRIDGE_CALLBACK_SIGN_KEY": "abcSECRET123", "BRIDGE_CALLBACK_TOKEN": "tokenSECRETtokenSECRET"})
    assert (s.http.sign_key, s.http.token) == ("abcSECRET123", "tokenSECRETtokenSECRET")
    assert "SECRET" not in repr(s)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_CALLBACK_ALLOWED_CIDRS": "10.0.0.0/8,bogus"}, "BRIDGE_CALLBACK_ALLOWED_CIDRS"),
        ({"BRIDGE_TRUSTED_PROXIES": "300.1.1.1"}, "BRIDGE_TRUSTED_PROXIES"),
        ({"BRIDGE_CALLBACK_TOKEN": "short"}, "BRIDGE_CALLBACK_TOKEN"),
        ({"BRIDGE_CALLBACK_SIGN_KEY": "has space"}, "BRIDGE_CALLBACK_SIGN_KEY"),
    ],
)
def test_invalid_security_settings(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as info:
        load_settings(env)
    if named in ("BRIDGE_CALLBACK_TOKEN", "BRIDGE_CALLBACK_SIGN_KEY"):
        assert env[named] not in str(info.value), "a secret's value must not be echoed"


def test_readme_metrics_exist() -> None:
    import re
    from pathlib import Path

    import bridge.testing
    from bridge.ops.metrics import Metrics

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    fixtures = {name for name in vars(bridge.testing) if name.startswith("vod_bridge")}  # "Testing your consumer"
    documented = set(re.findall(r"`(vod_bridge_[a-z_]+)`", readme)) - fixtures
    exposed = set(re.findall(r"^# TYPE (\S+) ", Metrics().render().decode(), re.MULTILINE))
    missing = {name for name in documented if name not in exposed and name.removesuffix("_total") not in exposed}
    assert documented and not missing


# ---- VOD applications (SubAppId): one poller loop each ----------------------------------------------------------


def test_sub_app_ids_give_one_loop_each_in_order() -> None:
    several = load_settings({"BRIDGE_VOD_SUB_APP_IDS": " 1500002, 1500001 ,"}).poller
    assert several.sub_app_ids == [1500002, 1500001]
    assert several.loop_sub_app_ids() == (1500002, 1500001)
    assert load_settings({"BRIDGE_VOD_SUB_APP_ID": "1500003"}).poller.loop_sub_app_ids() == (1500003,)
    assert load_settings({}).poller.loop_sub_app_ids() == (None,), "no SubAppId: one loop on the default app"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"BRIDGE_VOD_SUB_APP_ID": "1500001", "BRIDGE_VOD_SUB_APP_IDS": "1500001,1500002"},
            "BRIDGE_VOD_SUB_APP_ID and BRIDGE_VOD_SUB_APP_IDS: set one of them, not both",
        ),
        ({"BRIDGE_VOD_SUB_APP_IDS": "1500001,1500002,1500001"}, "BRIDGE_VOD_SUB_APP_IDS: 1500001 is listed twice"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "1500001,abc"}, "BRIDGE_VOD_SUB_APP_IDS: 'abc' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "0"}, "BRIDGE_VOD_SUB_APP_IDS: '0' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "-1500001"}, "BRIDGE_VOD_SUB_APP_IDS: '-1500001' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "+1500001"}, "BRIDGE_VOD_SUB_APP_IDS: '+1500001' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "01500001"}, "BRIDGE_VOD_SUB_APP_IDS: '01500001' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "1500001 1500002"}, "BRIDGE_VOD_SUB_APP_IDS: '1500001 1500002' is not"),
        # Arabic-Indic digits, which int() would take.
        ({"BRIDGE_VOD_SUB_APP_IDS": "\u0661\u0665\u0660\u0660\u0660\u0660\u0661"}, "is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_IDS": "1" * 19}, "is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_ID": "0"}, "BRIDGE_VOD_SUB_APP_ID: '0' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_ID": "-7"}, "BRIDGE_VOD_SUB_APP_ID: '-7' is not a SubAppId"),
        ({"BRIDGE_VOD_SUB_APP_ID": "01500001"}, "BRIDGE_VOD_SUB_APP_ID: '01500001' is not a SubAppId"),
    ],
)
def test_sub_app_ids_are_refused_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert message in info.value.message


def test_a_token_of_digits_only_is_refused_since_it_would_read_as_a_sub_app_id() -> None:
    digits = "1234567890123456"
    with pytest.raises(ConfigError, match=r"BRIDGE_CALLBACK_TOKEN: .*not only digits") as info:
        load_settings({"BRIDGE_CALLBACK_TOKEN": digits})
    assert digits not in str(info.value)
    assert load_settings({"BRIDGE_CALLBACK_TOKEN": digits + "x"}).http.token == digits + "x"


def test_secret_values_are_the_set_values_of_every_secret_setting() -> None:
    settings = load_settings(
        {
            "BRIDGE_KAFKA_SASL_MECHANISM": "PLAIN",
            "BRIDGE_KAFKA_SASL_USERNAME": "bridge",
            "BRIDGE_KAFKA_SASL_PASSWORD": "sasl-pass-123",
            "BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "BRIDGE_CALLBACK_TOKEN": "token-abcdefghijklmnop",
        }
    )
    assert sorted(secret_values(settings)) == ["sasl-pass-123", "token-abcdefghijklmnop"]
    assert {var.path for var in ENV_VARS if var.secret} >= {"kafka.sasl_password", "http.sign_key", "http.token"}
