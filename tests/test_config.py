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
    assert (s.host, s.port, s.ledger.url) == ("0.0.0.0", 9000, f"sqlite:///{tmp_path / 'from-file.db'}")
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


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "c.yaml").write_text("ledger: {url: 'sqlite:///data/l.db', spill_path: spill.jsonl, journal_dir: j}\n"
                                   "pricing: {price_file: prices.yaml}\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings("conf/c.yaml", environ={})
    assert s.ledger.url == "sqlite:///conf/data/l.db"
    assert (s.ledger.spill_path, s.ledger.journal_dir, s.pricing.price_file) == (
        Path("conf/spill.jsonl"), Path("conf/j"), Path("conf/prices.yaml"))
    absolute = load_settings(folder / "c.yaml", environ={"TOKENBOOTH_PRICE_FILE": "env.yaml"},
                             overrides={"ledger": {"spill_path": "flag.jsonl"}})
    assert absolute.ledger.url == f"sqlite:///{folder / 'data/l.db'}"
    assert (absolute.pricing.price_file, absolute.ledger.spill_path) == (Path("env.yaml"), Path("flag.jsonl"))
    (folder / "d.yaml").write_text(f"ledger: {{url: 'sqlite:///{tmp_path}/abs.db'}}\n"
                                   "pricing: {price_file: /etc/prices.yaml}\n")
    kept = load_settings(folder / "d.yaml", environ={})
    assert (kept.ledger.url, kept.pricing.price_file) == (f"sqlite:///{tmp_path}/abs.db", Path("/etc/prices.yaml"))
    (folder / "m.yaml").write_text("ledger: {url: 'sqlite:///:memory:'}\n")
    assert load_settings(folder / "m.yaml", environ={}).ledger.url == "sqlite:///:memory:"


def test_bad_yaml_names_the_file_on_one_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("port: [1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(f, environ={})
    assert f"in \"{f}\", line 1" in info.value.message and "<unicode string>" not in info.value.message
    assert "\n" not in info.value.message


def test_an_unset_upstream_key_variable_warns_by_name_and_keys_mode_refuses() -> None:
    upstreams = [{"name": "a", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "TB_A_KEY"},
                 {"name": "b", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "TB_B_KEY"},
                 {"name": "c", "base_url": "http://127.0.0.1:9/v1"}]
    s = load_settings(overrides={"upstreams": upstreams}, environ={})
    warnings = s.check_upstream_keys({"TB_B_KEY": "sk-b"})
    assert len(warnings) == 1 and "upstream 'a'" in warnings[0] and "TB_A_KEY" in warnings[0]
    assert s.check_upstream_keys({"TB_A_KEY": "sk-a", "TB_B_KEY": "sk-b"}) == []
    keyed = load_settings(overrides={"upstreams": upstreams, "auth": {"mode": "keys"}}, environ={})
    with pytest.raises(ConfigError, match=r"TB_A_KEY \(upstream 'a'\), TB_B_KEY \(upstream 'b'\)"):
        keyed.check_upstream_keys({})
    assert keyed.check_upstream_keys({"TB_A_KEY": "sk-a", "TB_B_KEY": "sk-b"}) == []
