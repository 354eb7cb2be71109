"""A reference RIS speaking the bridge's contract (services/gotg_pacs/ris/openapi.yaml): the
GOTG RIS itself is not shipped here, so the tests stand one up behind the same interface.

It keeps appointments with a change number each (`updated_since` is the last one seen), records
every status event once by its `event_id`, answers 404 for an accession it does not know, 401
for another key, and can be taken down and brought back on the same port (the site's link to
the RIS going away for a while).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from flask import Flask, abort, jsonify, request
from werkzeug.serving import make_server

from tests.support.site import free_port


class ReferenceRis:
    def __init__(self, api_key: str = "ris-key-for-tests") -> None:
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.appointments: dict[str, dict] = {}
        self.changes: list[tuple[int, str]] = []  # (change number, accession)
        self.reports: list[dict] = []            # signed reports, in order (`next`: a count)
        self.events: list[dict] = []             # as received, each event_id once
        self.posts = 0                            # every POST, repeats included
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.app = self._make_app()

    def _make_app(self) -> Flask:
        app = Flask("reference_ris")

        @app.before_request
        def key() -> None:
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                abort(401)

        @app.get("/api/v1/appointments")
        def appointments():
            since = int(request.args.get("updated_since") or 0)
            limit = min(int(request.args.get("limit", 200)), 500)
            with self._lock:
                after = [(seq, acc) for seq, acc in self.changes if seq > since]
                page = after[:limit]
                found = [self.appointments[acc] for _, acc in page]
                following = str(page[-1][0]) if page else str(since)
            return jsonify({"appointments": found, "next": following,
                            "more": len(after) > limit})

        @app.get("/api/v1/reports")
        def reports():
            since = int(request.args.get("updated_since") or 0)
            limit = min(int(request.args.get("limit", 200)), 500)
            with self._lock:
                page = self.reports[since:since + limit]
                more = len(self.reports) > since + limit
            return jsonify({"reports": page, "next": str(since + len(page)), "more": more})

        @app.post("/api/v1/appointments/<accession>/status")
        def status(accession: str):
            event = request.get_json()
            with self._lock:
                self.posts += 1
                if accession not in self.appointments:
                    abort(404)
                if event["event_id"] not in {e["event_id"] for e in self.events}:
                    self.events.append({"accession": accession, **event})
            return "", 204

        return app

    def schedule(self, accession: str, status: str = "pending", **fields) -> None:
        """Add or change an appointment, as RIS staff do."""
        appointment = {
            "accession_number": accession, "status": status,
            "scheduled_at": datetime(2026, 11, 27, 11, 0, tzinfo=UTC).isoformat(),
            "modality": "CR", "procedure": {"code": "CXR", "scheme": "LOCAL",
                                            "description": "Chest X-ray"},
            "patient": {"id": "PAT-REST", "issuer": "GOTG", "family_name": "Doe",
                        "given_name": "John", "birth_date": "1975-06-30", "sex": "M"},
            "referring_physician": {"family_name": "House", "given_name": "Greg"}}
        appointment.update(fields)
        with self._lock:
            self.appointments[accession] = appointment
            self.changes.append((len(self.changes) + 1, accession))

    def sign(self, accession: str, text: str, status: str = "final", **fields) -> None:
        """A radiologist signs a report, as the RIS's reporting screen does."""
        found = {"accession_number": accession, "status": status, "text": text,
                 "signed_at": datetime(2026, 11, 27, 14, 5, tzinfo=UTC).isoformat(),
                 "author": {"family_name": "Quinn", "given_name": "Ada"},
                 "patient_id": "PAT-REST"}
        found.update(fields)
        with self._lock:
            self.reports.append(found)

    def up(self) -> ReferenceRis:
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None
