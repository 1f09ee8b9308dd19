"""DKIM signing (RFC 6376, RFC 8463) at delivery time, off the event loop.

``[dkim]`` in the config names a default key (``domain``, ``selector``, ``key_file``) and
``[dkim.keys."<From domain>"]`` more keys by the domain of the message's From address. A
message whose From domain has a key of its own is signed with it; otherwise with the
default key when its From domain is ``domain`` or a subdomain of it (DMARC relaxed
alignment); otherwise it goes unsigned (OpenDKIM's behaviour for mail from a domain it
has no key for), logged once per domain.

Keys are PEM files (RSA, PKCS#1 or PKCS#8, at least 1024 bits; or Ed25519, PKCS#8), read
once when delivery starts: an unreadable or unusable key is a ConfigError then. Key
material is never logged or put in an error message.

Signing happens at each delivery attempt, on the exact bytes handed to the transport
(after the Date is stamped at the first attempt). RSA signs in a process pool: dkimpy's
RSA is pure Python (13.5 ms of CPU per 2048-bit signature, mostly in ``pow`` calls that
hold the GIL, so a thread still stalls the loop: 34 ms worst tick in a thread, 4.7 ms in
a process; ``benchmarks/dkim_sign.py``). Ed25519 (0.7 ms, PyNaCl releases the GIL) signs
in a thread. dkimpy, PyNaCl (Ed25519) and cryptography (PEM) are the ``dkim`` extra:
``pip install 'ess_async[dkim]'``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from .errors import ConfigError, TemporaryDeliveryError

__all__ = ("DEFAULT_HEADERS", "DkimKey", "DkimSigner", "from_domain", "load_key")

logger = logging.getLogger("ess_async.dkim")

# RFC 6376 section 5.4.1's recommended list; From is signed twice (oversigned), so a
# second From cannot be added without breaking the signature. Absent fields are skipped.
DEFAULT_HEADERS = ("from", "from", "reply-to", "subject", "date", "to", "cc", "message-id",
                   "in-reply-to", "references", "mime-version", "content-type",
                   "content-transfer-encoding", "list-unsubscribe",
                   "list-unsubscribe-post", "list-id")

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM_LINE = re.compile(rb"^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class DkimKey:
    """One signing key: the ``d=`` domain, the selector, and the key as dkimpy takes it
    (repr hides the key)."""

    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    secret: bytes

    def __repr__(self) -> str:
        return f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, " \
               f"algorithm={self.algorithm!r})"


def load_key(path: Path, *, domain: str, selector: str, config_key: str) -> DkimKey:
    """Read a PEM private key; any problem is a ConfigError naming ``config_key``."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    except ImportError:
        raise ConfigError(config_key, "DKIM signing needs the dkim extra: "
                                      "pip install 'ess_async[dkim]'") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(config_key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, Exception):
        # The library's message could quote the file: say only what is wrong.
        raise ConfigError(config_key, f"{str(path)!r} is not an unencrypted PEM private "
                                      "key") from None
    del data
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise ConfigError(config_key, f"RSA key of {key.key_size} bits: DKIM needs at "
                                          "least 1024 (2048 recommended; RFC 8301)")
        secret = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption())
        algorithm = "rsa-sha256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        secret = base64.b64encode(key.private_bytes(serialization.Encoding.Raw,
                                                    serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption()))
        algorithm = "ed25519-sha256"
    else:
        raise ConfigError(config_key, f"{str(path)!r}: not an RSA or Ed25519 key")
    loaded = DkimKey(domain=domain, selector=selector, algorithm=algorithm, secret=secret)
    try:  # fail now, not at the first message: dkimpy or PyNaCl missing, a bad key
        sign_message(loaded, b"From: a@" + domain.encode() + b"\r\n\r\nx\r\n",
                     ("from",), "relaxed/relaxed")
    except ImportError:
        raise ConfigError(config_key, "DKIM signing needs the dkim extra: "
                                      "pip install 'ess_async[dkim]'") from None
    except Exception as exc:
        raise ConfigError(config_key, f"this key cannot sign: {type(exc).__name__}") from None
    return loaded


