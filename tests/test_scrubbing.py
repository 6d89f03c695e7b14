"""The scrubbing pattern table: each pattern's example is scrubbed, its counter-example kept,
and the encodings an attacker would try (the issue's bypasses) are normalised first."""

from __future__ import annotations

import time
import urllib.parse

import pytest

from dropvault.tasks.scrubbing import AT, ENCODED, LONG, MAX_DECODES, MAX_LABEL, PATTERNS, scrub


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_example_is_scrubbed_and_counter_example_kept(pattern) -> None:  # type: ignore[no-untyped-def]
    clean, changed = scrub(pattern.example)
    assert changed and pattern.placeholder in clean
    assert scrub(pattern.counter_example) == (pattern.counter_example, False)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("alice%40example.com", "{email}"),  # percent-encoded @
        ("alice%2540example.com", "{email}"),  # encoded twice
        ("bob@localhost", "{email}"),  # no dot in the host
        ("jürgen.müller@example.de", "{email}"),  # internationalised
        ("/ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "/{email}"),  # full-width forms (NFKC)
        ("/ssn/123-45-6789", "/ssn/{id}"),
        ("/mrn/MRN-0012-3456", "/mrn/MRN-{id}"),
        ("/mrn/0012 3456", "/mrn/{id}"),
        ("/from/2001:db8::1", "/from/{ip}"),
        ("/from/::ffff:192.0.2.1", "/from/{ip}"),
        ("/p/PK_" + "AB" * 16, "/p/{patient}"),
        ("/s/1.2.840.113619.2.55.3.604688119", "/s/{uid}"),
        ("/from/198.51.100.23", "/from/{ip}"),
        # An outside review's bypasses: other dashes, invisible characters, other separators
        # and escapes, obfuscated @, dot-likes.
        ("/records/123\u201345\u20136789", "/records/{id}"),
        ("/mrn/123\u200b456\u200b78", "/mrn/{id}"),
        ("/mrn/123/456/789", "/mrn/{id}"),
        ("/share/jane.doe%u0040example.com", "/share/{email}"),
        ("/share/jane.doe&#64;example.com", "/share/{email}"),
        ("/share/jane.doe(at)example.com", "/share/{email}"),
        ("/u/1\u00b72\u00b7840\u00b710008\u00b75\u00b71\u00b74", "/u/{uid}"),
        # A third review's: a quoted local part, a bracketed domain, an address after a
        # letter or a colon, dates that are no dates, spaced and |/+ separators, dashed keys.
        ('/share/"alice.smith"@example.com', "/share/{email}"),
        ("/share/alice.smith@[192.0.2.1]", "/share/{email}"),
        ("/ip2001:db8:85a3:1::8a2e:370:7334", "/ip{ip}"),
        ("/x:2001:db8::1", "/x{ip}"),
        ("/record/2045-67-89", "/record/{id}"),
        ("/record/2012-34", "/record/{id}"),
        ("/case/123 - 45 - 6789", "/case/{id}"),
        ("/m/12|34|56|78", "/m/{id}"),
        ("/m/12+34+56", "/m/{id}"),
        ("/p/PK_01234567-89AB-CDEF-0123-456789ABCDEF", "/p/{patient}"),
        ("/from/203\u07010\u0701113\u07017", "/from/{ip}"),  # Syriac full stops
        # A fourth review's: invisible marks inside digit runs, other separators, mixed
        # hexadecimal parts, braces and escapes in e-mail, a letter after an IPv6 address.
        ("/case/123-45\u034f-6789", "/case/{id}"),
        ("/case/1\ufe0f2\ufe0f3\ufe0f-4\ufe0f5\ufe0f-6\ufe0f7\ufe0f8\ufe0f9\ufe0f", "/case/{id}"),
        ("/from/203\u180b.0.113\u180b.7", "/from/{ip}"),
        ("/studies/1.2.840\u034f.1136\u034f19.2.55\u034f.3", "/studies/{uid}"),
        ("/case/1\u03012\u03013\u0301-45-6789", "/case/{id}"),
        ("/case/123;45;6789", "/case/{id}"),
        ("/case/123--45--6789", "/case/{id}"),
        ("/from/0xcb.0.113.7", "/from/{ip}"),
        ("/from/0x0cb.0x000.0x071.0x007", "/from/{ip}"),
        ("/share/jane}@example.com", "/share/{email}"),
        ('/share/"john\\"smith"@example.com', "/share/{email}"),
        ("/x/2001:db8::8a2e:370:7334g", "/x/{ip}g"),
        ("/x/12:34-05:06-07:08", "/x/{id}"),  # more than two times of day: a number
    ],
)
def test_bypasses_are_scrubbed(label: str, expected: str) -> None:
    assert scrub(label) == (expected, True)


def test_query_and_fragment_are_cut_after_decoding() -> None:
    assert scrub("/page%3Fsession%3D123456789")[0] == "/page"
    assert scrub("/page#jane@example.com")[0] == "/page"


def test_ordinary_labels_are_kept() -> None:
    for label in (
        "/",
        "/about",
        "/news/2026-11-20",
        "/2026/11/20/news",
        "nl-2026-11",
        "/docs/v1.2.3",
        "/archive/2026-11-20/2026-11-27",
        "/news/2026-11-20 12:30",
        "/offers/2026-11-20-2026-11-30",
        "/opening/09:00-17:00",
        "/café/crème brûlée",
    ):
        assert scrub(label) == (label, False)


def test_a_label_still_encoded_after_the_bounded_decoding_is_replaced_whole() -> None:
    label = "/share/alice@example.com"
    for _ in range(MAX_DECODES + 1):
        label = urllib.parse.quote(label)
    assert scrub(label) == (ENCODED, True)


def test_a_long_label_is_replaced_whole() -> None:
    assert scrub("/" + "a" * MAX_LABEL) == (LONG, True)
    assert scrub("\ufdfa" * (MAX_LABEL // 4)) == (LONG, True)  # NFKC makes each 18 characters


@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000,
        " " * 200_000,
        "a" * 200_000 + "@",
        " " * 200_000 + "(at",
        "1" * 200_000,
        "1." * 100_000,
        "1 " * 100_000,
        "1:" * 100_000,
        "pk_" + "a-" * 100_000,
        "123-45-" * 30_000,
        '"' * 200_000 + "@",
        "2001:db8:" * 20_000,
    ],
    ids=[
        "letters",
        "spaces",
        "letters-at",
        "spaces-at",
        "digits",
        "dotted",
        "spaced",
        "colons",
        "dashed-key",
        "ssn-like",
        "quotes-at",
        "ipv6-like",
    ],
)
def test_every_pattern_is_linear(text: str) -> None:
    """Each pattern on 200,000 characters of the shapes that made them quadratic (a review
    measured 7 s for 40,000 spaces): linear takes milliseconds, quadratic minutes."""
    started = time.process_time()
    for pattern in PATTERNS:
        pattern.sub(text)
    AT.sub("@", text)
    assert time.process_time() - started < 2.0
