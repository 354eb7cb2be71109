"""What HQ does when clinics disagree: site-qualified patients, revisions, reconciliation.

Every clinic keeps its own patient register, so two clinics' "12345" are, as far as anyone can
know, two people. Orthanc 1.10 identifies a patient by PatientID alone (its patient ID is a hash
of it), so HQ never stores a clinic's PatientID as sent. The decisions, and why:

Site-qualified patients (always on, no setting)
    HQ stores a copy of each instance whose identity is qualified by the sending site, and
    changes exactly these attributes (`IDENTITY`), nothing else:

      PatientID (0010,0020)                "<SITE_CODE>:<PatientID as sent>"
      IssuerOfPatientID (0010,0021)        "<SITE_CODE>"
      OtherPatientIDsSequence (0010,1002)  the items sent, then one more: the PatientID and
                                           IssuerOfPatientID as sent, TypeOfPatientID "TEXT"

    So site-a's and site-b's "12345" are two patients at HQ, and the original identity is in the
    file for anyone who needs it (a radiologist, a RIS, a later merge). Qualification is not a
    setting: turning it off would bring back the silent merge it exists to prevent, and a
    shared (national) identifier survives in OtherPatientIDsSequence, where the reconciliation
    list below links sites that use it. The rewrite is pydicom on HQ's scratch file (no new
    dependency; Orthanc's /modify would need the unqualified instance stored first, merging it
    for a moment with whoever else holds that PatientID). It holds the instance in memory
    (HQ's server, not a 2 GB Pi). A long site code plus a long clinic ID can exceed the 64
    characters DICOM allows a PatientID (LO): pydicom and Orthanc keep it whole (cutting it
    could merge two patients); a strict outside system receiving from HQ may not.

    HQ's "verified" is then precise: both files are decoded and the stored one must equal the
    original with `qualify` applied — every attribute, the transfer syntax, the file meta SOP
    Instance UID and the pixel data's bytes — before it is posted; Orthanc must then serve
    exactly the bytes that were checked (MD5). The original's MD5 is recorded
    (GotgOriginalMd5) and the holdings question and the confirmation still answer by it, so the
    clinic's counting is unchanged; so is the way back to the original's exact bytes, for a
    clinic's repair (GotgOriginalPatch, originals.py). Any other difference is a refusal, never
    a confirmation.

Identical instances
    The same site sending the same content again: the holdings question, or the stored copy
    found by (SOP Instance UID, original MD5, site), answers with HQ's instance; nothing is
    stored twice. The same content from another site (a referral, a study imported from a CD)
    is stored again as that site's own qualified copy: it is that site's record of its own
    patient, and folding it into the first site's patient would split the study at the second
    site. The audit log notes it ("shared"); if the demographics differ, the study goes to the
    reconciliation list.

Revisions (same SOP Instance UID, different content, same site; or HQ holding other content
under the very instance Orthanc would store it as)
    HQ never overwrites and never refuses for ever: the first version stays the one HQ's
    Orthanc serves to viewers, and the new one is kept byte for byte under
    `hq_dir/revisions/` (a name made of hashes, never of header values), fsynced, read back and
    checked by MD5, with a row in the ledger and an audit line listing what differs (attribute
    keywords, and PixelData if the decoded pixels changed). The clinic is confirmed with the
    revision's ID ("rev-..."), which the holdings question also answers: HQ durably holds
    exactly those bytes and serves them to HQ operators (`GET /api/v1/revisions/<id>/file`).
    Each revision opens a reconciliation entry: a person decides which version is right;
    nothing is promoted or replaced automatically.

Reconciliation list (never merged silently)
    Demographics are PatientName, PatientBirthDate, PatientSex. An entry opens when:
      * one site's patient (one qualified ID) arrives with different demographics
        ("patient-demographics": a typo fixed at the modality, or two people on one ID);
      * one study (Study Instance UID) arrives from two sites with different demographics
        ("study-across-sites");
      * one PatientID with the same non-empty original Issuer of Patient ID (a shared register)
        arrives from two sites with different demographics ("issued-id-across-sites");
      * one SOP Instance UID arrives from two sites with different content
        ("uid-across-sites");
      * a revision is kept ("revision").
    A bare PatientID that two sites happen to share is NOT an entry: qualification already keeps
    them apart, and listing every collision of small clinic registers would bury real ones.
    An entry gathers every variant seen under its subject; a new variant reopens a resolved one.
    Resolving records a decision (same-patient, different-patients, acknowledged), a note, who
    and when — in the ledger and the audit log — and changes no image: a merge in Orthanc, if
    ever wanted, is a separate deliberate act.

    Entries hold patient data, so only HQ operators see them: their own tokens
    (`pacs hq operator add NAME`, stored hashed like site tokens); a site's token gets 403.
    Values from DICOM headers are data everywhere: JSON over HTTP, parameters in SQL, hashes in
    file names, and printable characters only in the CLI's text output.

Files under `hq_dir`: `conflicts.sqlite` (WAL, synchronous FULL; shared by the receivers on
one host, each call its own short transaction), `audit.jsonl` (append-only, fsynced per line),
`revisions/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .. import durable
from ..sqlite_tx import immediate
from ..sync import codecs

IDENTITY = ("PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence")
DEMOGRAPHICS = ("PatientName", "PatientBirthDate", "PatientSex")
DECISIONS = ("same-patient", "different-patients", "acknowledged")
KINDS = ("patient-demographics", "study-across-sites", "issued-id-across-sites",
         "uid-across-sites", "revision")
PIXEL_DATA = 0x7FE00010


def qualified_id(site: str, patient_id: str) -> str:
    return f"{site}:{patient_id}"


def qualify(dataset: Dataset, site: str) -> None:
    """Qualify the patient's identity by the sending site, in place (see the module's doc)."""
    original_id = str(dataset.get("PatientID", "") or "")
    original_issuer = dataset.get("IssuerOfPatientID")
    item = Dataset()
    item.PatientID = original_id
    if original_issuer is not None:
        item.IssuerOfPatientID = original_issuer
    item.TypeOfPatientID = "TEXT"
    sent = list(dataset.OtherPatientIDsSequence) if "OtherPatientIDsSequence" in dataset else []
    dataset.OtherPatientIDsSequence = Sequence([*sent, item])
    dataset.PatientID = qualified_id(site, original_id)
    dataset.IssuerOfPatientID = site


def _pixels(dataset: Dataset) -> bytes | None:
    element = dataset.get(PIXEL_DATA)
    return None if element is None else element.value


def same_but_identity(original: Dataset, stored: Dataset, site: str) -> bool:
    """Is `stored` exactly `original` qualified for `site`: every attribute, the encoding and
    the pixel data's bytes? (`original` is qualified in place.)"""
    qualify(original, site)
    return (codecs._content(stored) == codecs._content(original)
            and _pixels(stored) == _pixels(original)
            and stored.file_meta.get("TransferSyntaxUID")
            == original.file_meta.get("TransferSyntaxUID")
            and stored.file_meta.get("MediaStorageSOPInstanceUID")
            == original.file_meta.get("MediaStorageSOPInstanceUID"))


