"""A sendmail-compatible command: ``ess-sendmail`` (link it as ``/usr/sbin/sendmail``) and
``ess-async sendmail``. It reads a message on standard input and queues it in the
workspace (``--workspace DIR``, else ``$ESS_DATA``, else ``./ess_data``); the message is
durable when it exits 0. A server (``ess-async serve``) delivers it.

Options (getopt style: ``-ti`` is ``-t -i``, values attached or not: ``-fme@example.com``,
``-f me@example.com``; options may follow recipients; ``--`` ends them):

- ``-t``: recipients from the To, Cc and Bcc headers, plus any on the command line.
- ``-i``, ``-oi``: a line with a lone ``.`` is text. Without them it ends the input, as
  in sendmail and Postfix (the rest is ignored; no other dot is removed).
- ``-f ADDR`` / ``-r ADDR``: the envelope sender; ``-F NAME``: the full name of a
  generated From.
- ``-bm`` (the default) queues; ``-bp`` lists the queue (as ``ess-async list``).
- Accepted and ignored, as the real ones do: ``-o*``, ``-B*``, ``-v``, ``-n``, ``-m``,
  ``-G``, ``-U``, ``-h N``, ``-L*``, ``-O*``, ``-X*``, ``-A*``, ``-N*``, ``-R*``,
  ``-V*``, ``-p*``, ``-e*``.

The message: a leading mbox ``From `` line is dropped; line ends become CRLF; headers end
at the first blank line (or at the first line that is not a header). It is queued with
``create_work(message=...)``, so the same validation applies, Bcc is removed from the
sent copy, Date and Message-ID are added when missing, and bodies in 8 bits (or with
lines over 998 octets) are re-encoded in quoted-printable or base64. A From is added when
missing: ``-F`` as its name and the envelope sender as its address.

The envelope sender is ``-f``/``-r``, else ``[message] from``, else the message's From,
else ``user@host``. Addresses without a domain (cron's ``root``) get the domain of
``[message] from``, else this host's name; the To, Cc, Bcc, From, Sender and Reply-To
headers that hold such addresses are rewritten with them.

Exit status (sysexits.h): 0 queued; 64 usage; 65 bad message or no recipient; 73 the
spool cannot be written; 74 standard input cannot be read; 75 temporary failure; 78
configuration error. Each error is one line on stderr.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email._header_value_parser import get_address_list
from email.headerregistry import Address
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConfigError, MessageError, SpoolError
from .mime import address_header
from .parts import crlf

__all__ = ("EX_CANTCREAT", "EX_CONFIG", "EX_DATAERR", "EX_IOERR", "EX_OK", "EX_TEMPFAIL",
           "EX_USAGE", "Options", "UsageError", "main", "parse_options", "prepare_input")

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

# getopt letters: those that take a value (attached or the next argument), and flags.
_WITH_VALUE = frozenset("ABCFLNORVXbefhopqr")
_FLAGS = frozenset("tivnmGU")
# Errors that mean the spool is not writable by this user (rather than a passing fault).
_CANTCREAT = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                        errno.EEXIST, errno.ELOOP})
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")
_ADDRESS_HEADERS = frozenset({"to", "cc", "bcc", "from", "sender", "reply-to"})
USAGE = ("usage: ess-sendmail [-t] [-i] [-f sender] [-F name] [-bm | -bp] "
         "[--workspace DIR] [--] [recipient ...] < message")


class UsageError(Exception):
    """A command line sendmail would refuse (exit 64)."""


@dataclass
class Options:
    """The command line, parsed."""

    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    mode: str = "m"  # -bm deliver (queue), -bp list
    workspace: Path | None = None
    recipients: list[str] = field(default_factory=list)
    help: bool = False


def parse_options(argv: Sequence[str]) -> Options:
    """Parse sendmail's command line; raise UsageError for what it cannot mean."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.recipients += args[i:]
            break
        if arg in ("--help", "-?"):
            opts.help = True
            continue
        if arg == "--workspace" or arg.startswith("--workspace="):
            if "=" in arg:
                value = arg.partition("=")[2]
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise UsageError("--workspace needs a folder")
            opts.workspace = Path(value)
            continue
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter in _FLAGS:
                if letter == "t":
                    opts.extract = True
                elif letter == "i":
                    opts.ignore_dots = True
                continue
            if letter not in _WITH_VALUE:
                raise UsageError(f"unknown option -{letter}")
            if pos < len(arg):
                value = arg[pos:]
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise UsageError(f"option -{letter} needs a value")
            _option(opts, letter, value)
            break
    return opts


