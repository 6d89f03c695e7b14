"""Shared fixtures: one Prefect test harness, moto's S3 server, and a fresh home per test.

The ``home`` fixture runs each test that uses it against ``file://``,
``memory://`` and ``s3://`` (s3fs against moto's server on 127.0.0.1). The
catalog is a local DuckDB file and the keystore is always local: keys never go
to the object store.

The ingest, sharing and deletion suites and the manifest races also run once on
DuckLake: each of their tests gets a ``catalog_backend`` of ``duckdb`` and
``ducklake``, and in the
DuckLake run every home's catalog is a fresh lake (metadata in its own schema of
a real PostgreSQL server started for the session on loopback, data as Parquet on
moto's S3), with the locations on ``s3://`` only.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Quiet, offline Prefect for a plain `pytest` run (CI sets the same).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import boto3  # noqa: E402
import pytest  # noqa: E402
import s3fs  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from dropvault.storage.catalog import Catalog  # noqa: E402
from dropvault.storage.ducklake import Lake  # noqa: E402
from dropvault.storage.home import LOCATIONS, Home  # noqa: E402
from dropvault.storage.keystore import Keystore, create_secret  # noqa: E402
from dropvault.storage.locations import Location  # noqa: E402
from tests.moto_server import moto_server  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

BUCKET = "dropvault-test"
VERSIONED_BUCKET = "dropvault-versioned"
LAKE_BUCKET = "dropvault-lake"
LAKE_SUITES = {
    "test_ingest",
    "test_sharing",
    "test_deletion",
    "test_deletion_traces",
    "test_manifest_races",
}
HOME_FIXTURES = ("home", "dhome")

# Set per test in a DuckLake run: returns a fresh, empty lake.
_new_lake: Callable[[], Lake] | None = None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in LAKE_SUITES:
        metafunc.parametrize(
            "catalog_backend",
            ["duckdb", pytest.param("ducklake", marks=pytest.mark.integration)],
            indirect=True,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The DuckLake run of a suite uses s3:// locations only (file and memory are the
    DuckDB run's business): deselect its other combinations."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        lake = params.get("catalog_backend") == "ducklake"
        local = any(params.get(f, "s3") != "s3" for f in HOME_FIXTURES)
        (drop if lake and local else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    """One Prefect API for the whole session (starting one costs ~7 s)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server in a process of its own (tests/moto_server.py), with the buckets."""
    os.environ.pop("AWS_PROFILE", None)
    os.environ["AWS_ACCESS_KEY_ID"] = "foo"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "foo"  # noqa: S105 - moto test credentials
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=LAKE_BUCKET)
        client.create_bucket(Bucket=VERSIONED_BUCKET)
        for versioned in (VERSIONED_BUCKET, LAKE_BUCKET):  # a lake's old Parquet versions too
            client.put_bucket_versioning(
                Bucket=versioned, VersioningConfiguration={"Status": "Enabled"}
            )
        yield endpoint


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback with a temporary data folder."""
    with PostgresServer.start() as server:
        yield server


def lake_factory(postgres: PostgresServer, moto_endpoint: str) -> Callable[[], Lake]:
    """Fresh lakes: a new metadata schema and a new S3 prefix each."""

    def new() -> Lake:
        name = "t" + uuid.uuid4().hex[:12]
        return Lake(
            metadata=postgres.conninfo,
            data_url=f"s3://{LAKE_BUCKET}/{name}/",
            s3={"endpoint_url": moto_endpoint, "key": "foo", "secret": "foo"},
            schema=name,
        )

    return new


@pytest.fixture(autouse=True)
def catalog_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """``ducklake``: every home built by ``make_home`` in this test gets a fresh lake."""
    global _new_lake
    backend = getattr(request, "param", "duckdb")
    if backend == "ducklake":
        _new_lake = lake_factory(
            request.getfixturevalue("postgres"), request.getfixturevalue("moto_endpoint")
        )
    try:
        yield backend
    finally:
        _new_lake = None


def new_catalog(path: Path) -> Catalog:
    return Catalog(_new_lake()) if _new_lake else Catalog(path)


def s3_filesystem(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key="foo",
        secret="foo",  # noqa: S106 - moto test credentials
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def make_home(kind: str, tmp_path: Path, endpoint: str | None = None, bucket: str = BUCKET) -> Home:
    """A home whose locations live on ``kind`` (file, memory or s3)."""
    if kind == "file":
        home = Home.init(tmp_path / "home")
        home.catalog = new_catalog(home.catalog.path)
        return home
    prefix = uuid.uuid4().hex[:12]
    locations: dict[str, Location] = {}
    if kind == "memory":
        for name in LOCATIONS:
            locations[name] = Location(f"memory://{prefix}/{name}")
    elif kind == "s3":
        assert endpoint is not None
        fs = s3_filesystem(endpoint)
        for name in LOCATIONS:
            locations[name] = Location(f"s3://{bucket}/{prefix}/{name}", fs=fs)
    else:
        raise ValueError(kind)
    keys = tmp_path / "keys"
    return Home(
        catalog=new_catalog(tmp_path / "catalog.duckdb"),
        keystore=Keystore.create_local(keys),
        pepper=create_secret(keys / "pepper.key"),
        region="test-region" if kind == "s3" else "local",
        **locations,
    )


@pytest.fixture(
    params=[
        "file",
        "memory",
        pytest.param("s3", marks=pytest.mark.integration),
    ]
)
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Home:
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3" else None
    return make_home(request.param, tmp_path, endpoint)


@pytest.fixture
def local_home(tmp_path: Path) -> Home:
    return make_home("file", tmp_path)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def run_logs_at_debug() -> Iterator[None]:
    """The suite runs Prefect at WARNING; here every run log line must reach the API."""
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    yield
    for lg, level in zip(loggers, before, strict=True):
        lg.setLevel(level)
