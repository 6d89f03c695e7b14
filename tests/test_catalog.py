"""``insert_rows``: dict rows in one statement, typed from the migrations (a real DuckDB file)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from dropvault.storage.catalog import Catalog, insert_rows, key_columns, migrations
from dropvault.storage.confinement import QueryRefused

NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.migrate()
    return catalog


def test_every_column_type_round_trips(catalog: Catalog) -> None:
    campaigns = [
        {"day": date(2026, 11, 1), "campaign": "c1", "sends": 2**40, "opens": 5,
         "open_rate": 0.25, "suppressed": False},
        {"day": date(2026, 11, 1), "campaign": "c2", "sends": None, "opens": None,
         "opens_with_mpp": 7, "open_rate_with_mpp": None, "suppressed": True},
    ]  # fmt: skip
    study = {"study_uid": "1.2.3", "patient_key": "p", "owner": "o", "facility_id": "f",
             "record_key_id": "k", "phi_enc": b"\x00\xffsealed", "status": "active",
             "created_at": NOW}  # fmt: skip

    def work(con: duckdb.DuckDBPyConnection) -> None:
        insert_rows(con, "email_campaigns", campaigns)
        insert_rows(con, "studies", [study])

    catalog.write(work)
    got = catalog.query(
        "SELECT campaign, day = DATE '2026-11-01' AS day_ok, sends, opens, opens_with_mpp,"
        " open_rate, open_rate_with_mpp IS NULL AS no_rate, suppressed"
        " FROM email_campaigns ORDER BY campaign"
    )
    assert got["day_ok"].all()
    assert got["sends"].tolist()[0] == 2**40 and str(got["sends"].tolist()[1]) in ("nan", "<NA>")
    assert got["open_rate"].tolist()[0] == 0.25 and got["no_rate"].all()
    assert got["suppressed"].tolist() == [False, True]
    stored = catalog.query("SELECT phi_enc, created_at FROM studies").to_dict("records")[0]
    assert stored["phi_enc"] == b"\x00\xffsealed" and stored["created_at"] == NOW


def test_existing_keys_are_ignored_when_asked(catalog: Catalog) -> None:
    rows = [{"facility_id": "f", "first_seen_at": NOW}] * 2  # a batch may repeat a key too
    catalog.write(lambda con: insert_rows(con, "facilities", rows, ignore_existing=True))
    catalog.write(lambda con: insert_rows(con, "facilities", rows, ignore_existing=True))
    assert catalog.query("SELECT count(*) AS n FROM facilities")["n"][0] == 1


def test_a_column_the_table_lacks_is_refused_by_name(catalog: Catalog) -> None:
    row = {"facility_id": "f", "first_seen_at": NOW, "nickname": "x"}
    with pytest.raises(ValueError, match="nickname"):
        catalog.write(lambda con: insert_rows(con, "facilities", [row]))
    assert catalog.query("SELECT count(*) AS n FROM facilities")["n"][0] == 0


def test_upgrading_to_unindexed_image_tables_keeps_every_row(tmp_path: Path) -> None:
    """Migration 008 rebuilds instances and objects without their PRIMARY KEY index: an old
    catalog keeps every row and value, and the keys still hold."""
    path = tmp_path / "catalog.duckdb"
    old = [m for m in migrations() if m[0] < 8]
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR,"
            " applied_at TIMESTAMPTZ)"
        )
        for version, name, sql in old:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
        con.execute(
            "INSERT INTO objects VALUES ('o1', 'instance', 'file:///v', 'local', 'o1.dvlt',"
            " 'k1', 10, 60, ?)",
            [NOW],
        )
        con.execute(
            "INSERT INTO instances VALUES ('1.2.9', '1.2', '1.2.8', NULL, 'CT', NULL, 2, 3, 1,"
            " 'f', 'd', 'o1', 'abc', 10, ?)",
            [NOW],
        )
    catalog = Catalog(path)
    assert catalog.migrate() == [8, 9, 10, 11, 12, 13, 14]
    got = catalog.query(
        "SELECT i.sop_instance_uid, i.rows, i.columns, i.sha256, i.ingested_at, o.name,"
        " o.stored_bytes FROM instances i JOIN objects o USING (object_id)"
    ).to_dict("records")
    assert got == [
        {"sop_instance_uid": "1.2.9", "rows": 2, "columns": 3, "sha256": "abc",
         "ingested_at": NOW, "name": "o1.dvlt", "stored_bytes": 60}
    ]  # fmt: skip
    indexed = catalog.query(
        "SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
        " AND table_name IN ('instances', 'objects')"
    )
    assert indexed.empty
    assert key_columns()["instances"] == ("sop_instance_uid",)
    assert key_columns()["objects"] == ("object_id",)
    # NOT NULL survived the rebuild.
    with pytest.raises(duckdb.ConstraintException):
        catalog.write(lambda con: con.execute("INSERT INTO objects (object_id) VALUES ('o2')"))
    # Without the index, an insert that ignores existing keys still does (by anti-join).
    row = {"object_id": "o1", "kind": "quarantine", "location_url": "file:///q",
           "region": "local", "name": "x", "record_key_id": "k", "plaintext_bytes": 1,
           "stored_bytes": 2, "created_at": NOW}  # fmt: skip
    catalog.write(lambda con: insert_rows(con, "objects", [row, row], ignore_existing=True))
    assert catalog.query("SELECT kind FROM objects")["kind"].tolist() == ["instance"]


def test_threads_of_one_process_take_turns_on_the_file(catalog: Catalog) -> None:
    # Two Catalog objects on one file, as two batches in flight hold: DuckDB shares one
    # instance per file in a process, and concurrent opens and closes of it used to fail.
    catalogs = [catalog, Catalog(catalog.path)]
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(worker: int) -> None:
        mine = catalogs[worker % 2]
        start.wait()
        try:
            for i in range(15):
                mine.write(
                    lambda con, i=i: con.execute(
                        "INSERT INTO audit_log VALUES (?, ?, 'test', 'thread', 'x', '{}')",
                        [f"{worker}-{i}", NOW],
                    )
                )
                mine.query("SELECT count(*) FROM audit_log")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    count = catalog.query("SELECT count(*) AS n FROM audit_log WHERE actor = 'test'")["n"][0]
    assert count == 6 * 15


def test_a_write_leaves_the_file_unlocked_and_checkpointed(catalog: Catalog) -> None:
    # The lock must go when the writer is done, or a notebook (another process) could not
    # open the catalog.
    catalog.write(
        lambda con: con.execute(
            "INSERT INTO audit_log VALUES ('a1', ?, 'test', 'attach', 'x', '{}')", [NOW]
        )
    )
    assert not catalog.path.with_name(catalog.path.name + ".wal").exists()
    other = subprocess.run(  # noqa: S603 - our own interpreter and a fixed script
        [
            sys.executable,
            "-c",
            "import sys, duckdb; con = duckdb.connect(sys.argv[1]);"
            " print(con.execute(\"SELECT count(*) FROM audit_log WHERE actor = 'test'\")"
            ".fetchone()[0])",
            str(catalog.path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() == "1"
    # And this process can still open it its own way (a confined reader) afterwards.
    assert catalog.query("SELECT count(*) AS n FROM audit_log WHERE actor = 'test'")["n"][0] == 1


def test_two_catalogs_with_one_name_are_written_at_once(tmp_path: Path) -> None:
    # Both files are called catalog.duckdb, written and compacted by two threads at once.
    first, second = (Catalog(tmp_path / d / "catalog.duckdb") for d in ("a", "b"))
    errors: list[BaseException] = []

    def work(catalog: Catalog, tag: str) -> None:
        try:
            catalog.migrate()
            for i in range(10):
                catalog.write(
                    lambda con, i=i: con.execute(
                        "INSERT INTO audit_log VALUES (?, ?, 'test', 'two', 'x', '{}')",
                        [f"{tag}-{i}", NOW],
                    )
                )
                if i == 5:
                    catalog.rewrite()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c, t)) for c, t in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for catalog, tag in ((first, "a"), (second, "b")):
        rows = catalog.fetch([("SELECT event_id FROM audit_log WHERE actor = 'test'", None)])[0]
        assert sorted(r[0] for r in rows) == sorted(f"{tag}-{i}" for i in range(10))


def test_a_failed_write_rolls_back_and_lets_go_of_the_file(catalog: Catalog) -> None:
    def fail(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("INSERT INTO audit_log VALUES ('gone', ?, 'test', 'fail', 'x', '{}')", [NOW])
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        catalog.write(fail)
    rows = catalog.fetch([("SELECT count(*) FROM audit_log WHERE actor = 'test'", None)])
    assert rows == [[(0,)]]
    # Nothing holds the file: a plain connection of this process opens it.
    duckdb.connect(str(catalog.path)).close()


def test_the_ingest_look_ups_refuse_what_a_reader_may_not_run(catalog: Catalog) -> None:
    # fetch is the ingest's own look-up path: an analyst's query must gain nothing by it.
    secret = catalog.path.with_name("kek.key")
    secret.write_text("not for queries")
    for query in (
        f"SELECT * FROM read_text('{secret}')",
        "SELECT * FROM duckdb_settings()",
        f"ATTACH '{secret}' AS x",
    ):
        with pytest.raises(QueryRefused):
            catalog.fetch([(query, None)])


def test_a_failed_compaction_leaves_no_copy_behind(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A half copy may hold rows a deletion is compacting away: it must not stay on disk,
    # and the next compaction must work.
    catalog.write(
        lambda con: con.execute(
            "INSERT INTO audit_log VALUES ('c1', ?, 'test', 'compact', 'x', '{}')", [NOW]
        )
    )
    real = Catalog._writer

    @contextlib.contextmanager
    def failing_copy(self: Catalog) -> Iterator[duckdb.DuckDBPyConnection]:
        with real(self) as con:

            class Failing:
                def execute(self, sql: str, *args: object) -> object:
                    if sql.startswith("COPY FROM DATABASE"):
                        con.execute(sql, *args)  # the copy is made, then the step fails
                        raise duckdb.IOException("disk full")
                    return con.execute(sql, *args)

            yield Failing()  # type: ignore[misc]

    monkeypatch.setattr(Catalog, "_writer", failing_copy)
    with pytest.raises(duckdb.IOException, match="disk full"):
        catalog.rewrite()
    monkeypatch.undo()
    leftovers = sorted(p.name for p in catalog.path.parent.iterdir() if "rewrite" in p.name)
    assert leftovers == []
    catalog.rewrite()
    rows = catalog.fetch([("SELECT event_id FROM audit_log WHERE actor = 'test'", None)])
    assert rows == [[("c1",)]]


def test_a_quote_in_the_home_path_does_not_stop_compaction(tmp_path: Path) -> None:
    # A home under a folder such as o'brien/ once made the rewrite's ATTACH a syntax error.
    catalog = Catalog(tmp_path / "o'brien" / "catalog.duckdb")
    catalog.migrate()
    catalog.write(
        lambda con: con.execute(
            "INSERT INTO audit_log VALUES ('q1', ?, 'test', 'quote', 'x', '{}')", [NOW]
        )
    )
    catalog.rewrite()
    rows = catalog.fetch([("SELECT event_id FROM audit_log WHERE actor = 'test'", None)])
    assert rows == [[("q1",)]]
