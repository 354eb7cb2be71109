"""HQ's queue of what goes back to sites, and its routes, over a stand-in for HQ's Orthanc.

Why it matters: a range must be exactly the bytes asked for (a resumed download is appended to
what the clinic has), a site must never see another's queue, and only the site's word that it
holds exactly HQ's content may mark an instance delivered.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from flask import Flask, abort, g, request

from gotg_pacs.hq.outbound import Outbound, register

PAYLOAD = os.urandom(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class FakeOrthanc:
    """HQ's Orthanc as the routes use it: the whole file, in blocks, never a range."""

    class Streamed:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def iter_content(self, size: int):
            for start in range(0, len(self.data), size):
                yield self.data[start:start + size]

        def __enter__(self):
            return self

        def __exit__(self, *_exc) -> None:
            pass

    def __init__(self) -> None:
        self.reads = 0
        self.data = PAYLOAD

    def request(self, method: str, path: str, **kwargs):
        assert (method, path) == ("GET", "/instances/hq-1/file")
        self.reads += 1
        return self.Streamed(self.data)


def item(**overrides) -> dict:
    return {"hq_id": "hq-1", "sop_uid": "1.2.3", "study_uid": "1.2", "size": len(PAYLOAD),
            "md5": MD5, **overrides}


@pytest.fixture
def app(tmp_path):
    app = Flask("test")

    @app.before_request
    def site() -> None:
        g.site = {"Bearer a": "site-a", "Bearer b": "site-b"}.get(
            request.headers.get("Authorization")) or abort(401)

    app.orthanc = FakeOrthanc()
    app.outbound = register(app, app.orthanc, tmp_path / "outbound.sqlite")
    app.staging = tmp_path / "outbound"
    return app


def test_queue_once_requeue_only_on_purpose(tmp_path):
    queue = Outbound(tmp_path / "o.sqlite")
    assert queue.queue("site-a", [item()])["queued"] == 1
    assert queue.queue("site-a", [item()])["waiting"] == 1
    [waiting] = queue.waiting("site-a")
    assert queue.waiting("site-b") == []
    queue.delivered("site-a", waiting["seq"], "clinic-1")
    assert queue.waiting("site-a") == []
    assert queue.queue("site-a", [item()])["delivered"] == 1
    assert queue.queue("site-a", [item()], again=True)["requeued"] == 1
    assert [row["seq"] for row in queue.waiting("site-a")] == [waiting["seq"]]
    assert queue.sent_to("site-a", "hq-1", MD5)
    assert not queue.sent_to("site-b", "hq-1", MD5)
    assert not queue.sent_to("site-a", "hq-1", "0" * 32)


def test_ranges_are_exact_and_counted(app):
    app.outbound.queue("site-a", [item()])
    client = app.test_client()
    seq = client.get("/api/v1/outbound", headers={"Authorization": "Bearer a"}).json[
        "items"][0]["seq"]
    url = f"/api/v1/outbound/{seq}/file"
    whole = client.get(url, headers={"Authorization": "Bearer a"})
    assert whole.status_code == 200 and whole.data == PAYLOAD
    assert whole.headers["Gotg-Md5"] == MD5
    for first, last in ((0, 0), (65535, 65536), (100_000, 299_999), (250_000, 10**9)):
        part = client.get(url, headers={"Authorization": "Bearer a",
                                        "Range": f"bytes={first}-{last}"})
        assert part.status_code == 206
        assert part.data == PAYLOAD[first:last + 1]
        assert int(part.headers["Content-Length"]) == len(part.data)
        assert part.headers["Content-Range"] == \
            f"bytes {first}-{min(last, len(PAYLOAD) - 1)}/{len(PAYLOAD)}"
    tail = client.get(url, headers={"Authorization": "Bearer a", "Range": "bytes=250000-"})
    assert tail.data == PAYLOAD[250_000:]
    beyond = client.get(url, headers={"Authorization": "Bearer a",
                                      "Range": f"bytes={len(PAYLOAD)}-"})
    assert beyond.status_code == 416
    [row] = app.outbound.listing()
    assert row["served"] == len(PAYLOAD) + 1 + 2 + 200_000 + 50_000 + 50_000
    assert app.orthanc.reads == 1, "copied out of HQ's Orthanc once, ranges served from it"
    client.post(f"/api/v1/outbound/{seq}/ack", json={"md5": MD5},
                headers={"Authorization": "Bearer a"})
    assert not list(app.staging.glob("*")), "the copy goes once the site has it"


def test_hq_content_that_changed_since_it_was_queued_is_never_served(app):
    app.outbound.queue("site-a", [item()])
    app.orthanc.data = PAYLOAD[:-1] + b"x"
    seq = app.outbound.listing()[0]["seq"]
    answer = app.test_client().get(f"/api/v1/outbound/{seq}/file",
                                   headers={"Authorization": "Bearer a"})
    assert answer.status_code == 410
    assert not list(app.staging.glob("*"))


def test_a_site_sees_and_acknowledges_only_its_own(app):
    app.outbound.queue("site-a", [item()])
    client = app.test_client()
    seq = app.outbound.listing()[0]["seq"]
    assert client.get("/api/v1/outbound", headers={"Authorization": "Bearer b"}).json == \
        {"items": [], "more": False}
    assert client.get(f"/api/v1/outbound/{seq}/file",
                      headers={"Authorization": "Bearer b"}).status_code == 404
    assert client.post(f"/api/v1/outbound/{seq}/ack", json={"md5": MD5},
                       headers={"Authorization": "Bearer b"}).status_code == 404
    assert client.post(f"/api/v1/outbound/{seq}/ack", json={"md5": "0" * 32},
                       headers={"Authorization": "Bearer a"}).status_code == 409
    assert not app.outbound.listing()[0]["delivered_at"]
    first = client.post(f"/api/v1/outbound/{seq}/ack", json={"md5": MD5, "clinic_id": "c1"},
                        headers={"Authorization": "Bearer a"})
    again = client.post(f"/api/v1/outbound/{seq}/ack", json={"md5": MD5, "clinic_id": "c1"},
                        headers={"Authorization": "Bearer a"})
    assert first.status_code == again.status_code == 200
    assert first.json["delivered_at"] == again.json["delivered_at"]


def test_paging_after_a_cursor(app):
    app.outbound.queue("site-a", [item(hq_id=f"hq-{n}") for n in range(5)])
    client = app.test_client()
    page = client.get("/api/v1/outbound?after=0&limit=2",
                      headers={"Authorization": "Bearer a"}).json
    assert len(page["items"]) == 2 and page["more"]
    rest = client.get(f"/api/v1/outbound?after={page['items'][-1]['seq']}&limit=10",
                      headers={"Authorization": "Bearer a"}).json
    assert len(rest["items"]) == 3 and not rest["more"]
