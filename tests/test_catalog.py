"""``insert_rows``: dict rows in one statement, typed from the migrations (a real DuckDB file)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from storage.catalog import Catalog, insert_rows

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