def differing(old: Dataset, new: Dataset) -> list[str]:
    """Keywords (or tags) of the attributes that differ between two versions of an instance."""
    a, b = codecs._content(old), codecs._content(new)
    names = [pydicom.datadict.keyword_for_tag(tag) or str(tag)
             for tag in sorted(set(a) | set(b)) if a.get(tag) != b.get(tag)]
    if not _same_pixels(old, new):
        names.append("PixelData")
    return names


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    """The same pixel data bytes, or the same pixels in two encodings (HQ's copy may be the
    clinic's lossless transcoding)."""
    if _pixels(a) == _pixels(b):
        return True
    try:
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception:  # noqa: BLE001 - pixels that do not decode are counted as different
        return False


def demographics(dataset: Dataset) -> dict[str, str]:
    return {name: str(dataset.get(name, "") or "") for name in DEMOGRAPHICS}


SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    qualified_id TEXT NOT NULL, site TEXT NOT NULL, original_id TEXT NOT NULL,
    issuer TEXT NOT NULL, study_uid TEXT NOT NULL, name TEXT NOT NULL,
    birth_date TEXT NOT NULL, sex TEXT NOT NULL, sop_uid TEXT NOT NULL, hq_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (qualified_id, study_uid, name, birth_date, sex));
CREATE INDEX IF NOT EXISTS seen_study ON seen (study_uid);
CREATE INDEX IF NOT EXISTS seen_issued ON seen (issuer, original_id);
CREATE TABLE IF NOT EXISTS revisions (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, sop_uid TEXT NOT NULL,
    original_md5 TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL,
    file TEXT NOT NULL, held TEXT NOT NULL, differing TEXT NOT NULL, stored_at REAL NOT NULL,
    UNIQUE (site, sop_uid, original_md5));
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    variants TEXT NOT NULL, resolutions TEXT NOT NULL DEFAULT '[]',
    UNIQUE (kind, subject));
