"""The clinic's record of what HQ sends it.

Why it matters: an item stored here but not yet acknowledged must stay owed an acknowledgement
whatever HQ lists; content HQ replaced under a reused number starts over; failures pause.
"""

from __future__ import annotations

import pytest

from gotg_pacs.sync.inbound import Inbox, partial_path


def listed(seq: int, md5: str = "a" * 32, **extra) -> dict:
    return {"seq": seq, "sop_uid": f"1.2.{seq}", "study_uid": "1.2", "size": 10, "md5": md5,
            "urgent": 0, **extra}


def states(inbox: Inbox) -> dict[int, str]:
    return {row["seq"]: row["state"] for row in inbox.items(100)}


def test_listing_keeps_progress_and_withdraws_what_hq_dropped(tmp_path):
    inbox = Inbox(tmp_path / "inbound.sqlite")
    inbox.listed([listed(1), listed(2), listed(3)], complete=True)
    inbox.stored(1, "c1")
    inbox.listed([listed(1), listed(2)], complete=True)
    assert states(inbox) == {1: "stored", 2: "waiting", 3: "withdrawn"}
    inbox.delivered(1)
    inbox.listed([listed(1), listed(2, md5="b" * 32)], complete=True)
    assert states(inbox) == {1: "waiting", 2: "waiting", 3: "withdrawn"}, \
        "listed again: HQ still waits for it (its --again, or it lost our word)"
    assert inbox.is_waiting(2, "b" * 32) and not inbox.is_waiting(2, "a" * 32)


def test_urgent_first_and_failures_pause(tmp_path):
    inbox = Inbox(tmp_path / "inbound.sqlite")
    inbox.listed([listed(1), listed(2, urgent=1)], complete=True)
    assert [row["seq"] for row in inbox.work()] == [2, 1]
    assert inbox.failed(2, "damaged", now=1000.0) == 60.0
    assert inbox.failed(2, "damaged", now=1000.0) == 240.0
    assert [row["seq"] for row in inbox.work(now=1100.0)] == [1]
    assert [row["seq"] for row in inbox.work(now=1300.0)] == [2, 1]
    summary = inbox.summary()
    assert summary["instances"]["waiting"] == {"instances": 2, "bytes": 20}
    assert summary["last_poll_age_s"] is not None


def test_hq_words_never_make_a_path_outside_the_inbound_folder(tmp_path):
    assert partial_path(tmp_path, 7, "a" * 32) == tmp_path / f"7-{'a' * 32}.part"
    for bad in ("../../etc/passwd", "A" * 32, "a" * 31 + "/"):
        with pytest.raises(ValueError):
            partial_path(tmp_path, 7, bad)
