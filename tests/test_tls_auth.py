"""TLS (STARTTLS and implicit) against a local server with a test CA, certificate
verification by default, and AUTH credentials that never leak."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from ess_async import Manager
from ess_async.config import SmtpConfig
from ess_async.errors import ConfigError
from ess_async.spool import decode_record
from ess_async.transports.smtp import SMTPTransport

from .conftest import SMTPServer, make_config, write_config

PASSWORD = "s3cret-Pa55-w0rd"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"app" and \
        auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # handled=False: the server replies 535


def tls_server(ca: trustme.CA, *, implicit: bool, hosts: tuple[str, ...] = ("127.0.0.1",),
               auth: bool = False) -> SMTPServer:
    context = server_context(ca, *hosts)
    kwargs: dict[str, object] = {"ssl_context": context} if implicit else {
        "tls_context": context, "require_starttls": True}
    if auth:
        kwargs.update(authenticator=authenticator, auth_require_tls=True)
    server = SMTPServer(**kwargs)
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[SMTPServer]]:
    started: list[SMTPServer] = []
    yield started
    for server in started:
        server.stop()


def smtp(port: int, **values: object) -> dict[str, object]:
    return {"smtp": {"host": "127.0.0.1", "port": port, "timeout": 5, **values}}


@pytest.mark.parametrize(("tls", "implicit"), [("starttls", False), ("tls", True)])
async def test_tls_with_private_ca(tmp_path: Path, ca: trustme.CA, ca_file: Path,
                                   servers: list[SMTPServer], tls: str,
                                   implicit: bool) -> None:
    servers.append(server := tls_server(ca, implicit=implicit))
    config = make_config(server.port, transport=smtp(server.port, tls=tls,
                                                     tls_ca_file=str(ca_file)))
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="over tls")
    assert (await manager.process_workload()).passed == 1
    assert server.handler.subjects() == ["over tls"]


@pytest.mark.parametrize(("hosts", "ca_trusted", "expect"), [
    (("127.0.0.1",), False, "certificate verify failed"),
    (("mail.example.org",), True, "certificate verify failed"),
])
async def test_certificate_checked_by_default(tmp_path: Path, ca: trustme.CA, ca_file: Path,
                                              servers: list[SMTPServer],
                                              hosts: tuple[str, ...], ca_trusted: bool,
                                              expect: str) -> None:
    servers.append(server := tls_server(ca, implicit=False, hosts=hosts))
    extra = {"tls_ca_file": str(ca_file)} if ca_trusted else {}
    config = make_config(server.port, transport=smtp(server.port, tls="starttls", **extra))
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="must not go out")
    summary = await manager.process_workload()
    assert summary.total == 0  # a TLS failure is the relay's: the message waits, uncharged
    (path,) = list((tmp_path / "ws" / "queued").glob("*.json"))
    record = decode_record(path.read_bytes())
    assert record["attempts"] == 0 and record["last_error"]["destination"] is True
    message = record["last_error"]["message"]
    assert expect in message
    if not ca_trusted:
        assert "self-signed" in message or "unable to get local issuer" in message
    else:
        assert "mail.example.org" in message or "mismatch" in message or "IP address" in message
    assert server.handler.messages == []


async def test_auth_with_password_from_environment(tmp_path: Path, ca: trustme.CA,
                                                   ca_file: Path, servers: list[SMTPServer],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    servers.append(server := tls_server(ca, implicit=False, auth=True))
    monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
    config = make_config(server.port, transport=smtp(
        server.port, tls="starttls", tls_ca_file=str(ca_file), username="app",
        password_env="TEST_SMTP_PASSWORD"))
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="authenticated")
    assert (await manager.process_workload()).passed == 1

    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong-" + PASSWORD)
    await manager.create_work(to="a@example.com", subject="bad password")
    assert (await manager.process_workload()).total == 0  # waits in queued/, uncharged
    (path,) = list((tmp_path / "ws" / "queued").glob("*.json"))
    record = decode_record(path.read_bytes())
    assert "authentication failed" in record["last_error"]["message"]
    assert record["attempts"] == 0
    assert server.handler.subjects() == ["authenticated"]


def test_plaintext_auth_is_a_config_error(tmp_path: Path) -> None:
    """Issue 8 item 10: a username with tls = "none" would send the password in clear
    text; unless allow_plaintext_auth says so, that is a ConfigError naming the setting,
    at load time (Manager, Client and the CLI all fail fast)."""
    ws = tmp_path / "ws"
    write_config(ws, 2525, extra='username = "app"\n')
    with pytest.raises(ConfigError) as caught:
        Manager(ws)
    assert caught.value.key == "transport.smtp.allow_plaintext_auth"
    assert 'tls = "none"' in str(caught.value) and "starttls" in str(caught.value)
    with pytest.raises(ConfigError, match="allow_plaintext_auth"):
        SMTPTransport(SmtpConfig(username="app"))  # a config built in code, too
    # Encrypted, or explicitly allowed, or not SMTP at all: fine.
    for values in ({"tls": "starttls"}, {"tls": "tls"}, {"allow_plaintext_auth": True}):
        make_config(2525, transport=smtp(2525, username="app", **values))
    make_config(2525, transport={"type": "maildir", **smtp(2525, username="app")})


async def test_plaintext_auth_when_allowed(tmp_path: Path, servers: list[SMTPServer],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8 item 10: allow_plaintext_auth = true (a relay on localhost) authenticates
    over an unencrypted connection."""
    server = SMTPServer(authenticator=authenticator, auth_require_tls=False)
    server.start()
    servers.append(server)
    monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
    config = make_config(server.port, transport=smtp(
        server.port, username="app", password_env="TEST_SMTP_PASSWORD",
        allow_plaintext_auth=True))
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="plain auth")
    assert (await manager.process_workload()).passed == 1
    assert server.handler.subjects() == ["plain auth"]


