"""Header lines as mail clients and spam filters expect them, written without ``email``'s
folder (which, in Python 3.11, loses or adds white space around encoded-words when it
folds a long header: "Köln, schöne" came back "Köln,schöne").

- Unstructured values (Subject, X-*): ASCII text is folded at its own white space, so it
  unfolds to exactly what was given; text that needs encoding (non-ASCII, something that
  looks like an encoded-word, a word too long for a line) becomes a run of RFC 2047
  encoded-words of at most 75 characters each, one per line, which decoders join.
- Address lists: display names are atoms, quoted strings or encoded-words; lines are broken
  between words and after commas.

Every line is at most 76 characters unless a single token is longer (an address, a
message id), and never more than 998 octets.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from email.headerregistry import Address

__all__ = ("LINE", "address_header", "encoded_words", "unstructured_header")

#: Folding width: within RFC 5322's 78, and a line of encoded-words holds one of <= 75.
LINE = 76
_MAX_WORD = 75  # RFC 2047: an encoded-word is at most 75 characters
_EW_OVERHEAD = len("=?utf-8?b??=")
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_LOOKS_ENCODED = re.compile(r"=\?.*\?=", re.S)
_ATOM_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')
_WSP_RUN = re.compile(r"[ \t]+")


def _q_cost(char: str) -> int:
    data = char.encode("utf-8")
    if char == " ":
        return 1  # "_"
    return 1 if len(data) == 1 and data[0] in _Q_SAFE else 3 * len(data)


def _q_encode(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        if byte == 0x20:
            out.append("_")
        elif byte in _Q_SAFE:
            out.append(chr(byte))
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


def _use_q(text: str) -> bool:
    return sum(_q_cost(ch) for ch in text) <= (len(text.encode("utf-8")) + 2) // 3 * 4


def _chunks(text: str, first: int, use_q: bool) -> list[str]:
    """``text`` cut into pieces that each encode to one encoded-word of at most ``first``
    (the first) or 75 (the others) characters; never cuts a character."""
    pieces: list[str] = []
    start = 0
    size = nbytes = 0  # encoded (Q) and UTF-8 (B) length of text[start:i]
    limit = max(first, _EW_OVERHEAD + 4) - _EW_OVERHEAD
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        grown = size + _q_cost(ch) if use_q else (nbytes + n + 2) // 3 * 4
        if i > start and grown > limit:
            pieces.append(text[start:i])
            start, size, nbytes = i, 0, 0
            limit = _MAX_WORD - _EW_OVERHEAD
        size += _q_cost(ch)
        nbytes += n
    pieces.append(text[start:])
    return pieces


def _encode(piece: str, use_q: bool) -> str:
    if use_q:
        return f"=?utf-8?q?{_q_encode(piece)}?="
    return f"=?utf-8?b?{base64.b64encode(piece.encode('utf-8')).decode('ascii')}?="


def encoded_words(text: str, first: int = _MAX_WORD) -> list[str]:
    """``text`` as UTF-8 encoded-words (B or Q, whichever is shorter), the first at most
    ``first`` characters long and the others at most 75; never splits a character."""
    use_q = _use_q(text)
    return [_encode(piece, use_q) for piece in _chunks(text, first, use_q)]


def _fold(name: str, tokens: Iterable[str]) -> str:
    """``Name: token token ...`` broken before tokens so lines stay within LINE where a
    break can help. Each token carries the white space that precedes it (kept at the start
    of a continuation line, so unfolding restores the value exactly)."""
    lines: list[str] = []
    line = f"{name}:"
    for token in tokens:
        if len(line) + len(token) > LINE:
            continued = token if token[:1] in (" ", "\t") else " " + token
            # Break unless the line holds only the name and the token would not fit on a
            # line of its own either (then the break would gain nothing).
            if line != f"{name}:" or len(continued) <= LINE:
                lines.append(line)
                line = continued
                continue
        line += token
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _needs_encoding(value: str) -> bool:
    if not value.isascii() or _LOOKS_ENCODED.search(value):
        return True
    longest = max((len(w) for w in _WSP_RUN.split(value)), default=0)
    return longest > 900  # a word that could not fit a line of 998 octets


def unstructured_header(name: str, value: str) -> str:
    """The header line(s) of an unstructured field, CRLF-terminated.

    ``value`` has no CR, LF or other control character but tab, and no surrounding white
    space (``build_message`` checks that).
    """
    if not value:
        return f"{name}:\r\n"
    if not _needs_encoding(value):
        # Break before a run of white space: each token is the run plus the next word.
        tokens = re.findall(r"[ \t]*[^ \t]+", " " + value)
        return _fold(name, tokens)
    words = encoded_words(value, first=LINE - len(name) - 2)
    if len(name) + 2 + len(words[0]) > LINE:  # a long name: start on the next line
        words = encoded_words(value)
    return _fold(name, (" " + w for w in words))


def _phrase_tokens(display: str) -> list[str]:
    """A display name as words: an atom phrase, a quoted string split at its spaces, or,
    when it needs encoding, its plain ASCII words as they are and each run of the others as
    encoded-words.

    A run is split into several encoded-words only when one cannot hold it (about 45 octets
    of UTF-8), preferably at a space, which then begins the next encoded-word. Decoders
    that follow RFC 2047 (mail clients) join adjacent encoded-words exactly; Python's
    ``email.headerregistry`` puts a space between them in a display name, so it reads a
    split run with one extra space there.
    """
    words = display.split(" ")  # runs of white space are one space already
    if not _needs_encoding(display) and len(display) <= 900:
        if not _ATOM_SPECIALS.search(display) and all(words):
            return words
        quoted = display.replace("\\", "\\\\").replace('"', '\\"').split(" ")
        quoted[0] = '"' + quoted[0]
        quoted[-1] += '"'
        return quoted
    tokens: list[str] = []
    run: list[str] = []
    for word in [*words, None]:
        if word is not None and (_needs_encoding(word) or _ATOM_SPECIALS.search(word)
                                 or not word or len(word) > 60):
            run.append(word)
            continue
        if run:
            tokens += _encoded_run(" ".join(run))
            run = []
        if word is not None:
            tokens.append(word)
    return tokens


def _encoded_run(text: str) -> list[str]:
    """``text`` as encoded-words, split (when it must be) after the last space that lets
    the first one fit, the space going into the next one."""
    words: list[str] = []
    while text:
        use_q = _use_q(text)
        pieces = _chunks(text, _MAX_WORD, use_q)
        if len(pieces) == 1:
            return [*words, _encode(text, use_q)]
        cut = text.rfind(" ", 1, len(pieces[0]) + 1)
        if cut <= 0:
            cut = len(pieces[0])
        head = text[:cut]  # a prefix of a piece: one word in Q or B, whichever is shorter
        words.append(_encode(head, _use_q(head)))
        text = text[cut:]
    return words


def address_header(name: str, addresses: list[Address]) -> str:
    """The header line(s) of an address list (From, To, Cc, Reply-To), CRLF-terminated.
    Display names have single spaces and no surrounding white space (``parse_address``)."""
    tokens: list[str] = []
    for i, addr in enumerate(addresses):
        spec = addr.addr_spec
        words = [*_phrase_tokens(addr.display_name), f"<{spec}>"] \
            if addr.display_name else [spec]
        if i < len(addresses) - 1:
            words[-1] += ","
        tokens += [" " + w for w in words]
    return _fold(name, tokens)
