"""Issue 14 part 1: DKIM signing, verified on what a real SMTP server received."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ess_async import ConfigError, Manager
from ess_async.dkim import DkimSigner, from_domain, load_key

from .conftest import SMTPServer, make_config

_RSA = rsa.generate_private_key(65537, 2048)
_ED = ed25519.Ed25519PrivateKey.generate()
_OTHER_RSA = rsa.generate_private_key(65537, 1024)


def _pem(key: object, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
         ) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt,  # type: ignore[attr-defined]
                             serialization.NoEncryption())


def _record(key: object) -> bytes:
    """The DNS TXT record publishing ``key``'s public half."""
    public = key.public_key()  # type: ignore[attr-defined]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


class FakeDNS:
    """dkimpy's ``dnsfunc``: TXT records by name, as a real resolver would answer."""

    def __init__(self, records: dict[str, object]) -> None:
        self.records = {name.encode() + b".": _record(key) for name, key in records.items()}
        self.asked: list[bytes] = []

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.asked.append(name)
        return self.records.get(name)


def _verify(data: bytes, dns: FakeDNS) -> bool:
    return bool(dkim.verify(data, dnsfunc=dns))


def _signature_tags(data: bytes) -> dict[bytes, bytes]:
    d = dkim.DKIM(data)
    sig = next(v for k, v in d.headers if k.lower() == b"dkim-signature")
    return dict(dkim.util.parse_tag_value(sig))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "ess_data" / "dkim"
    folder.mkdir(parents=True)
    (folder / "rsa.pem").write_bytes(_pem(_RSA))
    (folder / "rsa1.pem").write_bytes(_pem(_RSA, serialization.PrivateFormat.TraditionalOpenSSL))
    (folder / "ed.pem").write_bytes(_pem(_ED))
    (folder / "other.pem").write_bytes(_pem(_OTHER_RSA))
    return folder


MESSAGES = [
    dict(subject="Plain ASCII", body="Hello.\nA line with trailing space \n.\nEnd.\n"),
    dict(subject="Grüße aus Köln — 日本語", body="Grüße, naïve café ✓\n" * 30,
         html="<p>Grüße <b>café</b></p>"),
    dict(subject="With attachments", body="See attached.\n",
         attachments=[("report.csv", b"a,b\r\n1,2\n", "text/csv"),
                      ("blob.bin", os.urandom(5000), "application/octet-stream")]),
    dict(subject="Ünïcode and an attachment", body="Anbei: Bericht.\n",
         attachments=[("Bericht für März.txt", "Zeile ä\n".encode(), "text/plain")],
         headers={"List-Unsubscribe": "<mailto:unsub@example.com>"}),
]


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
async def test_received_messages_verify(tmp_path: Path, smtp_server: SMTPServer, keys: Path,
                                        canonicalization: str) -> None:
    """Issue 14 part 1: ASCII and non-ASCII messages, with and without attachments, are
    signed with the default RSA key (PKCS#8 PEM) and verify with dkimpy against the
    public record on the bytes the aiosmtpd server received; simple/simple proves the
    bytes sent are exactly the bytes signed."""
    config = make_config(smtp_server.port, dkim={
        "domain": "example.com", "selector": "s2025", "key_file": "dkim/rsa.pem",
        "canonicalization": canonicalization})
    manager = Manager(tmp_path / "ess_data", config=config)
    for attrs in MESSAGES:
        await manager.create_work(to=["a@example.net", "b@example.org"], **attrs)
    summary = await manager.process_workload()
    assert summary.passed == len(MESSAGES)
    dns = FakeDNS({"s2025._domainkey.example.com": _RSA})
    received = smtp_server.handler.messages
    assert len(received) == len(MESSAGES)
    for message in received:
        assert message.data.startswith(b"DKIM-Signature: ")
        assert _verify(message.data, dns), message.data[:600]
        tags = _signature_tags(message.data)
        assert tags[b"d"] == b"example.com" and tags[b"s"] == b"s2025"
        assert tags[b"a"] == b"rsa-sha256"
        assert tags[b"c"] == canonicalization.encode()
        signed = [h.strip() for h in tags[b"h"].split(b":")]
        assert signed.count(b"from") == 2  # oversigned: no second From can be added
        assert {b"subject", b"date", b"to", b"message-id", b"mime-version"} <= set(signed)
        # Tampering breaks it: the verifier really checks these bytes.
        tampered = message.data.replace(b"Subject:", b"Subject: Re:", 1)
        assert not _verify(tampered, dns)
    # The stored record is the message without a signature: retries sign afresh.
    for path in (tmp_path / "ess_data" / "passed").rglob("*.json"):
        assert "DKIM-Signature" not in path.read_text()


