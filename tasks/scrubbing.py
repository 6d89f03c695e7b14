"""Identifiers out of beacon labels (targets, partners, campaign names) before counting.

A label is first normalised, so an identifier cannot hide behind an encoding:
percent-decoding is repeated (at most :data:`MAX_DECODES` times) until the text stops
changing, then Unicode NFKC folds compatibility forms (a full-width ``＠`` is ``@``), and
the query string and fragment are cut. Then each pattern of :data:`PATTERNS` replaces what
it matches with its placeholder, case-insensitively. Each pattern carries an example it
must scrub and a counter-example it must keep (``tests/test_scrubbing.py`` checks both).
"""

from __future__ import annotations

import html
import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from urllib.parse import unquote

MAX_DECODES = 8
# A label longer than this (after normalising) is replaced whole: no real page name is, and
# every pattern below must stay linear in what it is given.
MAX_LABEL = 2048
LONG, ENCODED = "{long}", "{encoded}"
# Characters that end an e-mail-like token on either side of the @.
_EDGE = r"""[^\s/@?#:;,<>()\[\]\\"']"""


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern[str]
    placeholder: str
    example: str  # scrubbed
    counter_example: str  # kept as it is
    valid: Callable[[str], bool] | None = None  # a match is replaced only when this holds

    def sub(self, text: str) -> str:
        if self.valid is None:
            return self.regex.sub(self.placeholder, text)
        check = self.valid
        return self.regex.sub(lambda m: self.placeholder if check(m.group(0)) else m.group(0), text)


# A date (a month's newsletter, a news page) is left as it is: alone it names no one.
ISO_DATE = re.compile(r"(?:19|20)\d{2}([-/])(\d{2})(?:\1(\d{2}))?")


# Between an SSN's groups: one or two punctuation marks, or spaces.
_SEP = r"(?: *+[^0-9A-Za-z\s]{1,2} *+| ++)"
_PART = r"(?:0x[0-9a-f]{1,8}|\d{1,3})"  # an IPv4 part, hexadecimal or decimal
_DATE_OR_TIME = re.compile(r"(?:19|20)\d{2}[-/.]\d{2}(?:[-/.]\d{2})?|\d{1,2}:\d{2}(?::\d{2})?")


def _dates_and_times(text: str) -> bool:
    """A digit run made only of one or two real dates or times of day, joined by a
    separator or a space (``2026-11-20 12:30``, ``09:00-17:00``): a page's date, no one's
    number. (A longer chain could spell a number in dates.)"""
    pos = 0
    for _ in range(2):
        m = _DATE_OR_TIME.match(text, pos)
        if m is None or (":" not in m.group(0) and not _is_date(m.group(0))):
            return False
        if ":" in m.group(0) and not _is_time(m.group(0)):
            return False
        pos = m.end()
        if pos == len(text):
            return True
        sep = re.match(r"[-_/ T]{1,3}", text[pos:])
        if sep is None:
            return False
        pos += sep.end()
    return False


def _is_time(text: str) -> bool:
    parts = [int(x) for x in text.split(":")]
    return parts[0] < 24 and all(x < 60 for x in parts[1:])


def _is_date(text: str) -> bool:
    """A real calendar date or month (2026-11-20, 2026/11, not 2045-67-89)."""
    m = ISO_DATE.fullmatch(text)
    if m is None:
        return False
    try:
        date(int(text[:4]), int(m.group(2)), int(m.group(3) or 1))
    except ValueError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "email",
        # A run of token characters is tried from its start only (the lookbehind), and
        # possessively: linear, where a plain search was quadratic on a long run. A quoted
        # local part and a bracketed domain are e-mail too.
        re.compile(
            rf"""(?:"(?:[^"\\\n]|\\.){{1,64}}"|(?<!{_EDGE}){_EDGE}++)"""
            rf"""@(?:\[[^\]\s]{{1,64}}\]|{_EDGE}+)""",
            re.IGNORECASE,
        ),
        "{email}",
        example="/share/jürgen.müller@example.de",
        counter_example="/users/@me",
    ),
    Pattern(
        "ipv6",
        re.compile(
            r"(?<![:.])(?:[0-9a-f]{0,4}:){2,7}"
            r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{0,4})(?![0-9a-f:])",
            re.IGNORECASE,
        ),
        "{ip}",
        example="/from/2001:db8::8a2e:370:7334",
        counter_example="/at/12:30",
        # A match may take the colon before an address (``x:2001:db8::1``): still one.
        valid=lambda t: _is_ip(t) or (t[:1] == ":" and t[:2] != "::" and _is_ip(t[1:])),
    ),
    Pattern(
        "ipv4",
        re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])"),
        "{ip}",
        example="/from/203.0.113.7",
        counter_example="/docs/v1.2.3",
        valid=_is_ip,
    ),
    Pattern(
        "ipv4_hex",  # the same address with parts in hexadecimal (some or all)
        re.compile(rf"(?<![0-9a-z.]){_PART}(?:\.{_PART}){{3}}(?![0-9a-z.])", re.IGNORECASE),
        "{ip}",
        example="/from/0xcb.0.0x071.7",
        counter_example="/colour/0xcb.0x00",
        valid=lambda text: "0x" in text.lower(),
    ),
    Pattern(
        "uid",
        re.compile(r"(?<![\d.])\d+(?:\.\d+){3,}(?![\d])"),
        "{uid}",
        example="/studies/1.2.840.113619.2.55.3",
        counter_example="/docs/v1.2.3",
    ),
    Pattern(
        "patient_key",
        re.compile(r"pk_[0-9a-z](?:-?[0-9a-z]){15,}", re.IGNORECASE),
        "{patient}",
        example="/p/PK_0123456789ABCDEF0123456789ABCDEF",
        counter_example="/p/pk_test",
    ),
    Pattern(
        "ssn",
        re.compile(rf"(?<!\d)\d{{3}}{_SEP}\d{{2}}{_SEP}\d{{4}}(?!\d)"),
        "{id}",
        example="/case/123-45-6789",
        counter_example="/case/123-45",
    ),
    Pattern(
        "mrn",  # six or more digits, run together or split by punctuation or spaces
        re.compile(r"(?<!\d)\d(?: *+[^0-9A-Za-z\s]?\s*+\d){5,}(?!\d)"),
        "{id}",
        example="/record/MRN-0012-3456",
        counter_example="/news/2026-11-20 12:30",
        valid=lambda digits: not _dates_and_times(digits),
    ),
)


