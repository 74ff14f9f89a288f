from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenbooth.config import load_settings
from tokenbooth.errors import ConfigError

YAML = """
host: 0.0.0.0
port: 9000
upstreams:
  - name: openai
    base_url: https://api.openai.com/v1/
    provider: openai
    api_key_env: OPENAI_API_KEY
    models: [gpt-4o, gpt-4o-mini]
ledger:
  url: sqlite:///from-file.db
"""


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(YAML)
    s = load_settings(f, environ={})
    assert (s.host, s.port, s.ledger.url) == ("0.0.0.0", 9000, "sqlite:///from-file.db")
    assert s.upstreams[0].base_url == "https://api.openai.com/v1"  # trailing slash trimmed
    env = {"TOKENBOOTH_PORT": "9100", "TOKENBOOTH_DB": "sqlite:///env.db", "TOKENBOOTH_LEDGER__BATCH_SIZE": "50"}
    s = load_settings(f, environ=env)
    assert (s.port, s.ledger.url, s.ledger.batch_size) == (9100, "sqlite:///env.db", 50)
    s = load_settings(f, overrides={"port": 9200}, environ=env)
    assert s.port == 9200 and s.ledger.url == "sqlite:///env.db"


def test_config_file_from_env_and_one_line_upstream(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(YAML)
    s = load_settings(environ={"TOKENBOOTH_CONFIG": str(f), "TOKENBOOTH_UPSTREAM": "http://127.0.0.1:1/v1"})
    assert [(u.name, u.models) for u in s.upstreams] == [("default", ("*",))]


def test_the_upstream_key_is_read_from_the_named_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(YAML)
    s = load_settings(f, environ={})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert s.upstreams[0].api_key() == "sk-x"
    assert "sk-x" not in repr(s)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": "eighty"}, "Config 'port' has value 'eighty'"),
        ({"port": 70000}, "Config 'port' has value 70000"),
        ({"ledger": {"batch_size": 0}}, "Config 'ledger.batch_size' has value 0"),
        ({"upstreams": [{"name": "a", "base_url": "ftp://x"}]}, "Config 'upstreams.0.base_url' has value 'ftp://x'"),
        ({"upstreams": [{"name": "a"}]}, "Config key 'upstreams.0.base_url' is required"),
        ({"colour": "blue"}, "Config key 'colour' is not a known setting"),
        ({"upstreams": [{"name": "a", "base_url": "http://x"}, {"name": "a", "base_url": "http://y"}]},
         "repeated: a"),
        ({"pricing": {"fx": {"CNY": -1}}}, "rate for CNY must be positive"),
        ({"upstreams": [{"name": "a", "base_url": "http://x"}], "routes": {"m": [{"upstream": "b"}]}},
         "route 'm' names upstream 'b', which is not configured (upstreams: a)"),
        ({"upstreams": [{"name": "a", "base_url": "http://x", "retry": {"attempts": 0}}]},
         "Config 'upstreams.0.retry.attempts' has value 0"),
    ],
)
def test_bad_values_name_the_key_and_the_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides, environ={})
    assert message in info.value.message


def test_a_url_password_in_a_bad_value_is_masked() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"upstreams": [{"name": "a", "base_url": "ftp://app:hunter2@relay.example/v1"}]},
                      environ={})
    assert "'ftp://app:***@relay.example/v1'" in info.value.message and "hunter2" not in info.value.message
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"upstreams": [{"name": "a", "base_url": "https://x.example/v1",
                                                "proxy": "socks5://app:hunter2@p:1080"}]}, environ={})
    assert "'socks5://app:***@p:1080'" in info.value.message and "hunter2" not in info.value.message


def test_bad_env_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="Config 'port' has value 'x'"):
        load_settings(environ={"TOKENBOOTH_PORT": "x"})


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, environ={})


@pytest.mark.parametrize("url", ["ftp://oapi.dingtalk.com/robot/send?access_token=SECRET",
                                 "https://oapi.dingtalk.com:99999/robot/send?access_token=SECRET",
                                 "https:///services/T0/B0/SECRET"])
def test_a_bad_robot_url_is_refused_without_showing_its_token(tmp_path: Path, url: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"notify": {"slack": {"url": url}}}))
    with pytest.raises(ConfigError, match=r"Config 'notify\.slack\.url' has a value that is not usable") as caught:
        load_settings(str(config), {})
    assert "SECRET" not in caught.value.message
