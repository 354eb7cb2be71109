"""The GOTG RIS over its REST API (RIS_URL, RIS_API_KEY; the contract is `openapi.yaml` beside
this file): appointments in as orders, final reports in to be attached (`reports.py`), statuses
out from the outbox.

Appointments are read page by page from a cursor kept in the orders database, each checked and
kept on its own (one the worklist cannot hold is logged and skipped; the rest go on). Statuses
go out strictly in the order they happened: the first one the RIS cannot take now (unreachable,
a refused key, a server error) stops the round, to be sent again at the next; one the RIS
refuses for good (404, 409, 422) is recorded with the reason and the queue goes on, so a single
event can never block every later one. Nothing is ever dropped unsaid.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import requests

from . import demographics, reports, values, worklist
from .orders import Orders
from .reports import Report
from .values import Change, Order, Rejected

log = logging.getLogger(__name__)

# Items asked for at once: a report may carry a PDF of megabytes, and pacs-ris has 128 MB.
PAGES = {"appointments": 200, "reports": 5}
FOR_GOOD = (400, 404, 409, 410, 422)  # the RIS will never take it as it is: recorded, go on
ACTIONS = {"pending": "schedule", "cancelled": "cancel", "in_progress": "complete",
           "completed": "complete", "reported": "complete"}


class RisUnreachable(Exception):
    """The RIS cannot be asked now (network, its server, a refused key): try again later."""


class RisRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the RIS refused ({status}): {message}")
        self.status = status


class RisClient:
    def __init__(self, url: str, api_key: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            answer = self.session.request(method, self.url + path, timeout=self.timeout,
                                          **kwargs)
        except requests.RequestException as exc:
            raise RisUnreachable(f"RIS at {self.url}: {exc.__class__.__name__}") from exc
        if answer.status_code >= 500 or answer.status_code in (401, 403, 429):
            raise RisUnreachable(f"RIS at {self.url} answered {answer.status_code}")
        return answer

    def page(self, feed: str, since: str) -> tuple[list[dict], str, bool]:
        """One page of a feed (appointments, reports) from the cursor `since`: what it holds,
        where the next starts, whether one follows at once."""
        params = {"limit": PAGES[feed], **({"updated_since": since} if since else {})}
        answer = self._call("GET", f"/api/v1/{feed}", params=params)
        if answer.status_code != 200:
            raise RisRefused(answer.status_code, answer.text[:200])
        try:
            page = answer.json()
            found, following, more = page[feed], str(page["next"]), bool(page["more"])
            if not isinstance(found, list):
                raise TypeError(f"{feed} is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise RisUnreachable(f"RIS at {self.url} answered something else than the "
                                 f"contract ({exc})") from None
        return found, following, more

    def post_status(self, event: dict) -> None:
        answer = self._call("POST", f"/api/v1/appointments/{event['accession']}/status",
                            json={"event_id": event["event_id"], "status": event["status"],
                                  "at": datetime.fromtimestamp(event["at"], UTC).isoformat(),
                                  **({"study_instance_uid": event["study_uid"]}
                                     if event["study_uid"] else {}),
                                  **({"performed": json.loads(event["performed"])}
                                     if event.get("performed") else {})})
        if answer.status_code not in (200, 201, 204):
            raise RisRefused(answer.status_code, answer.text[:200])


# --- appointments in ------------------------------------------------------------------------

def _text(found: dict, key: str) -> str:
    value = found.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Rejected("not text", key)
    return value.strip()


def _when(value: str, where: str) -> tuple[str, str]:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"{value[:40]!r} is not an ISO 8601 date and time", where) from None
    if moment.tzinfo is not None:  # the modality's clock is the site's: local time
        moment = moment.astimezone()
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def change_of(found: object, site: str) -> Change:
    """One appointment as an order change; Rejected with the field at fault."""
    if not isinstance(found, dict):
        raise Rejected("an appointment is not an object")
    status = _text(found, "status")
    if status not in ACTIONS:
        raise Rejected(f"{status[:20]!r} is not a status of the contract", "status")
    patient, procedure = found.get("patient"), found.get("procedure") or {}
    referring = found.get("referring_physician") or {}
    if not isinstance(patient, dict) or not isinstance(procedure, dict) \
            or not isinstance(referring, dict):
        raise Rejected("patient, procedure and referring_physician are objects")
    accession = values.text(_text(found, "accession_number"), 16, "accession_number",
                            required=True)
    date, time = _when(_text(found, "scheduled_at"), "scheduled_at")
    requested = values.text(_text(found, "requested_procedure_id") or accession, 16,
                            "requested_procedure_id")
    description = values.text(_text(procedure, "description"), 64, "procedure.description")
    code = (values.text(_text(procedure, "code"), 16, "procedure.code"),
            values.text(_text(procedure, "scheme"), 16, "procedure.scheme"), description)
    order = Order(
        accession=accession,
        patient_id=values.text(_text(patient, "id"), 64, "patient.id", required=True),
        issuer=values.text(_text(patient, "issuer"), 64, "patient.issuer"),
        patient_name=values.person_name(
            tuple(_text(patient, key) for key in ("family_name", "given_name", "middle_name")),
            "patient.family_name", required=True),
        birth_date=values.date(_text(patient, "birth_date").replace("-", ""),
                               "patient.birth_date"),
        sex=values.sex(_text(patient, "sex")),
        modality=values.modality(_text(found, "modality"), "modality"),
        station_aet=values.ae_title(_text(found, "station_aet"), "station_aet"),
        scheduled_date=date, scheduled_time=time,
        study_uid=(values.dicom_uid(_text(found, "study_instance_uid"), "study_instance_uid")
                   or values.derived_study_uid(site, accession)),
        requested_procedure_id=requested,
        step_id=values.text(_text(found, "scheduled_step_id") or requested, 16,
                            "scheduled_step_id"),
        description=description,
        code=code if all(code[:2]) else ("", "", ""),
        referring=values.person_name(
            tuple(_text(referring, key) for key in ("family_name", "given_name")),
            "referring_physician"),
        placer=accession)
    return Change(ACTIONS[status], order)


def report_of(found: object) -> Report:
    """One report of the RIS's feed; Rejected with the field at fault."""
    if not isinstance(found, dict):
        raise Rejected("a report is not an object")
    author = found.get("author") or {}
    if not isinstance(author, dict):
        raise Rejected("author is an object", "author")
    text, pdf = found.get("text") or "", found.get("pdf") or ""
    if not isinstance(text, str) or not isinstance(pdf, str):
        raise Rejected("text and pdf are strings")
    return reports.report(
        accession=_text(found, "accession_number"), patient_id=_text(found, "patient_id"),
        status={"final": "final", "amended": "corrected"}.get(_text(found, "status"), "?"),
        text=reports.checked_text(text, "text"),
        author=values.person_name(tuple(_text(author, key) for key in ("family_name",
                                                                       "given_name")),
                                  "author"),
        signed=_when(_text(found, "signed_at"), "signed_at"), title=_text(found, "title"),
        pdf=reports.checked_pdf(pdf, "pdf") if pdf else b"")


