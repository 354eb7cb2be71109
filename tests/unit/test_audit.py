"""The audit trail: what is recorded, views counted once a while, and a chain that shows any
line edited, removed or cut."""

from __future__ import annotations

import json
import multiprocessing

from gotg_pacs import audit
from gotg_pacs.audit import AuditLog, action_of


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_requests_are_named_by_what_they_do_to_which_resource():
    assert action_of("GET", "/orthanc/studies/abc/archive") == ("view", "studies", "abc")
    assert action_of("POST", "/orthanc/studies/abc/archive") == ("export", "studies", "abc")
    assert action_of("DELETE", "/orthanc/instances/x") == ("delete", "instances", "x")
    assert action_of("PUT", "/orthanc/series/s/metadata/1") == ("modify", "series", "s")
    assert action_of("GET", "/dicom-web/studies/1.2.3/series") == ("view", "studies", "1.2.3")
    assert action_of("POST", "/dicom-web/studies") == ("import", "instances", "")
    assert action_of("GET", "/orthanc/system") is None


def test_a_view_is_recorded_once_per_window_and_everything_else_every_time(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", clock=clock)
    assert log.record("view", "amina", "10.0.0.5", kind="studies", resource="s1")
    assert not log.record("view", "amina", "10.0.0.5", kind="studies", resource="s1")
    assert log.record("view", "amina", "10.0.0.5", kind="studies", resource="s2")
    assert log.record("view", "omar", "10.0.0.6", kind="studies", resource="s1")
    assert log.record("export", "amina", "10.0.0.5", kind="studies", resource="s1")
    assert log.record("export", "amina", "10.0.0.5", kind="studies", resource="s1")
    clock.now += audit.VIEW_WINDOW
    assert log.record("view", "amina", "10.0.0.5", kind="studies", resource="s1")
    events, end = audit.read(tmp_path / "audit.jsonl")
    assert [e["action"] for e in events] == [audit.TRAIL_START, "view", "view", "view", "export",
                                             "export", "view"]
    assert end == (tmp_path / "audit.jsonl").stat().st_size
    assert audit.verify(events) == []


def test_an_edited_removed_or_cut_line_breaks_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for number in range(4):
        log.record("delete", "admin", "10.0.0.1", kind="studies", resource=f"s{number}")
    lines = path.read_text().splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["user"] = "someone-else"
    path.write_text("".join(lines[:2]) + json.dumps(edited, sort_keys=True) + "\n"
                    + "".join(lines[3:]))
    assert audit.verify(audit.read(path)[0]) == ["event 3 was altered"]
    path.write_text("".join(lines[:2]) + "".join(lines[3:]))
    assert audit.verify(audit.read(path)[0]) == ["events are missing before event 3"]
    # A power cut mid-line: the next event starts on a line of its own, the cut is reported.
    path.write_text("".join(lines) + lines[0][:40])
    AuditLog(path).record("login", "admin", "10.0.0.1")
    events = audit.read(path)[0]
    assert events[-1]["action"] == "login" and events[-2]["action"] == "unreadable-line"
    assert audit.verify(events) == ["event 6 is unreadable (cut short by a power cut?)"]


def test_two_processes_writing_one_log_keep_one_chain(tmp_path):
    """The web service and a restore run by hand both record: each chains to the event the
    file ends with, not to the last one it wrote itself."""
    path = tmp_path / "audit.jsonl"
    web, restore = AuditLog(path), AuditLog(path)
    web.record("login", "amina", "10.0.0.5")
    restore.record("restore", "root", "console", archive="field-7-2026")
    web.record("view", "amina", "10.0.0.5", kind="studies", resource="s1")
    events = audit.read(path)[0]
    assert [e["action"] for e in events] == [audit.TRAIL_START, "login", "restore", "view"]
    assert audit.verify(events) == []
    assert audit.trail_of(path) == events[0]["trail"]
    # At the same time, from separate processes: they take turns.
    writers = [multiprocessing.get_context("fork").Process(target=_record_many,
                                                           args=(path, name))
               for name in ("web", "restore", "third")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    events = audit.read(path)[0]
    assert len(events) == 4 + 3 * 200 and audit.verify(events) == []


def _record_many(path, name: str) -> None:
    log = AuditLog(path)
    for number in range(200):
        log.record("export", name, "x", kind="studies", resource=str(number))


def test_an_offset_past_the_end_reads_nothing(tmp_path):
    """An admin's `GET /api/audit?since=` past the end (2**62: beyond what a file may seek to)
    answered 500 once."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record("login", "amina", "x")
    for offset in (path.stat().st_size, 2**62, 2**63 - 1):
        assert audit.read(path, offset) == ([], offset)


def test_a_log_whose_first_line_a_power_cut_spoilt_still_names_a_trail_and_ships(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"action": "trail-st\n')
    AuditLog(path).record("login", "amina", "x")
    trail = audit.trail_of(path)
    assert trail and audit.TRAIL_ID.fullmatch(trail)
    hq = FakeHQ()
    assert audit.ship(path, hq) == 2  # the unreadable line, then the login
    assert [e["action"] for e in hq.events[trail]] == ["unreadable-line", "login"]


class FakeHQ:
    """HQ's side of the exchange as hq/audit.py answers it: a copy per trail, 409 with what it
    holds on a gap."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.events: dict[str, list[dict]] = {}

    def ship_audit(self, trail: str, start: int, end: int,
                   events: list[dict]) -> tuple[int, bool]:
        if start != self.held.get(trail, 0):
            return self.held.get(trail, 0), False
        self.events.setdefault(trail, []).extend(events)
        self.held[trail] = end
        return end, True


def test_shipping_sends_each_event_once_in_order_and_resumes_where_hq_is(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for number in range(7):
        log.record("export", "amina", "x", kind="studies", resource=f"s{number}")
    hq = FakeHQ()
    assert audit.ship(path, hq, batch=5) == 5
    assert audit.ship(path, hq, batch=5) == 3
    assert audit.ship(path, hq, batch=5) == 0
    [trail] = hq.events
    assert trail == audit.trail_of(path)
    assert [e.get("resource") for e in hq.events[trail]] == [None] + [f"s{n}" for n in range(7)]
    # The site's marker lost (a restored box): HQ says where it is, nothing goes twice.
    audit.shipped_file(path).unlink()
    assert audit.ship(path, hq) == 0
    log.record("login", "amina", "x")
    assert audit.ship(path, hq) == 1 and len(hq.events[trail]) == 9
    assert audit.verify(hq.events[trail]) == []


def test_a_log_begun_again_is_a_new_trail_and_a_restored_one_is_shipped_beside_it(tmp_path):
    """A box rebuilt for the same site must not write into the old box's trail at HQ (the
    offsets would collide and events be skipped), and what the old box recorded but never
    sent, restored from its backup, still reaches HQ."""
    path = tmp_path / "audit.jsonl"
    old = AuditLog(path)
    for number in range(3):
        old.record("view", "amina", "x", kind="studies", resource=f"s{number}")
    hq = FakeHQ()
    assert audit.ship(path, hq, batch=2) == 2
    first = audit.trail_of(path)
    backup = tmp_path / "from-backup.jsonl"
    backup.write_bytes(path.read_bytes())

    path.unlink()  # the box is lost; the new one begins its own log
    audit.shipped_file(path).unlink()
    new = AuditLog(path)
    new.record("login", "admin", "y")
    second = audit.trail_of(path)
    assert second and second != first
    assert audit.keep_earlier(path, backup) == first
    assert audit.keep_earlier(path, path) is None, "the log written now is not an earlier one"
    assert audit.ship(path, hq) == 2 + 2  # the old trail's last two, the new trail's two
    assert [e.get("resource") for e in hq.events[first]] == [None, "s0", "s1", "s2"]
    assert [e["action"] for e in hq.events[second]] == [audit.TRAIL_START, "login"]
    assert audit.verify(hq.events[first]) == [] and audit.verify(hq.events[second]) == []
    assert audit.ship(path, hq) == 0

    # HQ holds more of the old trail than an older backup does: nothing of it is sent again.
    older = tmp_path / "older.jsonl"
    older.write_bytes(backup.read_bytes()[:backup.read_bytes().index(b"\n", 300) + 1])
    (audit.earlier_folder(path) / f"{first}.jsonl").unlink()
    audit.shipped_file(audit.earlier_folder(path) / f"{first}.jsonl").unlink()
    assert audit.keep_earlier(path, older) == first
    assert audit.ship(path, hq) == 0 and audit.ship(path, hq) == 0
    assert len(hq.events[first]) == 4
