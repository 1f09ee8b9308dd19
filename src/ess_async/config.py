"""Configuration: ``<workspace>/config.toml`` read with tomllib into frozen dataclasses.

Unknown keys and wrong types are rejected with a ConfigError naming the key. Passwords
never live in the file: ``password_env`` names the environment variable that holds one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError, MessageError
from .limits import normalize_domain
from .message import build_message

__all__ = (
    "CONFIG_TEMPLATE",
    "Config",
    "DkimConfig",
    "DkimKeyConfig",
    "DomainLimits",
    "EventsConfig",
    "FileConfig",
    "MaildirConfig",
    "RetryConfig",
    "SendmailConfig",
    "ServerConfig",
    "SmtpConfig",
    "StoreConfig",
    "SuppressionConfig",
    "TransportConfig",
    "check_plaintext_auth",
    "check_store",
    "load_config",
    "parse_config",
    "relay_names",
)


@dataclass(frozen=True)
class ServerConfig:
    spawn: int = 3
    grace: float = 10.0  # seconds in-flight sends get to finish on stop
    max_message_size: int = 50 * 1024 * 1024  # bytes of a spool file
    delivery_log: bool = False  # append every outcome as JSON to <workspace>/delivery.log
    keep_passed_days: float = 0.0  # retention of passed/ records; 0 = keep forever
    keep_failed_days: float = 0.0
    keep_passed: int = 0  # at most this many passed/ records; 0 = no limit
    keep_failed: int = 0
    journal_compact_after: int = 20_000  # journal entries before it is rewritten
    metrics: str = ""  # HOST:PORT serving /metrics (Prometheus) and /healthz; "" = off
    unhealthy_after: float = 300.0  # /healthz says 503 once a due message waited longer


@dataclass(frozen=True)
class RetryConfig:
    min_backoff: float = 60.0
    max_backoff: float = 3600.0
    max_age: float = 5 * 24 * 3600.0
    max_attempts: int = 0  # 0 = no limit but max_age


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 25
    tls: Literal["none", "starttls", "tls"] = "none"
    username: str = ""
    password_env: str = "ESS_SMTP_PASSWORD"
    # Refuse to send a password unencrypted (tls = "none") unless this says so.
    allow_plaintext_auth: bool = False
    # Seconds; the defaults follow RFC 5321 section 4.5.3.2. A legacy ``timeout`` key is
    # read as the default of connect_timeout and command_timeout (see parse_config).
    connect_timeout: float = 30.0  # connect, greeting, EHLO, STARTTLS, AUTH
    command_timeout: float = 300.0  # each reply to MAIL, RCPT, DATA, RSET, NOOP
    data_timeout: float = 180.0  # each block of the message data to be taken by the server
    final_reply_timeout: float = 600.0  # the reply to the end of the data
    local_hostname: str = ""
    tls_ca_file: str = ""
    max_connections: int = 0  # concurrent connections; 0 = one per sender (spawn)
    max_per_second: float = 0.0  # messages per second over all senders; 0 = no cap
    max_messages_per_connection: int = 0  # reconnect after this many; 0 = never
    idle_timeout: float = 5.0  # close a connection no sender has used for this long
    # "auto": pipeline MAIL, RCPT and DATA (RFC 2920) when the server offers PIPELINING;
    # "off": one command at a time (a server that advertises it and breaks it).
    pipelining: Literal["auto", "off"] = "auto"
    # Named relays, from [transport.smtp.NAME] tables: each inherits the keys of
    # [transport.smtp] it does not set (see [transport] failover).
    relays: dict[str, SmtpConfig] = field(default_factory=dict)

    def password(self) -> str | None:
        """The password from the environment; never stored on this object."""
        return os.environ.get(self.password_env) if self.password_env else None


@dataclass(frozen=True)
class MaildirConfig:
    path: str = "maildir"  # relative to the workspace


@dataclass(frozen=True)
class SendmailConfig:
    path: str = "/usr/sbin/sendmail"  # the program each message is piped to
    # Its arguments: "{from}" is replaced by the envelope sender; the recipients follow.
    args: list[str] = field(default_factory=lambda: ["-i", "-f", "{from}", "--"])
    timeout: float = 60.0  # seconds before a program that has not exited is killed


@dataclass(frozen=True)
class FileConfig:
    path: str = "outbox"  # relative to the workspace: one .eml file per message


@dataclass(frozen=True)
class TransportConfig:
    type: Literal["smtp", "maildir", "sendmail", "file", "memory"] = "smtp"
    # Relays tried in this order ([transport.smtp.NAME]); [] = [transport.smtp] alone.
    failover: list[str] = field(default_factory=list)
    failback_after: float = 30.0  # seconds before a relay that failed is tried first again
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    maildir: MaildirConfig = field(default_factory=MaildirConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    file: FileConfig = field(default_factory=FileConfig)


@dataclass(frozen=True)
class SuppressionConfig:
    ttl_days: float = 0.0  # entries older than this are no longer listed; 0 = forever


@dataclass(frozen=True)
class EventsConfig:
    webhook: str = ""  # POST every delivery event as JSON here (http:// or https://)
    secret_env: str = "ESS_EVENTS_SECRET"  # variable holding the HMAC-SHA256 key
    timeout: float = 10.0  # seconds per webhook request
    retries: int = 5  # webhook retries after a network error, 408, 429 or 5xx
    queue_size: int = 10_000  # events waiting per handler before new ones are dropped


@dataclass(frozen=True)
class DkimKeyConfig:
    selector: str = ""
    key_file: str = ""  # PEM (RSA or Ed25519); relative to the workspace
    domain: str = ""  # the d= domain; default: the From domain the key is for


@dataclass(frozen=True)
class DkimConfig:
    domain: str = ""  # the default key's d= domain; signs From this domain and subdomains
    selector: str = ""
    key_file: str = ""  # PEM (RSA or Ed25519); relative to the workspace; "" = no signing
    headers: list[str] = field(default_factory=lambda: [
        "from", "from", "reply-to", "subject", "date", "to", "cc", "message-id",
        "in-reply-to", "references", "mime-version", "content-type",
        "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post", "list-id"])
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                              "simple/simple"] = "relaxed/relaxed"
    keys: dict[str, DkimKeyConfig] = field(default_factory=dict)  # by From domain


@dataclass(frozen=True)
class DomainLimits:
    """[limits."example.com"] (or [limits."*"], every other domain): a recipient domain's
    budget; 0 = no limit. See ess_async.limits."""
    max_connections: int = 0  # messages to the domain in flight at once
    max_per_second: float = 0.0  # sends start at least 1/this s apart
    max_per_minute: int = 0  # sends started in any 60 s window


@dataclass(frozen=True)
class StoreConfig:
    """[store]: where messages live. No url: the workspace's spool folders (one host);
    a postgresql:// url: one database shared by a fleet of hosts (see store.postgres)."""
    url: str = ""  # postgresql://user@host:port/dbname; ESS_STORE_URL / --store win
    schema: str = "ess"  # the PostgreSQL schema holding the store's tables
    password_env: str = ""  # variable holding the password (else PGPASSWORD / .pgpass)
    lease: float = 30.0  # seconds a claim is held without a heartbeat
    pool_size: int = 10  # connections per process at most


