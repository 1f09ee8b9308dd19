"""config.toml: defaults, the template, and one clear ConfigError per bad key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ess_async import Client, ConfigError, Manager
from ess_async.config import CONFIG_TEMPLATE, Config, parse_config


def test_template_parses_to_defaults() -> None:
    assert parse_config(tomllib.loads(CONFIG_TEMPLATE)) == Config()


def test_create_config_writes_template_once(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "ws")
    path = manager.create_config()
    assert path == tmp_path / "ws" / "config.toml"
    assert path.read_text() == CONFIG_TEMPLATE
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ws").stat().st_mode & 0o777 == 0o700
    path.write_text('[server]\nspawn = 7\n')
    assert manager.create_config() == path
    assert path.read_text() == '[server]\nspawn = 7\n'
    assert Manager(tmp_path / "ws").spawn == 7
    assert Manager(tmp_path / "ws", spawn=2).spawn == 2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nspwan = 3\n", "server.spwan"),
        ("[server]\nspawn = 'three'\n", "server.spawn"),
        ("[server]\nspawn = 0\n", "server.spawn"),
        ("[server]\nspawn = true\n", "server.spawn"),
        ("[transport.smtp]\ntls = 'ssl'\n", "transport.smtp.tls"),
        ("[transport.smtp]\nport = '25'\n", "transport.smtp.port"),
        ("[transport.smtp]\npassword = 'hunter2'\n", "transport.smtp.password"),
        ("[retry]\nmin_backoff = -1\n", "retry.min_backoff"),
        ("[retry]\nmin_backoff = 100\nmax_backoff = 10\n", "retry.max_backoff"),
        ("[message]\nfrom = 'not an address'\n", "message.from"),
        ("[message]\nsubject = 'x'\n", "message.subject"),
        ("[bogus]\nx = 1\n", "bogus"),
        ("server = 3\n", "server"),
    ],
)
def test_bad_config_names_key(tmp_path: Path, text: str, key: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    for make in (Manager, Client):
        with pytest.raises(ConfigError) as info:
            make(tmp_path)
        assert info.value.key == key
        assert key in str(info.value)
        assert "hunter2" not in str(info.value)


def test_unparsable_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Manager(tmp_path)


def test_message_defaults_merge_under_message(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[message]\nfrom = "app@example.com"\nreply_to = "help@example.com"\n'
        'headers = { "X-App" = "shop" }\n')
    client = Client(tmp_path)
    record = client.spool.read(client.create_work(to="a@example.com", subject="s"))
    assert record["mail_from"] == "app@example.com"
    assert "Reply-To: help@example.com" in record["raw"]
    assert "X-App: shop" in record["raw"]
    record = client.spool.read(client.create_work(to="a@example.com", from_="me@example.net"))
    assert record["mail_from"] == "me@example.net"


def test_workspace_default_from_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESS_DATA", str(tmp_path / "env_ws"))
    assert Manager().workspace == tmp_path / "env_ws"
    monkeypatch.delenv("ESS_DATA")
    monkeypatch.chdir(tmp_path)
    assert Manager().workspace == tmp_path / "ess_data"
    assert Manager("rel").workspace == tmp_path / "rel"
