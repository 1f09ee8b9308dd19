"""A test outbox for your test suite: the ``ess_outbox`` pytest fixture.

Installed with the package (entry point ``pytest11``), so ``pip install ess_async`` makes
the fixture available in every pytest run::

    async def test_signup(ess_outbox):
        await ess_outbox.manager.create_work(to="a@example.com", subject="Welcome",
                                             body="Hi")
        [message] = ess_outbox.to("a@example.com")   # delivered at once
        assert message.subject == "Welcome"

``ess_outbox.manager`` is a Manager on a temporary workspace whose transport is a
``MemoryTransport``: what it queues is delivered at once (``ess_outbox.deliver_at_once =
False`` turns that off). ``ess_outbox.workspace`` is that workspace and ``$ESS_DATA``
points at it during the test, so a ``Client()`` or a Django backend without a WORKSPACE
setting queues there too: ``await ess_outbox.flush()`` (or ``ess_outbox.flush_sync()``
in a test without an event loop) delivers everything queued and due.
``ess_outbox.messages`` are the delivered messages, parsed (``OutboxMessage``);
``ess_outbox.to(address)`` those sent to an address; ``ess_outbox.clear()`` forgets them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from .config import Config, load_config
from .manager import Manager
from .transports.memory import MemoryTransport, SentMessage

__all__ = ("Attachment", "Outbox", "OutboxMessage", "ess_outbox")


@dataclass(frozen=True)
class Attachment:
    """One attachment of a delivered message."""

    filename: str | None
    content: bytes
    mimetype: str


@dataclass(frozen=True)
class OutboxMessage:
    """A delivered message: its envelope and the bytes sent, with parsed views."""

    sent: SentMessage

    @property
    def mail_from(self) -> str:
        """The envelope sender."""
        return self.sent.mail_from

    @property
    def recipients(self) -> list[str]:
        """The envelope recipients (Bcc included)."""
        return list(self.sent.recipients)

    @property
    def raw(self) -> bytes:
        return self.sent.raw

    @cached_property
    def message(self) -> EmailMessage:
        """The message parsed with ``email.policy.default`` (headers decoded)."""
        msg = BytesParser(policy=policy.default).parsebytes(
            self.sent.raw.replace(b"\r\n", b"\n"))
        assert isinstance(msg, EmailMessage)
        return msg

    @property
    def headers(self) -> dict[str, str]:
        """Each header's (decoded) value; the last one of a repeated header."""
        return {name: str(value) for name, value in self.message.items()}

    def header(self, name: str) -> str | None:
        value = self.message.get(name)
        return None if value is None else str(value)

    @property
    def subject(self) -> str:
        return self.header("Subject") or ""

    @property
    def from_(self) -> str:
        return self.header("From") or ""

    @property
    def to(self) -> list[str]:
        """The To header's addresses (``a@example.com``, without display names)."""
        return self._addresses("To")

    @property
    def cc(self) -> list[str]:
        return self._addresses("Cc")

    def _addresses(self, name: str) -> list[str]:
        value: Any = self.message.get(name)
        return [a.addr_spec for a in value.addresses] if value is not None else []

    @property
    def text(self) -> str | None:
        """The text/plain body, or None."""
        return self._body("plain")

    @property
    def html(self) -> str | None:
        """The text/html body, or None."""
        return self._body("html")

    def _body(self, subtype: str) -> str | None:
        part = self.message.get_body((subtype,))
        if part is None:
            return None
        content = part.get_content()
        return content if isinstance(content, str) else None

    @property
    def attachments(self) -> list[Attachment]:
        found = []
        for part in self.message.iter_attachments():
            content = part.get_content()
            if isinstance(content, str):
                content = content.encode("utf-8")
            elif isinstance(content, EmailMessage):
                content = content.as_bytes()
            found.append(Attachment(part.get_filename(), bytes(content),
                                    part.get_content_type()))
        return found

    def __repr__(self) -> str:
        return (f"OutboxMessage(from={self.mail_from!r}, to={self.recipients!r}, "
                f"subject={self.subject!r})")


#: The ``config.toml`` written into the outbox's workspace (a Client there reads it).
OUTBOX_CONFIG = """\
[message]
from = "test@example.com"

[retry]
min_backoff = 1
max_backoff = 1
"""




class _OutboxManager(Manager):
    """A Manager that delivers what it queues at once (when its outbox says so)."""

    outbox: Outbox

    async def create_work(self, *, priority: str = "normal", send_at: object = None,
                          idempotency_key: str | None = None, **attrs: Any) -> Path | str:
        path = await super().create_work(priority=priority, send_at=send_at,
                                         idempotency_key=idempotency_key, **attrs)
        if self.outbox.deliver_at_once and self._run is None:
            await self.outbox.flush()
        return path


class Outbox:
    """A Manager on ``workspace`` wired to an in-memory transport (see the module).
    Without ``config``, the workspace's ``config.toml`` (written when missing: a default
    sender ``test@example.com``, fast retries)."""

    def __init__(self, workspace: str | os.PathLike[str], *,
                 config: Config | None = None) -> None:
        self.workspace = Path(workspace).absolute()
        if config is None:
            self.workspace.mkdir(parents=True, exist_ok=True)
            path = self.workspace / "config.toml"
            if not path.exists():
                path.write_text(OUTBOX_CONFIG, encoding="utf-8")
            config = load_config(path)
        self.sent: list[SentMessage] = []
        self.deliver_at_once = True
        manager = _OutboxManager(
            self.workspace, config=config,
            spawn=1, transport_factory=lambda: MemoryTransport(self.sent))
        manager.outbox = self
        self.manager: Manager = manager
        self._flushing: asyncio.Lock | None = None

    @property
    def messages(self) -> list[OutboxMessage]:
        """Every message delivered so far, in order."""
        return [OutboxMessage(sent) for sent in self.sent]

    def to(self, address: str) -> list[OutboxMessage]:
        """The messages delivered to ``address`` (envelope, so Bcc counts)."""
        wanted = address.strip().lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.recipients)]

    def clear(self) -> None:
        """Forget the messages delivered so far."""
        self.sent.clear()

    async def flush(self) -> list[OutboxMessage]:
        """Deliver everything queued and due (by anyone: a Client, Django's backend, ...);
        return all delivered messages."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            await self.manager.process_workload()
        return self.messages

    def flush_sync(self) -> list[OutboxMessage]:
        """``flush`` for a test without a running event loop (a Django test)."""
        self._flushing = None  # a lock belongs to one event loop
        return asyncio.run(self.flush())

    def __len__(self) -> int:
        return len(self.sent)

    def __repr__(self) -> str:
        return f"Outbox({self.workspace}, {len(self.sent)} messages)"


@pytest.fixture
def ess_outbox(tmp_path_factory: pytest.TempPathFactory,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbox]:
    """An ``Outbox`` on a fresh workspace; ``$ESS_DATA`` points at it during the test."""
    workspace = tmp_path_factory.mktemp("ess_outbox") / "ess_data"
    outbox = Outbox(workspace)
    monkeypatch.setenv("ESS_DATA", str(outbox.workspace))
    yield outbox
