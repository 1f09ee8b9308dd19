"""What an SMTP reply means beyond its code: one table, read top to bottom, first match wins.

A reply is classified as one of:

``RECIPIENT_LIMIT``
    The server takes no more recipients in this transaction (RFC 5321 section 4.5.3.1.10:
    Postfix ``452 4.5.3 Error: too many recipients``, Exim ``452 too many recipients``).
    Not a failure of the recipient: the transport sends the message to those accepted and
    the rest in further transactions on the same connection.
``PUSHBACK``
    The relay asks this client to slow down: 421 (it is closing the connection), or a 4xx
    rate or connection limit (Postfix ``450 4.7.1 Error: too much mail from 127.0.0.1``,
    Exim ``451 ratelimit exceeded``, Microsoft ``451 4.7.500 Server busy``). The senders
    halve their concurrency and pause.
``CLIENT_POLICY``
    The relay refuses this *client*, whatever the message: ``530`` (STARTTLS or
    authentication required, RFC 3207 and 4954) at any step, and ``X.7.x`` policy replies
    at MAIL (``550 5.7.1 Relay access denied``, ``554 5.7.1 Client host rejected``) unless
    they are about the envelope sender's address alone. A configuration problem: the
    message is deferred, never failed, and the destination is backed off.
``RECIPIENT``
    About one recipient's mailbox (enhanced code ``X.2.x``, e.g. Google's ``450 4.2.1 The
    user you are trying to contact is receiving mail at a rate that prevents additional
    messages from being delivered``): that recipient alone is retried later; the client is
    not slowed down for it (other recipients are not affected).

Anything else (``None``) is handled by its code alone: 4xx temporary, 5xx permanent, and a
refusal at RCPT concerns that recipient (``554 5.7.1 Relay access denied`` at RCPT too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ("ReplyKind", "classify", "client_policy_hint", "is_pushback",
           "is_recipient_limit")


class ReplyKind(Enum):
    RECIPIENT_LIMIT = "recipient limit"
    PUSHBACK = "push-back"
    CLIENT_POLICY = "client policy"
    RECIPIENT = "recipient"


# An enhanced status code (RFC 3463) at the start of the reply text: "4.7.1", "4.7.500".
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

# Words of a relay asking for less. "rate" as a word (not "generated", "separate").
_RATE = (r"\brate\b|rate[- ]?limit|ratelimit|overlimit|too many|too much|too fast|busy|"
         r"throttl|slow(ing)? down|overload|congest")
# With a 4.7.x policy code even a bare "try again later" is a rate limit (Google's
# "421 4.7.0 Try again later, closing connection", Microsoft's 4.7.500 family).
_RATE_OR_LATER = _RATE + r"|try again later|come back later"
# Temporary refusals that look like rate limits but are not about this client's rate.
_NOT_RATE = r"greylist|graylist|mailbox|quota|over ?quota|too many recipients\b(?! from)"
_TOO_MANY_RECIPIENTS = r"too many recipients\b(?! from)|recipient limit"
# MAIL-phase 5.7.x replies about the envelope sender's address (which a message may set),
# not about the client, unless they also speak of authentication or TLS.
_SENDER = r"sender address|sender domain|\bspf\b|dmarc"
_AUTH_OR_TLS = r"auth|log(ged)? ?in|credential|starttls|\btls\b|encrypt"


@dataclass(frozen=True)
class Rule:
    """One row: every condition given must hold. ``codes``: reply codes; ``enhanced``: a
    pattern the enhanced code ("4.7.1") must match in full, ``""`` for "none given";
    ``words``/``unless``: patterns searched in the text (case-insensitive); ``phases``:
    the SMTP steps (MAIL, RCPT, DATA, CONNECT) the rule applies to."""

    kind: ReplyKind
    codes: frozenset[int] | None = None
    enhanced: str | None = None
    words: str | None = None
    unless: str | None = None
    phases: frozenset[str] | None = None
    example: str = ""

    def matches(self, code: int, text: str, enhanced: str | None, phase: str | None) -> bool:
        if self.codes is not None and code not in self.codes:
            return False
        if self.phases is not None and phase is not None and phase not in self.phases:
            return False
        if self.enhanced is not None and not re.fullmatch(self.enhanced, enhanced or ""):
            return False
        if self.words is not None and not re.search(self.words, text, re.IGNORECASE):
            return False
        return not (self.unless is not None and re.search(self.unless, text, re.IGNORECASE))


_4XX = frozenset(range(400, 500))
_LIMIT_CODES = frozenset({450, 451, 452, 552})  # 552: RFC 821's code for it (5321 4.5.3.1.10)

#: The table. Order matters: the first matching row decides.
RULES: tuple[Rule, ...] = (
    # 421: the server is closing the connection, whatever it says (RFC 5321 section 3.8).
    Rule(ReplyKind.PUSHBACK, codes=frozenset({421}),
         example="421 4.7.0 Error: too many connections from 127.0.0.1"),
    # 530 is about the client by definition: STARTTLS (RFC 3207) or AUTH (RFC 4954) first.
    Rule(ReplyKind.CLIENT_POLICY, codes=frozenset({530}),
         example="530 5.7.0 Must issue a STARTTLS command first"),
    # X.5.3 is "too many recipients" (RFC 3463).
    Rule(ReplyKind.RECIPIENT_LIMIT, codes=_LIMIT_CODES, enhanced=r"[45]\.5\.3",
         phases=frozenset({"RCPT"}), example="452 4.5.3 Error: too many recipients"),
    # X.2.x is about the recipient's mailbox, even when it speaks of a rate.
    Rule(ReplyKind.RECIPIENT, codes=_4XX, enhanced=r"4\.2\.\d{1,3}",
         example="450 4.2.1 The user you are trying to contact is receiving mail at a rate "
                 "that prevents additional messages from being delivered"),
    # Policy codes with rate words: Postfix's client rate and connection limits, Google's
    # 4.7.28, Microsoft's 4.7.500 "Server busy".
    Rule(ReplyKind.PUSHBACK, codes=_4XX, enhanced=r"4\.7\.\d{1,3}", words=_RATE_OR_LATER,
         unless=r"greylist|graylist", example="450 4.7.1 Error: too much mail from 127.0.0.1"),
    # Exim and others give no enhanced code.
    Rule(ReplyKind.RECIPIENT_LIMIT, codes=_LIMIT_CODES, enhanced="",
         words=_TOO_MANY_RECIPIENTS, phases=frozenset({"RCPT"}),
         example="452 too many recipients"),
    # Rate words with no enhanced code or a system/network one (4.3.x, 4.4.x).
    Rule(ReplyKind.PUSHBACK, codes=_4XX, enhanced=r"|4\.[34]\.\d{1,3}", words=_RATE,
         unless=_NOT_RATE, example="451 ratelimit exceeded"),
    # Other policy replies to MAIL concern the client (relaying, authentication, its host)
    # unless they are about the sender address alone.
    Rule(ReplyKind.CLIENT_POLICY, enhanced=r"[45]\.7\.\d{1,3}", phases=frozenset({"MAIL"}),
         unless=rf"^(?!.*(?:{_AUTH_OR_TLS})).*(?:{_SENDER})",
         example="550 5.7.1 Relay access denied"),
)


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 enhanced status code the reply text starts with, if any."""
    found = _ENHANCED.match(text)
    return ".".join(found.groups()) if found else None