def normalise(text: str) -> str:
    """Decoded (percent, ``%u0040``-style and HTML entities, repeatedly, bounded), NFKC-folded,
    invisible format characters dropped, dashes and dot-likes made ASCII, ``(at)``
    read as ``@``; then the query and fragment are cut."""
    for _ in range(MAX_DECODES):
        decoded = _decoded_once(text)
        if decoded == text:
            break
        text = decoded
    text = unicodedata.normalize("NFKC", text)
    out: list[str] = []
    for c in text:
        plain = _plain(c)
        # A combining mark on an ASCII character (U+0301 after a digit) splits a number a
        # reader still sees whole: dropped, as are invisible selectors and joiners.
        if plain and unicodedata.category(plain) in ("Mn", "Me") and out and out[-1].isascii():
            continue
        out.append(plain)
    text = "".join(out)
    text = AT.sub("@", text)
    return re.split(r"[?#]", text, maxsplit=1)[0]


def _decoded_once(text: str) -> str:
    return html.unescape(unquote(PERCENT_U.sub(_unicode_escape, text), errors="replace"))


PERCENT_U = re.compile(r"%u([0-9a-fA-F]{4})")
AT = re.compile(r"(?<!\s)\s*+[(\[{<]\s*+at\s*+[)\]}>]\s*+", re.IGNORECASE)
# Dot-likes read as ``.``: these, and every full stop and middle dot of any script (Syriac's
# U+0701 between an address's numbers hid it from the IPv4 pattern).
DOTS = frozenset("\u00b7\u2022\u2024\u2027\u2219\u22c5\u30fb\uff0e\u3002\u2e33") | {
    chr(c)
    for c in range(0x10000)
    if unicodedata.category(chr(c)) == "Po"
    and any(w in unicodedata.name(chr(c), "") for w in ("FULL STOP", "MIDDLE DOT"))
}


# Default-ignorable characters that are not format characters (Unicode's
# DerivedCoreProperties): invisible, so a digit run split by one still reads whole.
IGNORABLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u3164\uffa0"
    + "".join(chr(c) for c in range(0xFE00, 0xFE10))
    + "".join(chr(c) for c in range(0xE0100, 0xE01F0))
)


def _unicode_escape(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 16))


def _plain(c: str) -> str:
    """One character as the patterns read it: format and control characters (zero-width
    spaces, joiners, bidi marks, NUL) dropped, any dash ``-``, any dot-like ``.``."""
    category = unicodedata.category(c)
    # Format and control characters (a NUL, a tab: not a label's) and invisible ones.
    if category in ("Cf", "Cc") or c in IGNORABLE:
        return ""
    if category == "Pd" or c == "\u2212":
        return "-"
    return "." if c in DOTS else c


def scrub(label: str | None) -> tuple[str, bool]:
    """The label with every identifier replaced, and whether any pattern matched."""
    if label is not None and len(label) > MAX_LABEL:
        return LONG, True
    text = normalise(label or "")
    if len(text) > MAX_LABEL:  # NFKC can make one character eighteen
        return LONG, True
    if _decoded_once(text) != text:  # still encoded after MAX_DECODES passes: hiding something
        return ENCODED, True
    clean = text
    for pattern in PATTERNS:
        clean = pattern.sub(clean)
    return clean, clean != text
