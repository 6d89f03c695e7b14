"""``dropvault demo``: fill a home with demo drops and run every flow on it.

The drops come from 3 facilities and 24 patients, built from pydicom's bundled
samples with rewritten patient identities and UIDs; a few files are bad on
purpose (not DICOM, truncated, missing a UID, a UID conflict, a short
manifest) so the quarantine has something to show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flows.ingest import ingest_drops
from flows.settings import Settings
from storage.home import Home
from tasks import samples

FACILITIES = ("st-olav", "north-imaging", "harbor-clinic")


@dataclass
class DemoSummary:
    home: str
    drops_written: int
    files_written: int
    ingest: dict[str, Any]
    tables: dict[str, int] = field(default_factory=dict)
    quarantine: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"dropvault demo home: {self.home}"]
        out.append(f"wrote {self.drops_written} drops, {self.files_written} files")
        ing = self.ingest
        out.append(
            f"ingest: {ing['ingested']} ingested, {ing['duplicates']} duplicates, "
            f"{ing['quarantined']} quarantined, {ing['bytes']} bytes in {ing['seconds']} s"
        )
        out.append("catalog rows: " + ", ".join(f"{t}={n}" for t, n in self.tables.items()))
        out.append(
            "quarantine by reason: "
            + (", ".join(f"{r}={n}" for r, n in sorted(self.quarantine.items())) or "none")
        )
        return out

    def _repr_html_(self) -> str:
        return "<pre>" + "\n".join(self.lines()) + "</pre>"


def write_demo_drops(home: Home, seed: int = 7, patients: int = 24) -> tuple[int, int]:
    """Write the demo drops; returns ``(drops, files)``."""
    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    drops = files = 0
    for index in range(patients):
        facility = FACILITIES[index % len(FACILITIES)]
        patient = samples.make_patient(rng, index)
        study_uid, study = samples.make_study(rng, patient, rng.randint(2, 4))
        owners = {study_uid: f"user:{patient.patient_id.lower()}"} if index % 2 else {}
        samples.write_drop(home.drops, facility, f"drop-{index:03d}", study, owners=owners)
        drops += 1
        files += len(study)
    # Bad input, each kind once, in one drop per facility.
    patient = samples.make_patient(rng, 999)
    study_uid, study = samples.make_study(rng, patient, 2, "CT_small.dcm")
    good = next(iter(study.values()))
    bad = {
        "notes.txt": samples.not_dicom(),
        "cut.dcm": samples.truncated(good),
        "no-uid.dcm": samples.without(good, "SOPInstanceUID"),
    }
    samples.write_drop(home.drops, FACILITIES[0], "drop-bad", {**study, **bad})
    # The same SOP Instance UID with other content: a conflict.
    conflict = samples.with_uid(good, samples.sop_uid(good), tweak=b"rescanned")
    samples.write_drop(home.drops, FACILITIES[1], "drop-conflict", {"again.dcm": conflict})
    # No manifest: ingested once quiet.
    patient = samples.make_patient(rng, 1000)
    _, study = samples.make_study(rng, patient, 2, "MR_small.dcm")
    samples.write_drop(home.drops, FACILITIES[2], "drop-nomanifest", study, manifest=False)
    return drops + 3, files + len(bad) + 2 + 1 + 2


def run_demo(settings: Settings | None = None) -> DemoSummary:
    """Write demo drops under the settings' home and run every flow that exists."""
    settings = (settings or Settings.load()).model_copy(update={"quiet_seconds": 0.0})
    home = settings.build_home()
    drops, files = write_demo_drops(home)
    stats = ingest_drops(home=home, settings=settings)
    reader = home.catalog.read_only()
    tables = {}
    for table in (
        "facilities",
        "drops",
        "studies",
        "instances",
        "objects",
        "quarantine",
        "audit_log",
    ):
        tables[table] = int(reader.sql(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0])  # noqa: S608
    by_reason: pd.DataFrame = reader.sql("SELECT reason, count(*) AS n FROM quarantine GROUP BY 1")
    return DemoSummary(
        home=str(settings.home.resolve()),
        drops_written=drops,
        files_written=files,
        ingest=stats.as_dict(),
        tables=tables,
        quarantine=dict(zip(by_reason["reason"], by_reason["n"].astype(int), strict=True)),
    )
