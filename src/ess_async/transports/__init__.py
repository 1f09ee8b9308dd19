"""Transports: where a sender hands a message. ``create_transport`` picks one from config."""

from __future__ import annotations

from pathlib import Path

from ..config import TransportConfig
from .base import SendResult, Transport
from .maildir import MaildirTransport
from .smtp import SMTPTransport

__all__ = ("MaildirTransport", "SMTPTransport", "SendResult", "Transport", "create_transport")


def create_transport(config: TransportConfig, workspace: Path) -> Transport:
    """A new transport instance for one sender."""
    if config.type == "maildir":
        return MaildirTransport(workspace / config.maildir.path)
    return SMTPTransport(config.smtp)
