"""Checks on the bytes of a message as a server receives them (issue 10).

Whatever builds messages (``message.py`` today, a faster builder later) must pass
``wire_problems``: it returns what is wrong with ``raw`` (an empty list when nothing is).
The rules: CRLF line ends only; every line <= 998 octets; header lines folded at 78 where
a fold can help (a longer line is one unbreakable token); encoded-words <= 75 characters;
base64 and quoted-printable body lines <= 76; composite types (multipart/*,
message/rfc822) never base64 or quoted-printable; 7-bit unless ``smtputf8``; exactly one
Date, Message-ID, MIME-Version and From; and ``policy.strict`` parses it with no defect in
any part or header.
"""

from __future__ import annotations

import re
from email import policy
from email.errors import NonASCIILocalPartDefect
from email.header import decode_header
from email.message import EmailMessage, Message
from email.parser import BytesParser, Parser

__all__ = ("ENCODED_WORD", "decode_rfc2047", "display_name", "header_value", "parse_strict",
           "wire_problems")

ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_ONE_PER_MESSAGE = (b"date", b"message-id", b"mime-version", b"from")
_ENCODED_CTES = ("base64", "quoted-printable")


def parse_strict(raw: bytes, *, smtputf8: bool = False) -> EmailMessage:
    """Parse with ``policy.strict`` (raises on a message defect); a message for an SMTPUTF8
    server is UTF-8 text (RFC 6532)."""
    if smtputf8:
        msg = Parser(policy=policy.strict).parsestr(raw.decode("utf-8"))
    else:
        msg = BytesParser(policy=policy.strict).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def _header_problems(block: list[bytes], where: str) -> list[str]:
    problems = []
    for i, line in enumerate(block):
        for word in ENCODED_WORD.findall(line):
            if len(word) > 75:
                problems.append(f"{where}: encoded-word of {len(word)} characters: "
                                f"{word[:40]!r}...")
        if len(line) <= 78:
            continue
        # Longer than 78 only when no fold could help: one unbreakable token after the
        # header's name (first line) or the folding white space (continuation lines).
        rest = line.lstrip(b" \t") if i and line[:1] in b" \t" else line.partition(b":")[2]
        if re.search(rb"[ \t]", rest.strip(b" \t")):
            problems.append(f"{where}: header line of {len(line)} octets not folded at 78: "
                            f"{line[:60]!r}...")
    return problems


def _headers_blocks(raw: bytes) -> list[list[bytes]]:
    """Header blocks of the message and every body part (by MIME boundaries)."""
    lines = raw.split(b"\r\n")
    blocks: list[list[bytes]] = []
    boundaries: set[bytes] = set()
    current: list[bytes] | None = []
    for line in lines:
        if current is not None:
            if line == b"":
                blocks.append(current)
                text = b"\r\n".join(current)
                for match in re.finditer(rb'boundary="?([^";\r\n]+)"?', text, re.I):
                    boundaries.add(match.group(1))
                current = None
            else:
                current.append(line)
        elif line.startswith(b"--") and line[2:].rstrip(b" \t") in boundaries:
            current = []
        elif line.startswith(b"--") and line[2:].rstrip(b" \t").endswith(b"--") and \
                line[2:-2] in boundaries:
            current = None
    return blocks


def _part_problems(msg: Message, smtputf8: bool) -> list[str]:
    problems = []
    for n, part in enumerate(msg.walk()):
        where = f"part {n} ({part.get_content_type()})"
        if part.defects:
            problems.append(f"{where}: defects {part.defects}")
        for name, value in part.items():
            defects = [d for d in getattr(value, "defects", ())
                       if not (smtputf8 and isinstance(d, NonASCIILocalPartDefect))]
            if defects:
                problems.append(f"{where}: header {name}: defects {list(defects)}")
        cte = part.get("Content-Transfer-Encoding", "7bit").lower()
        composite = part.is_multipart() or part.get_content_type() == "message/rfc822"
        if composite and cte not in ("7bit", "8bit", "binary"):
            problems.append(f"{where}: composite type with transfer encoding {cte}")
        if not smtputf8 and cte not in ("7bit", *_ENCODED_CTES):
            problems.append(f"{where}: transfer encoding {cte} on a 7-bit message")
        if not composite and cte in _ENCODED_CTES:
            payload = part.get_payload()
            assert isinstance(payload, str)
            longest = max((len(line) for line in payload.splitlines()), default=0)
            if longest > 76:
                problems.append(f"{where}: {cte} line of {longest} characters")
    return problems


def wire_problems(raw: bytes, *, smtputf8: bool = False) -> list[str]:
    """Everything wrong with ``raw`` as sent (an empty list when nothing is)."""
    problems: list[str] = []
    if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n"):
        problems.append("bare CR or LF")
    if not smtputf8 and not raw.isascii():
        problems.append("8-bit octets in a message sent without SMTPUTF8")
    longest = max(len(line) for line in raw.split(b"\r\n"))
    if longest > 998:
        problems.append(f"a line of {longest} octets")
    blocks = _headers_blocks(raw)
    if not blocks:
        return [*problems, "no header block"]
    for n, block in enumerate(blocks):
        problems += _header_problems(block, "headers" if n == 0 else f"part headers {n}")
    names = [line.split(b":", 1)[0].strip().lower() for line in blocks[0]
             if line[:1] not in b" \t"]
    for name in _ONE_PER_MESSAGE:
        if names.count(name) != 1:
            problems.append(f"{names.count(name)} {name.decode()} headers")
    try:
        msg = parse_strict(raw, smtputf8=smtputf8)
    except Exception as exc:  # policy.strict raises the first defect it meets
        return [*problems, f"policy.strict: {exc!r}"]
    return problems + _part_problems(msg, smtputf8)


def header_value(raw: bytes, name: str) -> str:
    """The unfolded value of the message's first ``name`` header, as sent."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    match = re.search(rf"(?im)^{re.escape(name)}:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    assert match, f"no {name} header"
    return match.group(1).replace("\r\n", "").strip(" \t")


def decode_rfc2047(text: str) -> str:
    """``text`` with its encoded-words decoded as RFC 2047 (section 6.2) and mail clients
    do: white space between two adjacent encoded-words is dropped. (Python's
    headerregistry keeps it in display names.)"""
    out: list[str] = []
    pos = 0
    for match in ENCODED_WORD.finditer(text.encode("ascii", "surrogateescape")):
        between = text[pos:match.start()]
        if not (out and pos and between.strip(" \t") == "" and
                ENCODED_WORD.fullmatch(text[:pos].rsplit(" ", 1)[-1].encode())):
            out.append(between)
        ((data, charset),) = decode_header(match.group().decode("ascii"))
        assert isinstance(data, bytes) and charset
        out.append(data.decode(charset))
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def display_name(raw: bytes, name: str = "To") -> str:
    """The display name of the single mailbox in header ``name``, decoded as a mail client
    would (quoted string unquoted, encoded-words joined as RFC 2047 says)."""
    value = header_value(raw, name)
    if not value.endswith(">"):
        return ""
    phrase = value[:value.rindex("<")].strip(" \t")
    if phrase.startswith('"') and phrase.endswith('"') and len(phrase) > 1:
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return decode_rfc2047(phrase)
