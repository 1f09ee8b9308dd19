"""Issue 13 part 1: ``EMAIL_BACKEND = "ess_async.django.EmailBackend"`` with real Django
(settings.configure, its mail API, a real SQLite transaction) delivering to aiosmtpd."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        EMAIL_BACKEND="ess_async.django.EmailBackend",
        DEFAULT_FROM_EMAIL="App <app@example.com>",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()

from django.core import mail  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from ess_async import Manager, MessageError  # noqa: E402
from ess_async.spool import decode_record  # noqa: E402
from tests.conftest import SMTPServer, make_config, write_config  # noqa: E402


@pytest.fixture
def workspace(tmp_path: Path, smtp_server: SMTPServer) -> Iterator[Path]:
    ws = tmp_path / "ess_data"
    write_config(ws, smtp_server.port)
    with override_settings(ESS_ASYNC={"WORKSPACE": str(ws)}):
        yield ws


def _deliver(workspace: Path, smtp_server: SMTPServer) -> None:
    manager = Manager(workspace, config=make_config(smtp_server.port))
    asyncio.run(manager.process_workload())


def _queued(workspace: Path) -> list[dict[str, object]]:
    return [decode_record(p.read_bytes()) for p in sorted((workspace / "queued").glob("*.json"))]


def test_send_mail_and_mass_mail_are_delivered(workspace: Path,
                                               smtp_server: SMTPServer) -> None:
    """Issue 13 part 1: send_mail and send_mass_mail queue into the workspace and return
    the count; the server gets Django's messages."""
    assert mail.send_mail("Hello", "Body text", None, ["a@example.com"]) == 1
    sent = mail.send_mass_mail([("One", "1", "x@example.com", ["b@example.com"]),
                                ("Two", "2", "y@example.com", ["c@example.com"])])
    assert sent == 2
    assert len(_queued(workspace)) == 3
    _deliver(workspace, smtp_server)
    smtp_server.handler.wait_for(3)
    by_subject = {m.message["Subject"]: m for m in smtp_server.handler.messages}
    assert by_subject["Hello"].mail_from == "app@example.com"
    assert by_subject["Hello"].message["From"] == "App <app@example.com>"
    assert by_subject["Hello"].message.get_content() == "Body text\n"
    assert by_subject["Two"].rcpt_tos == ["c@example.com"]


def test_email_multi_alternatives_with_everything(workspace: Path, tmp_path: Path,
                                                  smtp_server: SMTPServer) -> None:
    """Issue 13 part 1: EmailMultiAlternatives with HTML, a file and an in-memory
    attachment, cc, bcc, reply-to and a custom header: all kept; bcc on the envelope only."""
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    msg = mail.EmailMultiAlternatives(
        "Grüße", "Hallo Welt", "shop@example.com", ["to@example.com"],
        cc=["cc@example.com"], bcc=["hidden@example.com"], reply_to=["help@example.com"],
        headers={"X-Campaign": "spring"})
    msg.attach_alternative("<p>Hallo <b>Welt</b></p>", "text/html")
    msg.attach_file(str(report))
    msg.attach("logo.png", b"\x89PNG\r\n\x1a\n\x00", "image/png")
    assert msg.send() == 1
    _deliver(workspace, smtp_server)
    smtp_server.handler.wait_for(1)
    got = smtp_server.handler.messages[0]
    assert got.mail_from == "shop@example.com"
    assert sorted(got.rcpt_tos) == ["cc@example.com", "hidden@example.com", "to@example.com"]
    assert b"hidden@example.com" not in got.data
    assert got.data.isascii()
    parsed = got.message
    assert parsed["Subject"] == "Grüße"
    assert parsed["Cc"] == "cc@example.com"
    assert parsed["Reply-To"] == "help@example.com"
    assert parsed["X-Campaign"] == "spring"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and text.get_content() == "Hallo Welt"
    assert html is not None and html.get_content() == "<p>Hallo <b>Welt</b></p>"
    attachments = {a.get_filename(): a.get_content() for a in parsed.iter_attachments()}
    assert attachments["logo.png"] == b"\x89PNG\r\n\x1a\n\x00"
    assert attachments["report.csv"] in ("a,b\n1,2\n", b"a,b\n1,2\n")