@dataclass(frozen=True)
class Config:
    message: dict[str, Any] = field(default_factory=dict)
    store: StoreConfig = field(default_factory=StoreConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    limits: dict[str, DomainLimits] = field(default_factory=dict)  # by recipient domain


_MESSAGE_DEFAULT_KEYS = frozenset({"from", "reply_to", "cc", "bcc", "headers", "tags",
                                   "message_id_domain"})
_ZERO_OR_MORE = {"max_attempts", "max_connections", "max_per_second", "max_per_minute",
                  "max_messages_per_connection", "keep_passed_days", "keep_failed_days",
                  "keep_passed", "keep_failed", "ttl_days", "retries"}
_POSITIVE = {"spawn", "grace", "journal_compact_after", "timeout", "min_backoff",
             "max_backoff", "max_age", "max_message_size", "connect_timeout",
             "command_timeout", "data_timeout", "final_reply_timeout", "idle_timeout",
             "unhealthy_after", "failback_after",
             "queue_size", "lease", "pool_size"}


def _convert(key: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            choices = " | ".join(map(str, get_args(hint)))
            raise ConfigError(key, f"must be one of {choices}, not {value!r}")
        return value
    if origin in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, not {value!r}")
        return list(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    elif hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(key, f"must be an integer, not {value!r}")
    elif hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(key, f"must be a {hint.__name__}, not {value!r}")
    elif hint is float and not isinstance(value, float):
        raise ConfigError(key, f"must be a number, not {value!r}")
    if key.rsplit(".", 1)[-1] in _POSITIVE and value <= 0:
        raise ConfigError(key, f"must be positive, not {value!r}")
    if key.rsplit(".", 1)[-1] in _ZERO_OR_MORE and value < 0:
        raise ConfigError(key, "must be 0 (no limit) or more")
    return value


def relay_names(transport: TransportConfig) -> frozenset[str]:
    """The names ``create_work(transport=...)`` accepts: the named relays and "default"
    (``[transport.smtp]`` itself); none when the config names no relays."""
    relays = transport.smtp.relays
    return frozenset({"default", *relays}) if relays else frozenset()


def _smtp_relays(table: dict[str, Any], prefix: str) -> dict[str, Any]:
    """[transport.smtp.NAME] tables are named relays that inherit the scalar keys of
    [transport.smtp]; returns the table with them gathered under ``relays``."""
    if "relays" in table:
        raise ConfigError(f"{prefix}.relays", "unknown key (name relays [transport.smtp.NAME])")
    base = {k: v for k, v in table.items() if not isinstance(v, dict)}
    relays = {k: v for k, v in table.items() if isinstance(v, dict)}
    for name, sub in relays.items():
        nested = next((k for k, v in sub.items() if isinstance(v, dict)), None)
        if nested is not None:
            raise ConfigError(f'{prefix}.{name}.{nested}', "unknown key")
    return {**base, "relays": {name: {**base, **sub} for name, sub in relays.items()}}


def _build(cls: type[Any], table: object, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(prefix, "must be a table")
    if cls is SmtpConfig and prefix == "transport.smtp":
        table = _smtp_relays(table, prefix)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(full, "unknown key")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full)  # type: ignore[arg-type]
        elif get_origin(hint) is dict and dataclasses.is_dataclass(get_args(hint)[1]):
            if not isinstance(value, dict):  # a table of tables: [dkim.keys."example.org"]
                raise ConfigError(full, "must be a table")
            kwargs[key] = {name: _build(get_args(hint)[1], sub, f'{full}."{name}"')
                           for name, sub in value.items()}
        elif key == "message":
            kwargs[key] = _message_defaults(value)
        else:
            kwargs[key] = _convert(full, hint, value)
    return cls(**kwargs)


def _message_defaults(table: object) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("message", "must be a table")
    for key in table:
        if key not in _MESSAGE_DEFAULT_KEYS:
            raise ConfigError(f"message.{key}", "unknown key")
    defaults = {("from_" if k == "from" else k): v for k, v in table.items()}
    # Validate the defaults once, with a placeholder recipient, so a typo fails at start-up.
    try:
        build_message({"to": "check@example.com"}, {"from_": "check@example.com", **defaults})
    except MessageError as exc:
        raise ConfigError(f"message.{exc.field.removesuffix('_')}", exc.problem) from None
    return defaults


def _legacy_timeout(data: dict[str, Any]) -> dict[str, Any]:
    """``[transport.smtp] timeout`` (one timeout for everything, before the per-phase
    ones): the default of connect_timeout and command_timeout, never of the data or final
    reply timeouts, so an old config cannot cut a legal wait for the final reply short."""
    transport = data.get("transport")
    smtp = transport.get("smtp") if isinstance(transport, dict) else None
    if not isinstance(smtp, dict) or "timeout" not in smtp:
        return data
    smtp = dict(smtp)
    value = _convert("transport.smtp.timeout", float, smtp.pop("timeout"))
    smtp.setdefault("connect_timeout", value)
    smtp.setdefault("command_timeout", value)
    assert isinstance(transport, dict)
    return {**data, "transport": {**transport, "smtp": smtp}}


def check_plaintext_auth(smtp: SmtpConfig) -> None:
    """A password never crosses the network unencrypted unless the config says so."""
    if smtp.username and smtp.tls == "none" and not smtp.allow_plaintext_auth:
        raise ConfigError(
            "transport.smtp.allow_plaintext_auth",
            'username is set but transport.smtp.tls = "none", so the password would be '
            'sent in clear text: set tls = "starttls" (recommended) or "tls", or '
            "allow_plaintext_auth = true for a relay on localhost")


def parse_listen(value: str, key: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9465`` for IPv6) -> (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, f"must be HOST:PORT, such as 127.0.0.1:9465, not {value!r}")
    return host, int(port)


def _check_dkim(dkim: DkimConfig) -> None:
    """Each key names its selector and file (read when delivery starts, not here)."""
    tables: list[tuple[str, DkimKeyConfig | DkimConfig]] = [("dkim", dkim)]
    tables += [(f'dkim.keys."{name}"', key) for name, key in dkim.keys.items()]
    if not dkim.key_file and (dkim.domain or dkim.selector):
        raise ConfigError("dkim.key_file", "is needed with dkim.domain and dkim.selector")
    for prefix, table in tables:
        if table is dkim and not dkim.key_file:
            continue
        domain = table.domain or (prefix.split('"')[1] if table is not dkim else "")
        for name in ("domain", "selector", "key_file"):
            if name == "domain" and table is not dkim:
                continue
            if not getattr(table, name):
                raise ConfigError(f"{prefix}.{name}", "is needed to sign")
        for name, value in (("domain", domain), ("selector", table.selector)):
            labels = value.rstrip(".").split(".")
            if not value.isascii() or not all(
                    label and all(c.isalnum() or c in "-_" for c in label) for label in labels):
                raise ConfigError(f"{prefix}.{name}" if name != "domain" or table.domain
                                  else prefix, f"not a DNS name: {value!r}")
    if "from" not in [h.lower() for h in dkim.headers]:
        raise ConfigError("dkim.headers", "must include From (RFC 6376)")
    for header in dkim.headers:
        if header.lower() in ("bcc", "resent-bcc", "return-path", "received", "dkim-signature"):
            raise ConfigError("dkim.headers", f"{header} must not be signed")


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_store(store: StoreConfig, key: str = "store.url") -> None:
    """A postgresql:// URL without a password (it never lives in a file), and a plain
    schema name."""
    url = store.url
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(key, f"must be a postgresql:// URL, not {url.split(':')[0]!r}")
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        if ":" in netloc.rpartition("@")[0] or "password=" in url:
            raise ConfigError(key, "must not hold a password: set PGPASSWORD or name a "
                              "variable in [store] password_env")
    if not _SCHEMA_NAME.match(store.schema):
        raise ConfigError("store.schema", f"must be a lowercase SQL name, not {store.schema!r}")


def _check_limits(limits: dict[str, DomainLimits]) -> None:
    """Each [limits."DOMAIN"] names a domain (or "*") once, whatever its case."""
    seen: dict[str, str] = {}
    for name in limits:
        if name == "*":
            continue
        domain = normalize_domain(name)
        if not domain or "@" in name or any(c.isspace() or c in '<>[]",;' for c in name):
            raise ConfigError(f'limits."{name}"', 'not a domain (or "*" for every domain)')
        if domain in seen:
            raise ConfigError(f'limits."{name}"', f'the same domain as limits."{seen[domain]}"')
        seen[domain] = name


def parse_config(data: dict[str, Any], source: object = None) -> Config:
    """Build a Config from an already-parsed TOML document."""
    try:
        config: Config = _build(Config, _legacy_timeout(data), "")
        if config.transport.type == "smtp":
            check_plaintext_auth(config.transport.smtp)
            for relay in config.transport.smtp.relays.values():
                check_plaintext_auth(relay)
        for name in config.transport.failover:
            if name not in relay_names(config.transport):
                raise ConfigError("transport.failover",
                                  f"no relay {name!r}: define it as [transport.smtp.{name}]")
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, path=source) from None
    if config.retry.max_backoff < config.retry.min_backoff:
        raise ConfigError("retry.max_backoff", "must be at least retry.min_backoff", path=source)
    try:
        _check_dkim(config.dkim)
        if config.server.metrics:
            parse_listen(config.server.metrics, "server.metrics")
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, path=source) from None
    try:
        check_store(config.store)
        _check_limits(config.limits)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, path=source) from None
    webhook = config.events.webhook
    if webhook and (not webhook.startswith(("http://", "https://"))
                    or not webhook.split("://", 1)[1]):
        raise ConfigError("events.webhook", f"must be an http:// or https:// URL, not "
                          f"{webhook[:80]!r}", path=source)
    return config


