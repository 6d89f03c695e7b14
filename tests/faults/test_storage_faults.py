"""Storage faults: 503 storms, short reads, an object replaced mid-read, stale listings, and
a failed multipart upload. No file is skipped or doubled, and the retries show in the logs."""

from __future__ import annotations

import io
import logging
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.catalog import Catalog
from dropvault.storage.home import LOCATIONS, Home
from dropvault.storage.keystore import Keystore, create_secret
from dropvault.storage.locations import Location
from dropvault.tasks import samples
from tests.conftest import BUCKET, s3_filesystem
from tests.faults.faulty_fs import FaultyFileSystem
from tests.helpers import sources

pytestmark = pytest.mark.integration


@pytest.fixture
def retry_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Prefect's task-run log (where retries are reported), captured at INFO."""
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def faulty_home(tmp_path: Path) -> tuple[Home, FaultyFileSystem]:
    """Every location on one fault-injecting filesystem."""
    fs = FaultyFileSystem(skip_instance_cache=True)
    prefix = uuid.uuid4().hex[:12]
    locations = {name: Location(f"faulty://{prefix}/{name}", fs=fs) for name in LOCATIONS}
    return home_on(locations, tmp_path), fs


def home_on(locations: dict[str, Location], tmp_path: Path) -> Home:
    keys = tmp_path / "keys"
    return Home(
        catalog=Catalog(tmp_path / "catalog.duckdb"),
        keystore=Keystore.create_local(keys),
        pepper=create_secret(keys / "pepper.key"),
        region="local",
        **locations,
    )


def drop_studies(home: Home, seed: int, drops: int = 3, per: int = 3) -> set[str]:
    rng = random.Random(seed)
    uids: set[str] = set()
    for i in range(drops):
        _, files = samples.make_study(rng, samples.make_patient(rng, i), per, "MR_small.dcm")
        uids |= {samples.sop_uid(d) for d in files.values()}
        samples.write_drop(home.drops, "fac", f"d{seed}-{i}", files, manifest=False)
    return uids


def run(home: Home) -> object:
    return ingest_drops(home=home, settings=Settings.load(quiet_seconds=0), orphan_grace_seconds=0)


def assert_exactly_once(home: Home, uids: set[str]) -> None:
    q = home.catalog.query
    rows = q("SELECT sop_instance_uid, count(*) AS n FROM instances GROUP BY 1")
    assert set(rows["sop_instance_uid"]) == uids
    assert set(rows["n"]) == {1}
    stored = sorted(e.name for e in home.vault.list())
    assert stored == sorted(q("SELECT name FROM objects WHERE kind = 'instance'")["name"])


@pytest.mark.parametrize("method", ["open", "find", "rm_file"])
def test_503_storm_is_retried_and_loses_nothing(
    tmp_path: Path, method: str, retry_log: pytest.LogCaptureFixture
) -> None:
    home, fs = faulty_home(tmp_path)
    uids = drop_studies(home, 1)
    fs.storm(method, 2)
    run(home)
    assert fs.injected[method] == 2
    assert "503 SlowDown" in retry_log.text and "Retry 1/" in retry_log.text
    assert_exactly_once(home, uids)
    assert sources(home.drops) == []


def test_short_reads_change_nothing(tmp_path: Path) -> None:
    home, fs = faulty_home(tmp_path)
    uids = drop_studies(home, 2)
    big = io.BytesIO()  # over the in-memory limit: parsed and encrypted as a stream
    big_uid = samples.write_multiframe(
        big, samples.make_patient(random.Random(2), 9), "1.2.826.0.1.3680043.8.498.7", "1.2.3.9", 18
    )
    home.drops.put_bytes("fac/big/big.dcm", big.getvalue())
    fs.short_reads = True
    run(home)
    assert fs.injected["short_read"] > 0
    assert_exactly_once(home, uids | {big_uid})
    # What the vault holds reads back whole, through short reads too.
    for name, sha in home.catalog.query(
        "SELECT o.name, i.sha256 FROM objects o JOIN instances i USING (object_id)"
    ).itertuples(index=False):
        assert home.vault_store().digest(name)[1] == sha


