"""Locations: safe joins, TLS rule, atomic writes, listing, move, delete (all versions)."""

from __future__ import annotations

import uuid

import pytest

from dropvault.storage.home import Home
from dropvault.storage.locations import (
    InsecureEndpointError,
    Location,
    UnsafeNameError,
    check_endpoint_tls,
    safe_relpath,
)
from tests.conftest import VERSIONED_BUCKET, s3_filesystem
from tests.helpers import sources


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "a\x00b", "a\\..\\b", "C:/x", "", "a//b", "./a", "a/."],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        safe_relpath(name)


def test_safe_names_join() -> None:
    assert safe_relpath("fac", "drop/a b.dcm") == "fac/drop/a b.dcm"


def test_location_refuses_escape(local_home: Home) -> None:
    with pytest.raises(UnsafeNameError):
        local_home.drops.put_bytes("../vault/x", b"no")
    with pytest.raises(UnsafeNameError):
        local_home.drops.child("..")


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        (None, True),
        ("https://s3.example.org", True),
        ("http://127.0.0.1:9000", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("http://s3.example.org", False),
        ("http://10.0.0.5:9000", False),
    ],
)
def test_tls_required_off_loopback(endpoint: str | None, ok: bool) -> None:
    if ok:
        check_endpoint_tls(endpoint)
    else:
        with pytest.raises(InsecureEndpointError):
            check_endpoint_tls(endpoint)
        with pytest.raises(InsecureEndpointError):
            Location("s3://bucket/x", storage_options={"endpoint_url": endpoint})


def test_put_list_move_delete(home: Home) -> None:
    home.drops.put_bytes("f/d/a.dcm", b"aaa")
    home.drops.put_bytes("f/d/sub/b.dcm", b"bb")
    entries = home.drops.list()
    assert [(e.name, e.size) for e in entries] == [("f/d/a.dcm", 3), ("f/d/sub/b.dcm", 2)]
    assert all(e.mtime > 0 for e in entries)
    home.drops.move("f/d/a.dcm", home.archive, "moved/a.dcm")
    assert home.archive.read_bytes("moved/a.dcm") == b"aaa"
    assert not home.drops.exists("f/d/a.dcm")
    assert home.drops.delete("f/d/sub/b.dcm") == 1
    assert sources(home.drops) == []


def test_failed_write_leaves_nothing(home: Home) -> None:
    with pytest.raises(RuntimeError), home.vault.writer("x/y.dvlt") as fh:
        fh.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert home.vault.list() == []


@pytest.mark.integration
def test_delete_removes_every_version(moto_endpoint: str) -> None:
    fs = s3_filesystem(moto_endpoint)
    loc = Location(f"s3://{VERSIONED_BUCKET}/{uuid.uuid4().hex}", fs=fs)
    assert loc.versioned
    for i in range(3):
        loc.put_bytes("obj.dvlt", f"version {i}".encode())
    assert len(loc.versions("obj.dvlt")) == 3
    assert loc.delete("obj.dvlt") == 3
    assert loc.versions("obj.dvlt") == []
    assert not loc.exists("obj.dvlt")
