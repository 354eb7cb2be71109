"""Sending what the outbox owes HQ: ask first, pack, upload resumably, count only confirmations.

For each batch of ready instances (in the outbox's order): HQ is asked which it already holds
(SOP Instance UID and original MD5), and those are confirmed without a byte of image sent. Each
other instance is packed (the smallest verified lossless form), the payload kept on disk until
HQ confirms, and uploaded in chunks. The upload's address is durable in the outbox, so after a
disconnect, a kill -9 or a power cut the transfer resumes at HQ's offset: an outage costs at most
the chunk in flight. Nothing here ever deletes an image.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from . import codecs
from .outbox import Outbox
from .transport import HQClient, HQRefused, HQUnreachable

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


@dataclass
class Sent:
    confirmed: list[str] = field(default_factory=list)      # uploaded and confirmed
    already_held: list[str] = field(default_factory=list)   # confirmed by the question alone
    refused: list[str] = field(default_factory=list)        # HQ said no; retried later


class Sender:
    def __init__(self, settings: Settings, outbox: Outbox, clinic: Orthanc, hq: HQClient,
                 chunk: int = CHUNK) -> None:
        self.settings = settings
        self.outbox = outbox
        self.clinic = clinic
        self.hq = hq
        self.chunk = chunk
        self.payloads = settings.state_path / "sync" / "payloads"

    def _original_md5(self, instance_id: str) -> str:
        return self.clinic.request(
            "GET", f"/instances/{instance_id}/attachments/dicom/md5").text.strip()

    def _payload_path(self, instance_id: str) -> Path:
        return self.payloads / instance_id

    def _prepared(self, row, original_md5: str) -> tuple[str, bytes]:
        """The upload to continue, or a new one: (upload URL, payload)."""
        instance_id = row["orthanc_id"]
        upload = self.outbox.upload(instance_id)
        path = self._payload_path(instance_id)
        if upload and path.exists():
            payload = path.read_bytes()
            if hashlib.md5(payload).hexdigest() == upload["payload_md5"]:
                return upload["upload_url"], payload
        dicom = self.clinic.request("GET", f"/instances/{instance_id}/file").content
        packed = codecs.pack(dicom, self.settings.compression_level)
        if packed.original_md5 != original_md5:
            raise ValueError("the stored file no longer matches the MD5 Orthanc took at ingest "
                             "(disk damage?): not sent, left for the integrity check")
        self.payloads.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(packed.payload)
        url = self.hq.create(len(packed.payload), {
            "sop_uid": row["sop_uid"], "codec": packed.codec,
            "payload_md5": packed.payload_md5, "original_md5": packed.original_md5})
        self.outbox.start_upload(instance_id, url, packed.codec, packed.payload_md5,
                                 packed.original_md5)
        return url, packed.payload

    def _upload(self, row, original_md5: str) -> str | None:
        """HQ's instance ID once confirmed; None if the confirmation must be asked for again."""
        instance_id = row["orthanc_id"]
        url, payload = self._prepared(row, original_md5)
        offset = self.hq.offset(url)
        if offset is None:  # HQ no longer has it (finished, refused or expired): a new upload
            self._forget(instance_id)
            url, payload = self._prepared(row, original_md5)
            offset = 0
        while True:
            offset, confirmed = self.hq.append(url, offset, payload[offset:offset + self.chunk])
            if confirmed:
                return confirmed
            if offset >= len(payload):  # every byte in, the answer lost: holdings will tell
                return None

    def _forget(self, instance_id: str) -> None:
        self.outbox.forget_upload(instance_id)
        self._payload_path(instance_id).unlink(missing_ok=True)

    def _confirm(self, instance_id: str, hq_id: str) -> None:
        self.outbox.confirm(instance_id, hq_id)
        self._payload_path(instance_id).unlink(missing_ok=True)

    def send(self, limit: int = 50) -> Sent:
        """One batch. Raises HQUnreachable when the link fails (everything stays owed); any
        other trouble with one instance is logged and leaves it owed, the rest goes on."""
        report = Sent()
        rows, md5s = [], {}
        for row in self.outbox.ready(limit):
            try:
                md5s[row["orthanc_id"]] = self._original_md5(row["orthanc_id"])
                rows.append(row)
            except OrthancError as exc:
                if exc.status == 404:
                    log.error("%s was deleted here before HQ had it", row["sop_uid"])
                    self.outbox.gone(row["orthanc_id"])
                else:
                    raise
        if not rows:
            return report
        held = self.hq.holdings([{"sop_uid": row["sop_uid"],
                                  "original_md5": md5s[row["orthanc_id"]]} for row in rows])
        for row, hq_id in zip(rows, held, strict=True):
            instance_id = row["orthanc_id"]
            if hq_id:
                self._confirm(instance_id, hq_id)
                report.already_held.append(instance_id)
                continue
            try:
                hq_id = self._upload(row, md5s[instance_id])
            except HQUnreachable:
                raise
            except HQRefused as exc:
                log.error("HQ refused %s: %s", row["sop_uid"], exc)
                self._forget(instance_id)
                report.refused.append(instance_id)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the rest
                log.error("could not send %s: %s", row["sop_uid"], exc)
                report.refused.append(instance_id)
                continue
            if hq_id:
                self._confirm(instance_id, hq_id)
                report.confirmed.append(instance_id)
        if report.confirmed or report.already_held:
            log.info("%d sent and confirmed, %d already at HQ, %d refused",
                     len(report.confirmed), len(report.already_held), len(report.refused))
        return report