def secret_forms(secret: str) -> list[bytes]:
    """The secret, and the base64 forms AUTH PLAIN/LOGIN would carry it in."""
    raw = secret.encode()
    forms = [raw, base64.b64encode(raw), base64.b64encode(b"\0app\0" + raw)]
    return forms + [f.lower() for f in forms]


def test_credentials_never_leak(tmp_path: Path, ca: trustme.CA, ca_file: Path,
                                servers: list[SMTPServer]) -> None:
    servers.append(server := tls_server(ca, implicit=False, auth=True))
    ws = tmp_path / "ws"
    write_config(ws, server.port, extra=(
        f'tls = "starttls"\ntls_ca_file = "{ca_file}"\nusername = "app"\n'
        'password_env = "TEST_SMTP_PASSWORD"\n'))
    outputs: list[bytes] = []
    for password in (PASSWORD, "wrong-" + PASSWORD):
        env = {**os.environ, "TEST_SMTP_PASSWORD": password}
        for args in (["email", "--to", "a@example.com", "--subject", "s", "--body", "b"],
                     ["process"], ["status"], ["status", "--json"], ["list"]):
            proc = subprocess.run(
                [sys.executable, "-m", "ess_async", "--log-level", "DEBUG", *args,
                 "--workspace", str(ws)], env=env, capture_output=True, timeout=60)
            outputs += [proc.stdout, proc.stderr]
    assert server.handler.subjects() == ["s"]  # the right password worked
    files = [p.read_bytes() for p in ws.rglob("*") if p.is_file()]
    assert any(b"authentication failed" in blob for blob in files)  # the wrong one did not
    for blob in outputs + files:
        for form in secret_forms(PASSWORD):
            assert form not in blob


async def test_starttls_required_but_not_offered(tmp_path: Path,
                                                 smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port,
                         transport=smtp(smtp_server.port, tls="starttls"))
    manager = Manager(tmp_path / "ws", config=config)
    await manager.create_work(to="a@example.com", subject="plain server")
    assert (await asyncio.wait_for(manager.process_workload(), 30)).total == 0
    assert manager.status()["queued"] == 1  # a configuration mistake: never failed/
    assert smtp_server.handler.messages == []
