"""Issue 13 part 5: the ``ess_outbox`` pytest plugin, run by pytest's own ``pytester`` in a
subprocess (so the ``pytest11`` entry point is what loads it), and the memory transport."""

from __future__ import annotations

import pytest

from ess_async.transports.memory import MemoryTransport, SentMessage

pytest_plugins = ["pytester"]

INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

# The README's FastAPI example (app and test), as written there.
FASTAPI_APP = '''
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request
from ess_async import Manager

@asynccontextmanager
async def lifespan(app: FastAPI):
    async with Manager(workspace="ess_data") as outbox:
        app.state.outbox = outbox
        yield

app = FastAPI(lifespan=lifespan)

@app.post("/signup")
async def signup(request: Request, email: str):
    await request.app.state.outbox.create_work(to=email, subject="Welcome")
    return {"ok": True}
'''

FASTAPI_TEST = '''
import httpx
import pytest

from app import app


@pytest.mark.asyncio
async def test_signup_sends_a_welcome(ess_outbox):
    app.state.outbox = ess_outbox.manager  # instead of the lifespan's Manager
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/signup", params={"email": "new@example.com"})
    assert response.status_code == 200
    [message] = ess_outbox.to("new@example.com")
    assert message.subject == "Welcome"
    assert message.mail_from == "test@example.com"
'''

DJANGO_CONFTEST = '''
import django
from django.conf import settings

settings.configure(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
                   DEFAULT_FROM_EMAIL="app@example.com", INSTALLED_APPS=[], USE_TZ=True)
django.setup()
'''

# The README's Django example test, as written there.
DJANGO_TEST = '''
from django.core.mail import EmailMultiAlternatives
from django.test import override_settings


def test_password_reset_mail(ess_outbox):
    with override_settings(EMAIL_BACKEND="ess_async.django.EmailBackend",
                           ESS_ASYNC={"WORKSPACE": str(ess_outbox.workspace)}):
        email = EmailMultiAlternatives("Reset your password", "Follow the link",
                                       "app@example.com", ["ann@example.com"],
                                       bcc=["audit@example.com"])
        email.attach_alternative("<a href='https://example.com/r'>Reset</a>", "text/html")
        email.attach("terms.txt", b"Be nice.", "text/plain")
        email.send()
    [message] = ess_outbox.flush_sync()
    assert message.recipients == ["ann@example.com", "audit@example.com"]
    assert message.header("Bcc") is None
    assert message.text == "Follow the link"
    assert "Reset" in message.html
    assert message.attachments[0].filename == "terms.txt"
    assert message.attachments[0].content == b"Be nice."
'''


def test_fastapi_example(pytester: pytest.Pytester) -> None:
    """Issue 13 part 5: the README's FastAPI example test passes with the plugin loaded
    from its entry point: what the app queues is delivered at once and parsed."""
    pytester.makeini(INI)
    pytester.makepyfile(app=FASTAPI_APP, test_signup=FASTAPI_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_django_example(pytester: pytest.Pytester) -> None:
    """Issue 13 part 5: the README's Django example test passes: Django's backend spools
    into the outbox's workspace and ``flush_sync`` delivers it (Bcc on the envelope)."""
    pytester.makeini(INI)
    pytester.makeconftest(DJANGO_CONFTEST)
    pytester.makepyfile(test_emails=DJANGO_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixture_features(pytester: pytest.Pytester) -> None:
    """Issue 13 part 5: flush() delivers what a Client queued ($ESS_DATA is the outbox's
    workspace), deliver_at_once can be turned off, to() matches the envelope, clear()
    forgets, and each test gets a fresh outbox."""
    pytester.makeini(INI)
    pytester.makepyfile(test_features='''
from ess_async import Client

async def test_features(ess_outbox):
    await ess_outbox.manager.create_work(to="A <a@example.com>", bcc="b@example.com",
                                         subject="Hi", body="Hello",
                                         html="<p>Hello</p>",
                                         attachments=[("x.csv", b"a,b\\n", "text/csv")])
    [m] = ess_outbox.messages
    assert m.to == ["a@example.com"] and m.recipients == ["a@example.com", "b@example.com"]
    assert ess_outbox.to("B@example.com") == [m]
    assert (m.text, m.html) == ("Hello\\n", "<p>Hello</p>\\n")
    assert [(a.filename, a.content, a.mimetype) for a in m.attachments] == [
        ("x.csv", b"a,b\\n", "text/csv")]
    assert m.headers["Subject"] == "Hi" and m.message["From"] == "test@example.com"
    Client().create_work(to="c@example.com", subject="From a client")
    assert len(ess_outbox.messages) == 1
    await ess_outbox.flush()
    assert [x.subject for x in ess_outbox.to("c@example.com")] == ["From a client"]
    ess_outbox.clear()
    assert ess_outbox.messages == []
    ess_outbox.deliver_at_once = False
    await ess_outbox.manager.create_work(to="d@example.com", subject="Later")
    assert ess_outbox.messages == []
    assert [x.subject for x in await ess_outbox.flush()] == ["Later"]

def test_fresh(ess_outbox):
    assert ess_outbox.messages == []
    assert not list(ess_outbox.workspace.glob("*/*.json"))
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


async def test_memory_transport_default_and_own_list() -> None:
    """Issue 13 part 5: MemoryTransport appends SentMessage(mail_from, recipients, raw) to
    its list, or to the module's shared ``outbox`` when given none."""
    from ess_async.transports import memory

    mine: list[SentMessage] = []
    result = await MemoryTransport(mine).send("a@example.com", ["b@example.com"], b"x\r\n")
    assert result.code == 250
    assert mine == [SentMessage("a@example.com", ["b@example.com"], b"x\r\n")]
    before = len(memory.outbox)
    await MemoryTransport().send("a@example.com", ["c@example.com"], b"y\r\n")
    assert memory.outbox[before:] == [SentMessage("a@example.com", ["c@example.com"], b"y\r\n")]
    del memory.outbox[before:]
