"""The registry of where identifiers live (storage/identifiers.py) covers the whole schema,
and deletion follows it: a table added later with a study UID is handled without a list
kept by hand, and a text column nobody classified fails here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dropvault.storage import catalog as catalog_mod
from dropvault.storage import identifiers
from dropvault.tasks.deletion import REMOVED_WITH_STUDY, history_tables


def clear_caches() -> None:
    for fn in (
        catalog_mod._schema,
        catalog_mod.tables,
        identifiers.text_columns,
        identifiers.views_in_schema,
    ):
        fn.cache_clear()


@pytest.fixture
def extra_migration(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Append migrations (SQL strings) to the schema for one test."""
    added: list[str] = []
    real = catalog_mod.migrations

    def with_extra() -> list[tuple[int, str, str]]:
        found = real()
        last = found[-1][0]
        return found + [(last + i + 1, f"9{i}_test.sql", sql) for i, sql in enumerate(added)]

    monkeypatch.setattr(catalog_mod, "migrations", with_extra)
    clear_caches()
    yield added
    clear_caches()


def test_every_text_column_of_the_schema_is_classified() -> None:
    found = identifiers.text_columns()
    assert found  # the schema has text columns, and each got a class (else this raised)
    kinds = set(found.values())
    assert {"study", "series", "instance", "patient", "drop", "sealed", "clean"} <= kinds


def test_series_and_instance_uids_live_only_in_rows_deletion_removes() -> None:
    for kind in ("series", "instance", "patient"):
        for table, _ in identifiers.columns_of_kind(kind):
            assert table in REMOVED_WITH_STUDY, (kind, table)


def test_history_is_every_other_table_with_a_study_uid() -> None:
    assert history_tables() == [
        "deletion_requests",
        "deliveries",
        "disclosures",
        "grant_events",
        "grants",
        "incidents",
        "share_requests",
    ]
    # Free text in a row about a study names its study; a recipients request, a policy
    # notice and a policy file are about an account or the policy (their text is still
    # rewritten when it quotes a deleted UID).
    about_no_study = {"recipient_requests", "policy_notices", "policy_rejects"}
    for table, _ in identifiers.columns_of_kind("quoting:study"):
        if table not in about_no_study:
            assert "study_uid" in catalog_mod.column_types()[table], table


def test_a_new_table_with_a_study_uid_is_history_without_code_changes(
    extra_migration: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own id column must be declared clean; its study_uid column needs nothing."""
    extra_migration.append(
        "CREATE TABLE second_opinions (opinion_id VARCHAR PRIMARY KEY, study_uid VARCHAR)"
    )
    clean = identifiers.CLEAN | {("second_opinions", "opinion_id")}
    monkeypatch.setattr(identifiers, "CLEAN", clean)
    assert "second_opinions" in history_tables()


def test_a_new_text_column_nobody_classified_fails(extra_migration: list[str]) -> None:
    extra_migration.append("CREATE TABLE notes (note_id VARCHAR PRIMARY KEY, body VARCHAR)")
    with pytest.raises(identifiers.UnclassifiedColumnError, match="notes.note_id"):
        identifiers.text_columns()