def test_object_replaced_mid_read_is_left_for_the_next_run(tmp_path: Path) -> None:
    home, fs = faulty_home(tmp_path)
    rng = random.Random(3)
    _, files = samples.make_study(rng, samples.make_patient(rng, 1), 2, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "d1", files, manifest=False)
    first = sorted(files)[0]
    _, newer = samples.make_study(rng, samples.make_patient(rng, 2), 1, "MR_small.dcm")
    replacement = next(iter(newer.values()))
    fs.replace_on_open[f"{home.drops.root}/fac/d1/{first}"] = replacement
    stats = run(home)
    assert fs.injected["replaced"] == 1
    assert stats.sources_changed == 1  # type: ignore[attr-defined]
    # The replacement was not deleted unseen: it is still there, and the next run takes it.
    assert [e.name for e in sources(home.drops)] == [f"fac/d1/{first}"]
    run(home)
    want = {samples.sop_uid(d) for d in files.values()} | {samples.sop_uid(replacement)}
    assert_exactly_once(home, want)
    assert sources(home.drops) == []


def test_stale_listing_skips_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    home, fs = faulty_home(tmp_path)
    uids = drop_studies(home, 4, drops=2)
    gone = home.drops.list()[0].name  # listed, then taken by someone else
    fs.stale = fs.find(home.drops.root, detail=True)
    gone_uid = samples.sop_uid(home.drops.read_bytes(gone))
    home.drops.delete(gone)
    late_uids = drop_studies(home, 5, drops=1)  # arrives after the listing
    run(home)
    assert fs.injected["stale_listing"] > 0
    fs.stale = None
    run(home)
    assert_exactly_once(home, (uids - {gone_uid}) | late_uids)
    assert sources(home.drops) == []


def test_failed_multipart_upload_is_aborted_and_retried(
    moto_endpoint: str, tmp_path: Path, retry_log: pytest.LogCaptureFixture
) -> None:
    """The vault's upload of a 12 MB image fails on its second part: the upload is aborted,
    the batch is retried, and the image is stored and cataloged once."""
    fs = s3_filesystem(moto_endpoint)
    vault_fs = type(fs)(
        endpoint_url=moto_endpoint,
        key="testing",
        secret="testing",  # noqa: S106 - moto's fixed test credentials
        default_block_size=5 * 2**20,
        skip_instance_cache=True,
    )
    prefix = uuid.uuid4().hex[:12]
    locations = {
        name: Location(f"s3://{BUCKET}/{prefix}/{name}", fs=vault_fs if name == "vault" else fs)
        for name in LOCATIONS
    }
    home = home_on(locations, tmp_path)
    big = io.BytesIO()
    uid = samples.write_multiframe(
        big, samples.make_patient(random.Random(6), 1), "1.2.826.0.1.3680043.8.498.8", "1.2.3.8", 24
    )
    home.drops.put_bytes("fac/big/big.dcm", big.getvalue())

    real_call = vault_fs.call_s3  # what S3File uses for each part
    parts = {"n": 0}

    def failing_call(method: str, *args: object, **kwargs: object) -> object:
        if method == "upload_part":
            parts["n"] += 1
            if parts["n"] == 2:
                raise OSError("503 SlowDown (injected into upload_part)")
        return real_call(method, *args, **kwargs)

    vault_fs.call_s3 = failing_call  # type: ignore[method-assign]
    run(home)
    assert parts["n"] >= 3  # the first attempt died on part 2, the retry uploaded again
    assert "Retry 1/" in retry_log.text
    assert_exactly_once(home, {uid})
    pending = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=prefix)
    assert pending.get("Uploads", []) == []
    assert sources(home.drops) == []