async def test_keys_by_from_domain_ed25519_and_unsigned(tmp_path: Path,
                                                        smtp_server: SMTPServer,
                                                        keys: Path) -> None:
    """Issue 14 part 1: several keys chosen by the From domain (an Ed25519 key, an RSA
    key in PKCS#1 PEM with its own d= domain); a subdomain of the default domain uses the
    default key; a From domain without a key is sent unsigned (OpenDKIM's behaviour)."""
    config = make_config(smtp_server.port, dkim={
        "domain": "example.com", "selector": "main", "key_file": "dkim/rsa1.pem",
        "keys": {"example.org": {"selector": "ed", "key_file": str(keys / "ed.pem")},
                 "shop.example.net": {"selector": "k1", "key_file": "dkim/other.pem",
                                      "domain": "example.net"}}})
    manager = Manager(tmp_path / "ess_data", config=config)
    senders = ["App <app@example.com>", "news@mail.example.com", "ed@example.org",
               "shop@shop.example.net", "x@unrelated.test"]
    for sender in senders:
        await manager.create_work(to="rcpt@example.net", from_=sender, subject=sender,
                                  body="Grüße\n", attachments=[("a.txt", b"x\n", "text/plain")])
    assert (await manager.process_workload()).passed == len(senders)
    dns = FakeDNS({"main._domainkey.example.com": _RSA, "ed._domainkey.example.org": _ED,
                   "k1._domainkey.example.net": _OTHER_RSA})
    by_subject = {str(m.message["Subject"]): m.data for m in smtp_server.handler.messages}
    expected = {senders[0]: (b"example.com", b"rsa-sha256"),
                senders[1]: (b"example.com", b"rsa-sha256"),
                senders[2]: (b"example.org", b"ed25519-sha256"),
                senders[3]: (b"example.net", b"rsa-sha256")}
    for sender, (domain, algorithm) in expected.items():
        data = by_subject[sender]
        assert _verify(data, dns), sender
        tags = _signature_tags(data)
        assert (tags[b"d"], tags[b"a"]) == (domain, algorithm)
    assert b"DKIM-Signature" not in by_subject[senders[4]]


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read"),
    (b"not a key at all\n", "not an unencrypted PEM private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "not an unencrypted PEM private key"),
    ("ec", "not an RSA or Ed25519 key"),
    ("encrypted", "not an unencrypted PEM private key"),
])
async def test_bad_key_file_is_config_error_at_start(tmp_path: Path, content: object,
                                                     problem: str) -> None:
    """Issue 14 part 1: a missing, garbled or encrypted key file, or an EC key, is a
    ConfigError naming the key when delivery starts; nothing is sent, the key is never
    quoted, and the workspace lock is released."""
    path = tmp_path / "key.pem"
    if content == "ec":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    elif content == "encrypted":
        path.write_bytes(_RSA.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    config = make_config(1, dkim={"keys": {"example.com": {"selector": "s",
                                                           "key_file": str(path)}}})
    manager = Manager(tmp_path / "ess_data", config=config)
    await manager.create_work(to="a@example.net", subject="x", body="x")
    with pytest.raises(ConfigError) as info:
        await manager.process_workload()
    assert info.value.key == 'dkim.keys."example.com".key_file'
    assert problem in str(info.value)
    if path.exists():
        secret_line = path.read_bytes().splitlines()[1:2]
        assert not secret_line or secret_line[0].decode() not in str(info.value)
    assert manager.status()["queued"] == 1
    with pytest.raises(ConfigError):  # the lock was released: the same error again
        await manager.process_workload()


def test_load_key_hides_the_key(keys: Path) -> None:
    """Issue 14 part 1: a loaded key's repr names domain, selector and algorithm only."""
    key = load_key(keys / "rsa.pem", domain="example.com", selector="s",
                   config_key="dkim.key_file")
    assert "PRIVATE" not in repr(key) and "example.com" in repr(key)
    assert key.algorithm == "rsa-sha256"
    ed = load_key(keys / "ed.pem", domain="example.com", selector="s",
                  config_key="dkim.key_file")
    assert ed.algorithm == "ed25519-sha256"


def test_config_errors_name_the_key() -> None:
    """Issue 14 part 1: [dkim] values are checked when the config is read."""
    cases = [({"domain": "example.com", "selector": "s"}, "dkim.key_file"),
             ({"selector": "s", "key_file": "k.pem"}, "dkim.domain"),
             ({"domain": "bad domain", "selector": "s", "key_file": "k"}, "dkim.domain"),
             ({"keys": {"example.org": {"key_file": "k"}}}, 'dkim.keys."example.org".selector'),
             ({"keys": {"example.org": {"selector": "s", "key_file": "k", "x": 1}}},
              'dkim.keys."example.org".x'),
             ({"headers": ["subject"]}, "dkim.headers"),
             ({"headers": ["from", "bcc"]}, "dkim.headers"),
             ({"canonicalization": "loose"}, "dkim.canonicalization"),
             ({"selctor": "s"}, "dkim.selctor")]
    for table, key in cases:
        with pytest.raises(ConfigError) as info:
            make_config(25, dkim=table)
        assert info.value.key == key, (table, info.value)


def test_from_domain() -> None:
    """Issue 14 part 1: the key is chosen by the From header's domain (folded, encoded
    display names, case)."""
    assert from_domain(b"Date: x\r\nFrom: =?utf-8?q?J=C3=B6rg?=\r\n <J@Example.COM>\r\n"
                       b"\r\nFrom: not@header.test\r\n") == "example.com"
    assert from_domain(b"Subject: x\r\n\r\nbody") is None


async def test_rsa_signs_in_another_process(keys: Path) -> None:
    """Issue 14 part 1: RSA (pure Python, ~13 ms of CPU holding the GIL) signs in a
    worker process, so the event loop keeps running; Ed25519 in a thread."""
    rsa_key = load_key(keys / "rsa.pem", domain="example.com", selector="s",
                       config_key="dkim.key_file")
    ed_key = load_key(keys / "ed.pem", domain="example.org", selector="s",
                      config_key="dkim.key_file")
    signer = DkimSigner({"example.org": ed_key}, rsa_key)
    try:
        assert isinstance(signer._pool(rsa_key), concurrent.futures.ProcessPoolExecutor)
        assert isinstance(signer._pool(ed_key), concurrent.futures.ThreadPoolExecutor)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(signer._pool(rsa_key), os.getpid) != os.getpid()
        lags: list[float] = []

        async def tick() -> None:
            while True:
                start = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - start - 0.001)

        ticker = asyncio.create_task(tick())
        raw = b"From: a@example.com\r\nSubject: x\r\n\r\n" + b"body\r\n" * 100
        signed = await asyncio.gather(*(signer.sign(raw) for _ in range(10)))
        ticker.cancel()
        assert all(s.endswith(raw) and s.startswith(b"DKIM-Signature:") for s in signed)
        assert signer.signed == 10
        # 10 inline signatures would hold the loop for over 100 ms.
        assert max(lags) < 0.1, max(lags)
    finally:
        signer.close()