def load_config(path: Path) -> Config:
    """Read ``path``; a missing file means all defaults."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read: {exc}", path=path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", path=path) from None
    return parse_config(data, path)


CONFIG_TEMPLATE = """\
# ess_async configuration. Every key is optional; the values shown are the defaults.

[message]
# Defaults merged under every message; a message's own values win.
# from = "app@example.com"
# reply_to = "support@example.com"
# headers = { "X-Mailer" = "ess_async" }
# message_id_domain = "example.com"   # Message-IDs end in @this; default: the sender's domain

[server]
spawn = 3            # concurrent senders, each with its own SMTP connection
grace = 10           # seconds in-flight sends may finish when stopping
# max_message_size = 52428800
delivery_log = false # true: append each outcome as a JSON line to delivery.log
keep_passed_days = 0 # retention: remove passed/ records older than this; 0 = keep
keep_failed_days = 0
keep_passed = 0      # retention: keep at most this many passed/ records; 0 = no limit
keep_failed = 0
# journal_compact_after = 20000   # claims journal entries before it is rewritten
metrics = ""         # "127.0.0.1:9465": Prometheus /metrics and /healthz there; "" = off
unhealthy_after = 300  # /healthz is 503 once the oldest due message waited this long

[retry]
min_backoff = 60     # seconds before a temporarily failed message is tried again
max_backoff = 3600
max_age = 432000     # 5 days, then the message fails
max_attempts = 0     # 0 = no limit but max_age