def classify(code: int, text: str, phase: str | None = None) -> ReplyKind | None:
    """What the reply ``code`` ``text`` (the text without the code) given at ``phase``
    (MAIL, RCPT, DATA, CONNECT; None: any) means, by the first matching row of ``RULES``."""
    enhanced = enhanced_code(text)
    flat = " ".join(text.split())  # multi-line replies read as one line
    for rule in RULES:
        if rule.matches(code, flat, enhanced, phase):
            return rule.kind
    return None


def is_pushback(code: int, text: str, phase: str | None = None) -> bool:
    return classify(code, text, phase) is ReplyKind.PUSHBACK


def is_recipient_limit(code: int, text: str) -> bool:
    return classify(code, text, "RCPT") is ReplyKind.RECIPIENT_LIMIT


def client_policy_hint(text: str) -> str:
    """Which setting a CLIENT_POLICY reply points at, for the operator."""
    if re.search(r"starttls|\btls\b|encrypt|ssl", text, re.IGNORECASE):
        return ('the relay requires TLS: set [transport.smtp] tls = "starttls" (or "tls", '
                "and tls_ca_file for a private CA)")
    if re.search(r"auth|log(ged)? ?in|credential", text, re.IGNORECASE):
        return ("the relay requires authentication: set [transport.smtp] username and "
                "password_env (and tls)")
    return ("the relay refuses this client: check that it relays for this host, or set "
            "[transport.smtp] username and password_env to authenticate")