def from_domain(raw: bytes) -> str | None:
    """The lower-cased domain of the (first) From address in ``raw``'s header."""
    match = _HEADER_END.search(raw)
    head = raw[:match.start()] if match else raw
    found = _FROM_LINE.search(head)
    if found is None:
        return None
    value = re.sub(rb"\r?\n", b"", found.group(1)).decode("utf-8", "replace")
    for _, address in getaddresses([value]):
        if "@" in address:
            return address.rsplit("@", 1)[1].strip().rstrip(".").lower() or None
    return None


def sign_message(key: DkimKey, raw: bytes, headers: tuple[str, ...],
                 canonicalization: str) -> bytes:
    """The DKIM-Signature header field (CRLF-terminated) for ``raw``. Runs in a worker
    process; module level so that it pickles."""
    import dkim

    header, _, body = canonicalization.partition("/")
    signature: bytes = dkim.sign(
        raw, key.selector.encode("ascii"), key.domain.encode("ascii"), key.secret,
        canonicalize=(header.encode("ascii"), body.encode("ascii")),
        include_headers=[h.encode("ascii") for h in headers],
        signature_algorithm=key.algorithm.encode("ascii"), linesep=b"\r\n")
    return signature


class DkimSigner:
    """Picks the key for a message and signs it in a process pool."""

    def __init__(self, keys: dict[str, DkimKey], default: DkimKey | None, *,
                 headers: tuple[str, ...] = DEFAULT_HEADERS,
                 canonicalization: str = "relaxed/relaxed", workers: int = 0) -> None:
        self.keys = {domain.lower(): key for domain, key in keys.items()}
        self.default = default
        self.headers = headers
        self.canonicalization = canonicalization
        # One core stays with the event loop.
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) - 1))
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._warned: set[str] = set()
        self.signed = 0
        self.unsigned = 0

    @classmethod
    def from_config(cls, config: Any, workspace: Path) -> DkimSigner | None:
        """The signer for ``config`` (a DkimConfig), or None when no key is configured;
        reads every key file now."""
        def path(name: str) -> Path:
            p = Path(name).expanduser()
            return p if p.is_absolute() else workspace / p

        default = None
        if config.key_file:
            default = load_key(path(config.key_file), domain=config.domain,
                               selector=config.selector, config_key="dkim.key_file")
        keys = {}
        for name, entry in config.keys.items():
            keys[name] = load_key(path(entry.key_file), domain=entry.domain or name,
                                  selector=entry.selector,
                                  config_key=f'dkim.keys."{name}".key_file')
        if default is None and not keys:
            return None
        return cls(keys, default, headers=tuple(h.lower() for h in config.headers),
                   canonicalization=config.canonicalization)

    def key_for(self, raw: bytes) -> DkimKey | None:
        domain = from_domain(raw)
        if domain is None:
            return None
        key = self.keys.get(domain)
        if key is not None:
            return key
        default = self.default
        if default is not None and (domain == default.domain.lower()
                                    or domain.endswith("." + default.domain.lower())):
            return default
        if domain not in self._warned and len(self._warned) < 1000:
            self._warned.add(domain)
            logger.warning("no DKIM key for From domain %s: its messages are sent unsigned",
                           domain)
        return None

    def _pool(self, key: DkimKey) -> concurrent.futures.Executor:
        if key.algorithm == "ed25519-sha256":
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="ess-dkim")
            return self._threads
        if self._processes is None:
            # spawn, not fork: this process has threads (the loop's, asyncio.to_thread's).
            self._processes = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._processes

    async def sign(self, raw: bytes) -> bytes:
        """``raw`` with a DKIM-Signature prepended, or ``raw`` itself when no key is for
        its From domain. A signing failure is a temporary delivery error (the message
        is retried, as OpenDKIM's default tempfail does), never an unsigned send."""
        key = self.key_for(raw)
        if key is None:
            self.unsigned += 1
            return raw
        loop = asyncio.get_running_loop()
        try:
            header = await loop.run_in_executor(self._pool(key), sign_message, key, raw,
                                                self.headers, self.canonicalization)
        except concurrent.futures.process.BrokenProcessPool:
            self._processes = None  # a worker died: a new pool for the next message
            raise TemporaryDeliveryError("DKIM signing failed: the signing process "
                                         "died") from None
        except Exception as exc:
            raise TemporaryDeliveryError(
                f"DKIM signing failed: {type(exc).__name__}: {exc}") from None
        self.signed += 1
        return header + raw

    def close(self) -> None:
        """Stop the workers (a send still signing gets a temporary error)."""
        for executor in (self._processes, self._threads):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._processes = self._threads = None