[transport]
type = "smtp"        # smtp | sendmail (pipe to a program) | maildir | file (one .eml
                     # file per message) | memory; maildir and file are for development
# failover = ["primary", "backup"]   # relays [transport.smtp.NAME] (each inherits the
                                     # keys of [transport.smtp]), tried in this order
# failback_after = 30                # seconds before a failed relay is tried first again

[transport.smtp]
host = "127.0.0.1"
port = 25
tls = "none"         # none | starttls | tls (certificates are verified); use "starttls"
                     # (or "tls") for any server but a relay on this machine
username = ""        # with tls = "none", AUTH needs allow_plaintext_auth = true
password_env = "ESS_SMTP_PASSWORD"   # the password comes from this environment variable
allow_plaintext_auth = false     # true: send the password unencrypted (a localhost relay)
connect_timeout = 30             # seconds: connect, greeting, EHLO, STARTTLS, AUTH
command_timeout = 300            # seconds for each reply to MAIL, RCPT, DATA, RSET, NOOP
data_timeout = 180               # seconds for the server to take each block of the data
final_reply_timeout = 600        # seconds for the reply to the end of the data (RFC 5321)
# tls_ca_file = "/path/to/private-ca.pem"
max_connections = 0              # 0 = one per sender
max_per_second = 0               # 0 = no rate cap
max_messages_per_connection = 0  # 0 = keep connections open
idle_timeout = 5                 # seconds an unused connection stays open
pipelining = "auto"              # auto | off: MAIL, RCPT and DATA in one write (RFC 2920)