class Ris:
    """Both directions: appointments in (`fetch`), statuses out (`deliver`)."""

    def __init__(self, client: RisClient, orders: Orders, worklists: Path, site: str,
                 take_orders: bool = True, feeds: bool = True) -> None:
        self.client = client  # or hl7_statuses.Hl7Statuses: statuses only (feeds False)
        self.feeds = feeds
        self.orders = orders
        self.worklists = worklists
        self.site = site
        self.take_orders = take_orders  # WORKLIST_SYNC
        self.no_reports_feed = False

    def fetch(self) -> int:
        """Appointments changed since the cursor, into the orders; how many were kept."""
        kept, more = 0, True
        patients = demographics.DemographicsQueue(self.orders)
        while more:
            since = self.orders.ris_cursor()
            found, following, more = self.client.page("appointments", since)
            if more and following == since:
                raise RisUnreachable("the RIS says more follow but moves its cursor nowhere")
            for appointment in found:
                try:
                    change = change_of(appointment, self.site)
                    edits = demographics.edits(self.orders, [change])
                    changed = self.orders.apply(
                        [change], "rest",
                        within=lambda db, e=edits: patients.insert(db, e, "rest"))
                except Rejected as exc:
                    accession = appointment.get("accession_number") \
                        if isinstance(appointment, dict) else None
                    log.warning("RIS appointment %r left off the worklist: %s",
                                str(accession)[:20], exc)
                    continue
                worklist.follow(self.worklists, self.orders, changed)
                kept += 1
            self.orders.set_ris_cursor(following)
        return kept

    def fetch_reports(self) -> int:
        """Final reports signed since the cursor, kept to be attached; how many were new. A
        RIS without the reports feed (404) is told once in the log, not retried as down."""
        queue, new, more = reports.ReportQueue(self.orders), 0, not self.no_reports_feed
        while more:
            since = self.orders.ris_cursor("reports")
            try:
                found, following, more = self.client.page("reports", since)
            except RisRefused as exc:
                if exc.status != 404:
                    raise
                if not self.no_reports_feed:
                    log.warning("the RIS offers no reports feed (/api/v1/reports answered "
                                "404): reports come by HL7 ORU^R01 only")
                self.no_reports_feed = True
                return new
            if more and following == since:
                raise RisUnreachable("the RIS says more follow but moves its cursor nowhere")
            kept = []
            for found_report in found:
                try:
                    kept.append(report_of(found_report))
                except Rejected as exc:
                    accession = found_report.get("accession_number") \
                        if isinstance(found_report, dict) else None
                    log.warning("RIS report for %r not kept: %s", str(accession)[:20], exc)
            new += queue.add(kept, "rest")
            self.orders.set_ris_cursor(following, "reports")
        return new

    def deliver(self) -> int:
        """The waiting statuses, in order, until one must wait; how many went."""
        sent = 0
        for event in self.orders.waiting_statuses():
            try:
                self.client.post_status(event)
            except RisRefused as exc:
                if exc.status not in FOR_GOOD:
                    self.orders.status_failed(event["seq"], str(exc))
                    return sent
                log.error("RIS refused %s for %s: %s (recorded; the queue goes on)",
                          event["status"], event["accession"], exc)
                self.orders.status_sent(event["seq"], refused=str(exc))
                continue
            except RisUnreachable as exc:
                self.orders.status_failed(event["seq"], str(exc))
                raise
            self.orders.status_sent(event["seq"])
            sent += 1
        return sent

async def follow(ris: Ris, every: float, deliver_every: float = 5.0) -> None:
    """Until cancelled: appointments every `every` seconds, waiting statuses every few
    (an exam's end reaches the RIS within seconds when it can be reached)."""
    loop = asyncio.get_running_loop()
    fetched = -every
    while True:
        try:
            if ris.feeds and loop.time() - fetched >= every:
                fetched = loop.time()
                if ris.take_orders:
                    await asyncio.to_thread(ris.fetch)
                await asyncio.to_thread(ris.fetch_reports)
            await asyncio.to_thread(ris.deliver)
        except (RisUnreachable, RisRefused) as exc:
            log.warning("RIS not reached (%s): statuses wait in order", exc)
            await asyncio.sleep(every)
            continue
        await asyncio.sleep(deliver_every)
