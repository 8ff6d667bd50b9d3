"""HTML to plain text, for lists that take plain text only and convert the rest.

Written on the standard library's `html.parser`, which never raises on bad
markup: links are kept as ``text <url>`` so readers still see where they lead,
scripts and styles are dropped, blocks become lines. The same parser collects
the link targets (href, src) the external-links rule judges.
"""

from __future__ import annotations

import re
from email.message import EmailMessage, MIMEPart
from html.parser import HTMLParser

#: elements whose content is never text (the head holds the title and metadata)
_SKIPPED = frozenset({"script", "style", "head", "template", "noscript", "svg", "math"})
#: elements that start a new line
_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "fieldset",
        "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul",
    }
)  # fmt: skip
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table"})
#: void elements: html.parser reports no end tag for them
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr"})
_LINE, _BREAK = "\x00", "\x01"
_MARKS = re.compile("[ \t]*[\x00\x01]+")
_SPACE = re.compile(r"[ \t\r\n\f\v]+")
#: a bare http(s) URL in text: stops at whitespace, quotes and brackets
URL = re.compile(r"""https?://[^\s<>"'()\[\]{}]+""", re.IGNORECASE)


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.links: list[str] = []
        self._skip = 0
        self._pre = 0
        self._href: list[str | None] = []
        self._anchor_start: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: (v or "").strip() for k, v in attrs}
        for name in ("href", "src", "action", "background", "poster"):
            if values.get(name):
                self.links.append(values[name])
        if tag in _SKIPPED:
            if tag not in _VOID:
                self._skip += 1
            return
        if self._skip:
            return
        if tag in _BLOCKS:
            self._newline(blank=tag in _PARAGRAPHS)
            if tag == "li":
                self.out.append("- ")
        if tag == "pre":
            self._pre += 1
        elif tag == "br":
            self.out.append("\n")
        elif tag == "hr":
            self._newline()
            self.out.append("----\n")
        elif tag == "img" and values.get("alt"):
            self.out.append(f"[{values['alt']}]")
        elif tag == "a":
            self._href.append(values.get("href") or None)
            self._anchor_start.append(len(self.out))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip = max(0, self._skip - 1)
            return
        if self._skip:
            return
        if tag == "a" and self._href:
            href = self._href.pop()
            start = self._anchor_start.pop()
            text = "".join(self.out[start:]).strip()
            if href and _shown(href):
                if not text or text == href or text == href.removeprefix("mailto:"):
                    del self.out[start:]
                    self.out.append(href.removeprefix("mailto:"))
                else:
                    self.out.append(f" <{href}>")
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _BLOCKS:
            self._newline(blank=tag in _PARAGRAPHS)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre:
            self.out.append(data)
            return
        data = _SPACE.sub(" ", data)
        if self._at_line_start() or (data.startswith(" ") and self._after_space()):
            data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def _at_line_start(self) -> bool:
        last = next((chunk for chunk in reversed(self.out) if chunk), "\n")
        return last.endswith(("\n", "- ", _LINE, _BREAK)) and not self._pre

    def _after_space(self) -> bool:
        last = next((chunk for chunk in reversed(self.out) if chunk), "\n")
        return last.endswith(" ")

    def _newline(self, *, blank: bool = False) -> None:
        # markers, merged in html_to_text: a block's end and the next one's start
        # make one line break, not two
        self.out.append(_BREAK if blank else _LINE)


def _shown(href: str) -> bool:
    """Links worth showing: not in-page anchors or scripts."""
    lowered = href.lower()
    return not lowered.startswith(("#", "javascript:", "data:"))


def html_to_text(html: str) -> str:
    """Readable plain text: blocks on their own lines, links as ``text <url>``."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    joined = _MARKS.sub(lambda m: "\n\n" if _BREAK in m.group() else "\n", "".join(parser.out))
    text = "\n".join(line.rstrip() for line in joined.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n" if text else ""


def html_links(html: str) -> list[str]:
    """Every link target of the markup (href, src, ...) and every bare URL in its text."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser.links + URL.findall(_MARKS.sub(" ", "".join(parser.out)))


def _content(part: MIMEPart) -> str | None:
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError, KeyError):
        return None
    return content if isinstance(content, str) else None


def plain_text(msg: EmailMessage) -> str | None:
    """The post as plain text, if it is one we convert: text/plain, text/html, or
    multipart/alternative (its plain alternative when it has one, else its HTML,
    also inside multipart/related). None for anything else, or undecodable text."""
    kind = msg.get_content_type()
    if kind == "text/plain":
        return _content(msg)
    if kind == "text/html":
        html = _content(msg)
        return None if html is None else html_to_text(html)
    if kind != "multipart/alternative":
        return None
    plain: MIMEPart | None = None
    html_part: MIMEPart | None = None
    for child in msg.iter_parts():
        child_kind = child.get_content_type()
        if child_kind == "multipart/related":
            first = next(iter(child.iter_parts()), None)
            if first is not None and first.get_content_type() == "text/html":
                html_part = html_part or first
        elif child_kind == "text/plain" and plain is None:
            plain = child
        elif child_kind == "text/html" and html_part is None:
            html_part = child
    if plain is not None:
        return _content(plain)
    if html_part is not None:
        html = _content(html_part)
        return None if html is None else html_to_text(html)
    return None


def to_plain_text(msg: EmailMessage) -> EmailMessage:
    """The message with its body replaced by its plain text (headers kept).

    A message that is already text/plain, or that cannot be converted (intake
    rejects those on such lists), is returned unchanged.
    """
    if msg.get_content_type() == "text/plain" and not msg.is_multipart():
        return msg
    text = plain_text(msg)
    if text is None:
        return msg
    msg.clear_content()  # drops the body and every Content-* header
    msg.set_content(text)
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = "1.0"
    return msg
