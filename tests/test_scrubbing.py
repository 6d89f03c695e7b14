"""The scrubbing pattern table: each pattern's example is scrubbed, its counter-example kept,
and the encodings an attacker would try (the issue's bypasses) are normalised first."""

from __future__ import annotations

import pytest

from dropvault.tasks.scrubbing import PATTERNS, scrub


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
    ):
        assert scrub(label) == (label, False)