def _option(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "o":
        if value == "i":
            opts.ignore_dots = True
    elif letter == "b":
        if value not in ("m", "p"):
            raise UsageError(f"-b{value} is not supported (only -bm, to queue, and -bp, "
                             "to list the queue)")
        opts.mode = value
    elif letter == "C":
        raise UsageError("-C is not supported: the workspace's config.toml is used "
                         "(choose the workspace with ESS_DATA or --workspace)")
    elif letter == "q":
        raise UsageError("-q is not supported: the queue is run by 'ess-async serve' "
                         "or 'ess-async process'")
    # -A -B -L -N -O -R -V -X -e -h -p: accepted and ignored, as sendmail's peers do.


# -- the message -------------------------------------------------------------------------

def read_input(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """Standard input, CRLF-normalised; without ``ignore_dots`` a lone ``.`` line ends it
    (what follows is ignored)."""
    data = crlf(stream.read())
    if not ignore_dots:
        match = re.search(rb"(?:\A|\r\n)\.(?:\r\n|\Z)", data)
        if match:
            data = data[:match.start()] + (b"\r\n" if match.start() else b"")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _domain(defaults: dict[str, Any]) -> str:
    """The domain given to addresses without one."""
    configured = defaults.get("from_")
    if isinstance(configured, str):
        match = re.search(r"@([^@\s>]+)>?\s*$", configured)
        if match:
            return match.group(1)
    return socket.getfqdn()


def qualify(address: str, domain: str) -> str:
    """``root`` -> ``root@domain``; anything with an @ (or a name-addr) is left alone."""
    text = address.strip()
    if "@" in text or "<" in text or not text:
        return text
    return f"{text}@{domain}"


def _split_head(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and CRLFs) and the rest (the blank
    line and the body). Headers end at a blank line or at the first line that is not a
    header (then a blank line is inserted there, as sendmail does)."""
    if data.startswith(b"From ") and not _HEADER_LINE.match(data):
        data = data.partition(b"\r\n")[2]  # an mbox postmark, not a header
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        end = len(data) if end < 0 else end + 2
        line = data[pos:end]
        if line == b"\r\n":
            return fields, data[pos:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER_LINE.match(line):
            fields.append(line)
        else:
            break
        pos = end
    return fields, b"\r\n" + data[pos:]


def _name(header_field: bytes) -> str:
    return header_field.partition(b":")[0].decode("ascii").lower()


def _mailboxes(header_field: bytes) -> list[Address] | None:
    """The mailboxes of an address header as the stdlib reads them (None if it cannot)."""
    try:
        value = header_field.decode("utf-8").partition(":")[2]
        value = re.sub(r"\r\n(?=[ \t])", "", value).strip()
        parsed, rest = get_address_list(value) if value else (None, "")
    except Exception:
        return None
    if rest.strip() or parsed is None:
        return None
    mailboxes: list[Address] = []
    for address in parsed.addresses:
        for mailbox in address.all_mailboxes:
            mailboxes.append(Address(display_name=mailbox.display_name or "",
                                     username=mailbox.local_part or "",
                                     domain=mailbox.domain or ""))
    return mailboxes


def _qualify_header(header_field: bytes, domain: str) -> bytes:
    """The header rewritten with ``@domain`` added to mailboxes that have no domain; the
    field as it was when all have one (or it cannot be read: validation will say)."""
    mailboxes = _mailboxes(header_field)
    if not mailboxes or all(m.domain for m in mailboxes):
        return header_field
    name = header_field.partition(b":")[0].decode("ascii")
    fixed = [m if m.domain else Address(display_name=m.display_name, username=m.username,
                                        domain=domain) for m in mailboxes]
    try:
        return address_header(name, fixed).encode("utf-8")
    except (ValueError, UnicodeError):
        return header_field


@dataclass(frozen=True)
class Prepared:
    """What to hand ``create_work``: the message bytes and its envelope."""

    message: bytes
    from_: str
    to: list[str] | None


def prepare_input(data: bytes, opts: Options, defaults: dict[str, Any]) -> Prepared:
    """The message (From added, unqualified addresses qualified) and its envelope."""
    domain = _domain(defaults)
    fields, rest = _split_head(data)
    fields = [_qualify_header(f, domain) if _name(f) in _ADDRESS_HEADERS else f
              for f in fields]
    has_from = any(_name(f) == "from" for f in fields)

    if opts.sender is not None:
        if opts.sender.strip() in ("", "<>"):
            raise UsageError("-f <> (a null sender) is not supported")
        sender = qualify(opts.sender, domain)
    elif defaults.get("from_") is not None:
        sender = str(defaults["from_"])
    else:
        header_from = next((f for f in fields if _name(f) == "from"), None)
        boxes = _mailboxes(header_from) if header_from is not None else None
        if boxes and len(boxes) == 1 and boxes[0].domain:
            sender = boxes[0].addr_spec
        else:
            sender = f"{getpass.getuser()}@{domain}"

    if not has_from:
        from .message import parse_address

        mailbox = parse_address("from", sender)
        name = opts.full_name if opts.full_name is not None else mailbox.display_name
        try:
            line = address_header("From", [Address(display_name=name.strip(),
                                                    username=mailbox.username,
                                                    domain=mailbox.domain)])
        except (ValueError, UnicodeError):
            raise MessageError("from", f"cannot write a From header for {sender!r}") from None
        fields.insert(0, line.encode("utf-8"))

    argv = [qualify(r, domain) for item in opts.recipients for r in _split_list(item)]
    to: list[str] | None
    if opts.extract:
        found: list[str] = []
        for header_field in fields:
            if _name(header_field) in ("to", "cc", "bcc"):
                boxes = _mailboxes(header_field)
                if boxes is None:
                    raise MessageError(_name(header_field).capitalize(),
                                       "malformed address list "
                                       f"{header_field[:60].decode('utf-8', 'replace')!r}")
                found += [b.addr_spec for b in boxes]
        to = [*found, *argv]
    else:
        to = argv
    if not to:
        raise MessageError("to", "no recipients" + (
            " (none in To, Cc or Bcc, none on the command line)" if opts.extract else
            " (give them on the command line, or -t to read the To, Cc and Bcc headers)"))
    return Prepared(b"".join(fields) + rest, sender, list(dict.fromkeys(to)))


def _split_list(item: str) -> list[str]:
    """A command-line recipient may be a comma-separated list (sendmail accepts them)."""
    if "," not in item:
        return [item]
    boxes = _mailboxes(f"To: {item}".encode())
    if boxes is None:
        return [item]
    return [b.addr_spec if b.domain else b.username for b in boxes]


# -- the command -------------------------------------------------------------------------

def _fail(prog: str, code: int, problem: object) -> int:
    text = " ".join(str(problem).split())
    print(f"{prog}: {text}", file=sys.stderr)
    return code


def _list_queue(workspace: Path) -> int:
    from .cli import _print_infos
    from .ops import QueueOps

    ops = QueueOps(workspace)
    now = ops.clock()
    _print_infos(ops.list(None, None), now)
    return EX_OK


def main(argv: Sequence[str] | None = None, *, prog: str | None = None,
         stdin: BinaryIO | None = None) -> int:
    """Run the command; returns its exit status (sysexits.h)."""
    from .client import Client
    from .manager import default_workspace
    from .transports.sendmail import LOOP_ENV

    if prog is None:
        prog = os.path.basename(sys.argv[0]) or "ess-sendmail"
    if argv is None:
        argv = sys.argv[1:]
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        return _fail(prog, EX_USAGE, f"{exc}; {USAGE}")
    if opts.help:
        print(USAGE)
        return EX_OK
    if prog == "mailq":
        opts.mode = "p"
    # Library warnings (a Message-ID of localhost, ...) as one line each, nothing else.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{prog}: %(levelname)s: %(message)s")
    workspace = opts.workspace.absolute() if opts.workspace else default_workspace()
    try:
        if opts.mode == "p":
            return _list_queue(workspace)
        if os.environ.get(LOOP_ENV):
            return _fail(prog, EX_CONFIG, "mail loop: called by ess_async's sendmail "
                         "transport; point [transport.sendmail] path at a real MTA")
        client = Client(workspace)
        try:
            data = read_input(stdin if stdin is not None else sys.stdin.buffer,
                              ignore_dots=opts.ignore_dots)
        except OSError as exc:
            return _fail(prog, EX_IOERR, f"cannot read the message: {exc}")
        limit = client.config.server.max_message_size
        if len(data) > limit:
            return _fail(prog, EX_DATAERR, f"message too large: {len(data)} bytes "
                         f"(server.max_message_size is {limit})")
        prepared = prepare_input(data, opts, dict(client.config.message))
        client.create_work(message=prepared.message, from_=prepared.from_, to=prepared.to)
        return EX_OK
    except UsageError as exc:
        return _fail(prog, EX_USAGE, exc)
    except ConfigError as exc:
        return _fail(prog, EX_CONFIG, f"configuration error: {exc}")
    except MessageError as exc:
        return _fail(prog, EX_DATAERR, f"bad message: {exc}")
    except (SpoolError, OSError) as exc:
        code = EX_CANTCREAT if exc.errno in _CANTCREAT else EX_TEMPFAIL
        detail = exc.strerror if isinstance(exc, SpoolError) and exc.strerror else (
            f"{workspace}: {exc}")
        return _fail(prog, code, f"cannot queue: {detail}")
    except KeyboardInterrupt:
        return _fail(prog, EX_TEMPFAIL, "interrupted; nothing queued")


def console() -> int:
    """The ``ess-sendmail`` console script."""
    return main()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

