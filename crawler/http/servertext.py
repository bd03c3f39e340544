"""Text the server wrote, made safe before anything else sees it.

An error body's message, a zod issue, an exception that quotes the wire: all of it
is untrusted. It is stored (the state, `last-run.json`), logged (text or JSON) and
printed on a terminal, so `ServerText` cleans it once, where the outcome that
carries it is built:

- lone surrogates (JavaScript's `JSON.stringify` of a string cut inside an emoji)
  become U+FFFD, so every later UTF-8 encode (SQLite, orjson, stderr) works;
- terminal escape sequences (CSI, OSC and the other ESC forms), every other
  control character (C0, DEL, C1) and the zero-width and bidi format
  characters are dropped, line breaks and tabs become one space: the words
  stay, on one line, and the terminal is never steered;
- every header value the client sent (the bearer token above all) is replaced
  by `[redacted]`, before the text is cut short, so a server that echoes the
  request cannot put a key, or the start of one, into a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

REDACTED = "[redacted]"
MAX_CHARS = 500  # a reason is one line for a person

# ESC sequences, longest forms first: strings (OSC, DCS, SOS, PM, APC) up to BEL or ST,
# CSI (7- and 8-bit) with its parameters, then any other ESC and the character after it (an
# unterminated string loses only its introducer: the words after it stay).
_ESCAPES = re.compile(
    r"\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|\x1b[ -~]?"
)
# C0 and C1 but the whitespace str.split() splits on (tab, line breaks, \x1c-\x1f, NEL), DEL;
# the zero-width and bidi controls (they hide or reorder what a person reads).
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


@dataclass(frozen=True, slots=True)
class ServerText:
    """Cleans server text; `secrets` (what the client sent in its headers) never come out."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def hiding(cls, headers: Mapping[str, str]) -> ServerText:
        """A cleaner that redacts every header value sent, and the token of `<scheme> <token>`."""
        found: set[str] = set()
        for value in headers.values():
            for secret in (value, *value.split()[1:]):
                cleaned = _clean(secret)
                if cleaned:
                    found.add(cleaned)
        # Longest first: "Bearer <key>" goes whole before the bare key is looked for.
        return cls(tuple(sorted(found, key=len, reverse=True)))

    def __call__(self, text: str, limit: int = MAX_CHARS) -> str:
        """`text` on one line, safe to store and print, at most `limit` characters."""
        text = _clean(self._redact(text))  # before: a key split by escapes is whole again after
        return self._redact(text)[:limit]

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def _clean(text: str) -> str:
    # UTF-16 pairs what can be paired (two escapes of one emoji) and replaces the rest.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = _CONTROLS.sub("", _ESCAPES.sub("", text))
    return " ".join(text.split())  # the whitespace left, line breaks included, is one space
