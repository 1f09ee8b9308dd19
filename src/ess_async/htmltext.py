"""A readable text/plain alternative derived from an HTML body (``html`` without ``body``).

Deliberately simple (the standard library's ``html.parser``): the text of the document
without scripts, styles and the head; blocks and line breaks become line breaks, list
items start with "- ", links keep their address ("text (https://...)"), runs of white space
are one space except inside <pre>. It never raises: malformed HTML gives its best text.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ("html_to_text",)

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "svg"})
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "center", "dd", "details", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary",
    "table", "tbody", "tfoot", "thead", "tr", "ul",
})
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre",
                        "table", "ul", "ol", "dl", "hr"})
_WSP = re.compile(r"[ \t\r\n\f\v]+")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.breaks = 0  # line breaks owed before the next text
        self.skip = 0
        self.pre = 0
        self.links: list[tuple[str | None, int]] = []  # (href, where its text starts)

    def _break(self, count: int) -> None:
        if self.out:
            self.breaks = max(self.breaks, count)

    def _emit(self, text: str) -> None:
        if self.breaks:
            if not text.strip(" "):
                return  # white space at the start of a line
            self.out.append("\n" * self.breaks)
            self.breaks = 0
            text = text.lstrip(" ") if not self.pre else text
        self.out.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif self.skip:
            return
        elif tag == "br":
            if self.breaks:
                self.breaks += 1
            else:
                self.out.append("\n")
        elif tag in _BLOCK:
            self._break(2 if tag in _PARAGRAPH else 1)
            if tag == "li":
                self._emit("- ")
            elif tag == "pre":
                self.pre += 1
        elif tag in ("td", "th"):
            self._emit(" ")
        elif tag == "a":
            href = dict(attrs).get("href")
            self.links.append((href.strip() if href else None, len(self.out)))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self._emit(_WSP.sub(" ", alt))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "img", "hr"):
            self.handle_starttag(tag, attrs)
        # a self-closed <a/> or <script/> opens nothing

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif self.skip:
            return
        elif tag in _BLOCK:
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
            self._break(2 if tag in _PARAGRAPH else 1)
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            text = "".join(self.out[start:]).strip()
            target = re.sub(r"(?i)^mailto:", "", href or "")
            if href and re.match(r"(?i)(https?|mailto):", href) and target not in text:
                self._emit(f" ({target})")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self._emit(data if self.pre else _WSP.sub(" ", data))


def html_to_text(html: str) -> str:
    """The text of ``html`` for a text/plain alternative ("" when it has none)."""
    parser = _Text()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser is lenient; this is a last resort for odd input
        return _WSP.sub(" ", re.sub(r"<[^>]*>", " ", html)).strip()
    lines = [line.strip() for line in "".join(parser.out).replace("\xa0", " ").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text.strip() else ""