def test_option_headers_are_applied_and_removed(workspace: Path) -> None:
    """Issue 13 part 1: X-ESS-Priority, X-ESS-Send-At and X-ESS-Idempotency-Key set the
    options and are not in the spooled message; a repeated key queues nothing new."""
    headers = {"X-ESS-Priority": "high", "X-ESS-Send-At": "2099-12-01T09:00:00+01:00",
               "X-ESS-Idempotency-Key": "welcome-42"}
    message = mail.EmailMessage("Later", "body", None, ["a@example.com"], headers=headers)
    assert message.send() == 1
    assert mail.EmailMessage("Later", "body", None, ["a@example.com"],
                             headers=headers).send() == 1
    records = [decode_record(p.read_bytes()) for p in (workspace / "scheduled").glob("*.json")]
    assert len(records) == 1
    [record] = records
    assert record["priority"] == "high"
    assert record["send_at"] == datetime(2099, 12, 1, 8, 0, tzinfo=UTC).timestamp()
    assert "X-ESS" not in record["raw"] and "x-ess" not in record["raw"].lower()


def test_connection_kwargs_and_bad_header(tmp_path: Path, workspace: Path) -> None:
    """Issue 13 part 1: get_connection(backend, workspace=...) overrides the setting; a bad
    X-ESS-Send-At raises MessageError, or is skipped (count 0) with fail_silently."""
    other = tmp_path / "other"
    connection_ = mail.get_connection("ess_async.django.EmailBackend", workspace=str(other))
    assert mail.send_mail("Hi", "x", "me@example.com", ["a@example.com"],
                          connection=connection_) == 1
    assert len(_queued(other)) == 1 and not _queued(workspace)
    bad = mail.EmailMessage("Hi", "x", None, ["a@example.com"],
                            headers={"X-ESS-Send-At": "2099-12-01T09:00:00"})
    with pytest.raises(MessageError) as info:
        bad.send()
    assert info.value.field == "headers.X-ESS-Send-At"
    bad.connection = None  # Django keeps the connection of the first send
    assert bad.send(fail_silently=True) == 0
    with pytest.raises(MessageError) as info:
        mail.send_mail("Hi", "x", None, ["ok@example.com", "bad@@example.com"])
    assert info.value.field == "to[1]"
    with override_settings(ESS_ASYNC={"WORKSPACE": str(workspace), "FAIL_SILENTLY": True}):
        assert mail.send_mail("Hi", "x", None, ["bad@@example.com"]) == 0
    assert not _queued(workspace)


def test_on_commit_queues_only_when_the_transaction_commits(workspace: Path) -> None:
    """Issue 13 part 1: with ON_COMMIT, a message sent inside a real SQLite transaction is
    queued when it commits and never when it rolls back."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS signup (email TEXT)")

    class Rollback(Exception):
        pass

    with override_settings(ESS_ASYNC={"WORKSPACE": str(workspace), "ON_COMMIT": True}):
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO signup VALUES ('a@example.com')")
            assert mail.send_mail("Welcome", "x", None, ["a@example.com"]) == 1
            assert not _queued(workspace)  # not before the commit
        assert [r["subject"] for r in _queued(workspace)] == ["Welcome"]
        with pytest.raises(Rollback), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO signup VALUES ('b@example.com')")
            assert mail.send_mail("Rolled back", "x", None, ["b@example.com"]) == 1
            raise Rollback
        assert [r["subject"] for r in _queued(workspace)] == ["Welcome"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT email FROM signup")
        assert cursor.fetchall() == [("a@example.com",)]