[transport.maildir]
path = "maildir"     # relative to the workspace

[transport.sendmail]
path = "/usr/sbin/sendmail"      # the program each message is piped to (LF line ends)
args = ["-i", "-f", "{from}", "--"]   # {from}: the envelope sender; recipients follow
timeout = 60                     # seconds; a program still running then is killed

[transport.file]
path = "outbox"      # relative to the workspace: <id>.eml per message, as sent (CRLF)

[suppression]        # addresses never sent to (ess-async suppress list|add|remove|check)
ttl_days = 0         # entries older than this are forgotten; 0 = kept until removed

[events]             # delivery events (Manager(on_event=...)) also POSTed to a webhook
webhook = ""         # "https://hooks.example.com/ess": JSON, needs ess_async[events]
secret_env = "ESS_EVENTS_SECRET"   # HMAC-SHA256 key for X-Ess-Signature (required with
                                   # a webhook); the secret never goes in this file
timeout = 10         # seconds per webhook request
retries = 5          # after network errors, 408, 429 and 5xx (1 s, 2 s, 4 s, ... backoff)
queue_size = 10000   # events waiting per handler; beyond that new ones are dropped

# [limits."example.com"]  # a recipient domain's budget (issue 14); 0 = no limit.
# max_connections = 0      # messages to it in flight at once
# max_per_second = 0       # sends start at least 1/this seconds apart (no burst)
# max_per_minute = 0       # at most this many sends start in any 60 s window
#
# [limits."*"]             # the default: a budget of its own for every other domain
# max_per_second = 0
#
# Messages over a domain's budget wait in queued/ (no attempt counted) while other
# domains flow; a push-back reply to a domain's recipients slows that domain alone.

[dkim]
# Sign with DKIM (pip install 'ess_async[dkim]'). The default key signs messages whose
# From domain is `domain` or a subdomain of it; other From domains need a key below, or
# go unsigned. Key files (PEM, RSA >= 1024 bits or Ed25519) are read when delivery
# starts; relative paths are in the workspace.
# domain = "example.com"
# selector = "s2025"               # publish the key at s2025._domainkey.example.com
# key_file = "dkim/s2025.pem"
# headers = ["from", "from", "reply-to", "subject", "date", "to", "cc", "message-id",
#            "in-reply-to", "references", "mime-version", "content-type",
#            "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
#            "list-id"]            # From twice: a second From breaks the signature
# canonicalization = "relaxed/relaxed"   # header/body: relaxed or simple
#
# [dkim.keys."example.org"]        # messages From example.org (domain defaults to it)
# selector = "mail"
# key_file = "dkim/example.org.pem"
"""