"""


class Ledger:
    """HQ's record of patients seen, revisions kept and the reconciliation list."""

    def __init__(self, hq_dir: Path) -> None:
        self.hq_dir = hq_dir
        self.path = hq_dir / "conflicts.sqlite"
        self.audit_file = hq_dir / "audit.jsonl"
        self.revisions_dir = hq_dir / "revisions"
        hq_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self):
        with self._db() as db, immediate(db):
            yield db

    def audit(self, event: str, **fields) -> None:
        """One line per event, on disk before the caller goes on."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "event": event, **fields}) + "\n"
        durable.append(self.audit_file, line.encode())

    # --- patients ---

    def observe(self, site: str, dataset: Dataset, sop_uid: str, hq_id: str,
                original_id: str, original_issuer: str) -> None:
        """Remember who this instance says its patient is; open or extend entries for any
        disagreement. Idempotent (a retried upload observes the same instance again)."""
        demo = demographics(dataset)
        row = {"qualified_id": qualified_id(site, original_id), "site": site,
               "original_id": original_id, "issuer": original_issuer,
               "study_uid": str(dataset.get("StudyInstanceUID", "")),
               "name": demo["PatientName"], "birth_date": demo["PatientBirthDate"],
               "sex": demo["PatientSex"], "sop_uid": sop_uid, "hq_id": hq_id,
               "first_seen": time.time()}
        with self._transaction() as db:
            db.execute(f"INSERT OR IGNORE INTO seen ({', '.join(row)}) "
                       f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            self._compare(db, "patient-demographics", row["qualified_id"],
                          "qualified_id = ?", (row["qualified_id"],), across_sites=False)
            self._compare(db, "study-across-sites", row["study_uid"], "study_uid = ?",
                          (row["study_uid"],), across_sites=True)
            if original_issuer:
                self._compare(db, "issued-id-across-sites", f"{original_issuer}|{original_id}",
                              "issuer = ? AND original_id = ?", (original_issuer, original_id),
                              across_sites=True)

    def _compare(self, db, kind: str, subject: str, where: str, args: tuple,
                 across_sites: bool) -> None:
        rows = db.execute(f"SELECT site, qualified_id, name, birth_date, sex, study_uid, "
                          f"sop_uid, hq_id FROM seen WHERE {where} ORDER BY first_seen",
                          args).fetchall()
        people = {(r["name"], r["birth_date"], r["sex"]) for r in rows}
        if len(people) < 2 or (across_sites and len({r["site"] for r in rows}) < 2):
            return
        variants, keys = [], set()
        for r in rows:  # one variant per site and demographics: the first instance showing it
            key = (r["site"], r["qualified_id"], r["name"], r["birth_date"], r["sex"])
            if key not in keys:
                keys.add(key)
                variants.append({"site": r["site"], "patient_id": r["qualified_id"],
                                 "PatientName": r["name"], "PatientBirthDate": r["birth_date"],
                                 "PatientSex": r["sex"], "study_uid": r["study_uid"],
                                 "sop_uid": r["sop_uid"], "hq_id": r["hq_id"]})
        self._entry(db, kind, subject, variants, key=lambda v: (
            v["site"], v["patient_id"], v["PatientName"], v["PatientBirthDate"],
            v["PatientSex"]))

    def _entry(self, db, kind: str, subject: str, variants: list[dict], key) -> None:
        """Open an entry, or add new variants to it (reopening it if it was resolved)."""
        now = time.time()
        found = db.execute("SELECT id, state, variants FROM entries WHERE kind = ? AND "
                           "subject = ?", (kind, subject)).fetchone()
        if found is None:
            db.execute("INSERT INTO entries (kind, subject, state, created, updated, variants) "
                       "VALUES (?, ?, 'open', ?, ?, ?)",
                       (kind, subject, now, now, json.dumps(variants)))
            return
        known = json.loads(found["variants"])
        have = {key(v) for v in known}
        added = [v for v in variants if key(v) not in have]
        if added:
            db.execute("UPDATE entries SET variants = ?, state = 'open', updated = ? "
                       "WHERE id = ?", (json.dumps(known + added), now, found["id"]))

    def note_same_uid(self, site: str, sop_uid: str, original_md5: str,
                      others: list[dict]) -> None:
        """This SOP Instance UID is also held from other sites (`others`: site, md5, hq_id)."""
        if not others:
            return
        same = [o for o in others if o["md5"] == original_md5]
        if same:
            self.audit("shared", site=site, sop_uid=sop_uid, md5=original_md5,
                       also_from=sorted({o["site"] for o in same}))
        if len(same) < len(others):
            self.audit("uid-across-sites", site=site, sop_uid=sop_uid, md5=original_md5,
                       others=[{"site": o["site"], "md5": o["md5"]} for o in others])
            versions = [*others, {"site": site, "md5": original_md5, "hq_id": None}]
            with self._transaction() as db:
                self._entry(db, "uid-across-sites", sop_uid, versions,
                            key=lambda v: (v["site"], v["md5"]))

    # --- revisions ---

    def revision_id(self, site: str, sop_uid: str, original_md5: str) -> str:
        digest = hashlib.sha256(f"{site}\0{sop_uid}\0{original_md5}".encode()).hexdigest()
        return f"rev-{digest[:32]}"

    def revision(self, revision_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM revisions WHERE id = ?", (revision_id,)).fetchone()
        return None if row is None else {**dict(row), "differing": json.loads(row["differing"])}

    def held_revision(self, site: str, sop_uid: str, original_md5: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT id FROM revisions WHERE site = ? AND sop_uid = ? AND "
                             "original_md5 = ?", (site, sop_uid, original_md5)).fetchone()
        return None if row is None else row["id"]

    def revision_path(self, revision_id: str) -> Path:
        return self.revisions_dir / revision_id[4:6] / f"{revision_id}.dcm"

    def keep_revision(self, site: str, sop_uid: str, original_md5: str, source: Path,
                      held: dict, differs: list[str]) -> str:
        """Keep `source` byte for byte as a revision; its ID once it is durable and read back.
        `held`: the version HQ already serves (hq_id, md5, site)."""
        revision_id = self.revision_id(site, sop_uid, original_md5)
        target = self.revision_path(revision_id)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_suffix(".tmp")
        written = hashlib.md5()
        with open(source, "rb") as src, open(tmp, "wb") as out:
            while block := src.read(codecs.BLOCK):
                written.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        for folder in (target.parent, target.parent.parent):
            durable.fsync_dir(folder)
        with open(target, "rb") as handle:
            if hashlib.file_digest(handle, "md5").hexdigest() != written.hexdigest():
                raise OSError(f"revision {revision_id} reads back different bytes")
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO revisions (id, site, sop_uid, original_md5, md5, "
                       "size, file, held, differing, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, "
                       "?, ?, ?)",
                       (revision_id, site, sop_uid, original_md5, written.hexdigest(),
                        target.stat().st_size, str(target.relative_to(self.hq_dir)),
                        json.dumps(held), json.dumps(differs), now))
            self._entry(db, "revision", f"{site}|{sop_uid}",
                        [{"site": held.get("site"), "md5": held.get("md5"),
                          "hq_id": held.get("hq_id"), "differing": []},
                         {"site": site, "md5": original_md5, "hq_id": revision_id,
                          "differing": differs}],
                        key=lambda v: (v["site"], v["md5"]))
        self.audit("revision", site=site, sop_uid=sop_uid, old_md5=held.get("md5"),
                   old_hq_id=held.get("hq_id"), new_md5=original_md5, revision=revision_id,
                   differing=differs)
        return revision_id

    # --- the reconciliation list ---

    @staticmethod
    def _public(row) -> dict:
        return {"id": row["id"], "kind": row["kind"], "subject": row["subject"],
                "state": row["state"], "created": row["created"], "updated": row["updated"],
                "variants": json.loads(row["variants"]),
                "resolutions": json.loads(row["resolutions"])}

    def entries(self, state: str | None = "open") -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM entries" + (" WHERE state = ?" if state else "")
                              + " ORDER BY id", (state,) if state else ()).fetchall()
        return [self._public(row) for row in rows]

    def entry(self, entry_id: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else self._public(row)

    def resolve(self, entry_id: int, decision: str, note: str, by: str) -> dict | None:
        """Record a person's decision; no image changes."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
        resolution = {"decision": decision, "note": note, "by": by, "at": time.time()}
        with self._transaction() as db:
            row = db.execute("SELECT resolutions FROM entries WHERE id = ?",
                             (entry_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE entries SET state = 'resolved', updated = ?, resolutions = ? "
                       "WHERE id = ?", (resolution["at"],
                                        json.dumps([*json.loads(row["resolutions"]),
                                                    resolution]), entry_id))
        self.audit("resolved", entry=entry_id, decision=decision, note=note, by=by)
        return self.entry(entry_id)
