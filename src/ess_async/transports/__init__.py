"""Transports: where a sender hands a message. ``create_transport`` picks one from config."""

from __future__ import annotations

import functools
from pathlib import Path

from ..config import SmtpConfig, TransportConfig
from .base import SendResult, Transport
from .failover import FailoverTransport
from .file import FileTransport
from .maildir import MaildirTransport
from .pipelining import PipeliningTransport
from .sendmail import SendmailTransport
from .smtp import SMTPTransport

__all__ = ("FailoverTransport", "FileTransport", "MaildirTransport", "PipeliningTransport",
           "SMTPTransport", "SendResult", "SendmailTransport", "Transport",
           "create_transport")


def create_transport(config: TransportConfig, workspace: Path) -> Transport:
    """A new transport instance for one sender."""
    if config.type == "maildir":
        return MaildirTransport(workspace / config.maildir.path)
    if config.type == "sendmail":
        return SendmailTransport(config.sendmail)
    if config.type == "file":
        return FileTransport(workspace / config.file.path)
    if config.type == "memory":
        from .memory import MemoryTransport  # imported only when configured

        return MemoryTransport()
    relays = config.smtp.relays
    if not relays:
        return _smtp(config.smtp)
    # Named relays: the failover order (else [transport.smtp] alone), and every relay by
    # name for messages queued with create_work(transport=...).
    named: dict[str, SmtpConfig] = {"default": config.smtp, **relays}
    return FailoverTransport(
        [(name, _smtp(named[name])) for name in config.failover or ["default"]],
        failback_after=config.failback_after,
        named={name: functools.partial(_smtp, cfg) for name, cfg in named.items()})


def _smtp(config: SmtpConfig) -> Transport:
    if config.pipelining == "auto":
        # Pipelines where the server offers PIPELINING; one command at a time elsewhere.
        return PipeliningTransport(config)
    return SMTPTransport(config)
