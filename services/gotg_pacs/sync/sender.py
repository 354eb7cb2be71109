"""Sending what the outbox owes HQ: ask first, pack ahead, upload resumably, count confirmations.

For each batch of ready instances (in the outbox's order): HQ is asked which it already holds
(SOP Instance UID and original MD5), and those are confirmed without a byte of image sent. Each
other instance is packed (the smallest verified lossless form) into a payload file, by a packer
thread working a few instances ahead so the link never waits for the CPU, and uploaded in chunks
sized to the link. The upload's address is durable in the outbox and the payload stays on disk
until HQ confirms, so after a disconnect, a kill -9 or a power cut the transfer resumes at HQ's
offset: an outage costs at most the chunk in flight. Nothing here ever deletes an image.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import sqlite3
import tarfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import durable
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from . import codecs
from .outbox import Outbox
from .transport import HQClient, HQRefused, HQUnreachable

log = logging.getLogger(__name__)

LOOKAHEAD = 3  # instances packed ahead of the one being sent
PARALLEL = 3   # uploads in flight at once on an excellent link
PREVIEW_GAIN = 3  # a preview is sent only if the lossless payload is at least 3x its size
SMALL_MIN = 64 * 1024  # payloads up to this (or a quarter chunk) travel in batches
BATCH_MEMBERS = 100
# Above this rate the CPU, not the link, would bound the slower codecs (JPEG XL, JPEG 2000):
# here (2 x86 cores) JPEG XL packs a CR at ~6 MB/s of original, ~6 Mbit/s of payload, and a
# Pi 4's cores are several times slower. Faster links get zstd and JPEG-LS only.
FAST_CODECS_ABOVE_MBPS = 2.0


class DamagedHere(Exception):
    """The stored file no longer matches the MD5 Orthanc took at ingest."""


class PayloadLost(Exception):
    """A payload on disk is not whole: packed again on the next turn, nobody is refused."""


class LocalTrouble(Exception):
    """This box cannot pack right now (disk full, say): the turn ends, no instance is blamed."""


class SenderBusy(Exception):
    """Another sender (the pacs-sync service, or `pacs sync now`) works from this site."""


@dataclass(frozen=True)
class Payload:
    """One packed instance on disk, as it travels."""

    path: Path
    codec: str
    size: int
    original_md5: str
    payload_md5: str
    sop_uid: str = ""  # set for previews, which are no instance of the outbox


@dataclass
class Sent:
    confirmed: list[str] = field(default_factory=list)      # uploaded and confirmed
    already_held: list[str] = field(default_factory=list)   # confirmed by the question alone
    refused: list[str] = field(default_factory=list)        # HQ said no; retried later


class Packer:
    """Packs instances into payload files, on its own thread and Orthanc connection.

    A payload and its `.json` sidecar are written under temporary names and renamed, so one
    found on disk after a crash is whole and is reused rather than packed again.
    """

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One sender per site: two packers writing the same payload names would corrupt them.
        self._lock = open(self.directory / ".lock", "w")  # noqa: SIM115 - held while alive
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SenderBusy("another sender is at work here (the pacs-sync service sends "
                             "everything itself; see `pacs sync status`)") from None
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packer")

    def tidy(self, keep) -> None:
        """Remove what no owed instance needs: payloads of instances since settled, and the
        scratch files of a run that died (`keep(instance_id)` says which are still owed)."""
        for path in self.directory.iterdir():
            if path.name == ".lock":
                continue
            stem, _, suffix = path.name.partition(".")
            if suffix in ("dcm", "tmp", "json.tmp") or not keep(stem):
                path.unlink(missing_ok=True)

    def _clinic(self) -> Orthanc:
        if not hasattr(self._local, "clinic"):
            self._local.clinic = Orthanc.from_settings(self.settings, timeout=120)
        return self._local.clinic

    def path(self, instance_id: str) -> Path:
        return self.directory / instance_id

    def submit(self, instance_id: str, original_md5: str, level: int) -> Future:
        return self._pool.submit(self.pack, instance_id, original_md5, level)

    def existing(self, instance_id: str, original_md5: str) -> Payload | None:
        """A payload packed before (by a run that died, say), if it is whole and current."""
        path = self.path(instance_id)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            size = path.stat().st_size
        except (FileNotFoundError, ValueError):
            return None
        if meta.get("original_md5") != original_md5 or meta.get("size") != size:
            return None  # the clinic's instance changed, or a power cut cut the file: again
        return Payload(path, meta["codec"], size, meta["original_md5"], meta["payload_md5"])

    def _fetch(self, instance_id: str) -> Path:
        """The instance's file from Orthanc into the work folder, streamed (never in memory)."""
        original = self.path(instance_id).with_suffix(".dcm")
        with self._clinic().request("GET", f"/instances/{instance_id}/file",
                                    stream=True) as response, open(original, "wb") as out:
            for block in response.iter_content(codecs.BLOCK):
                out.write(block)
        return original

    def pack(self, instance_id: str, original_md5: str, level: int,
             original: Path | None = None) -> Payload:
        """The instance's payload file, packed once. `original` is its file when the caller
        fetched it already (and keeps it); otherwise it is fetched here and removed after."""
        if found := self.existing(instance_id, original_md5):
            return found
        path = self.path(instance_id)
        source = original or self._fetch(instance_id)
        try:
            tmp = path.with_suffix(".tmp")
            if source.stat().st_size <= codecs.MAX_TRANSCODE_BYTES:
                packed = codecs.pack(source.read_bytes(), level)
                durable.write_bytes(tmp, packed.payload)
                codec, md5, payload_md5 = packed.codec, packed.original_md5, packed.payload_md5
            else:
                with open(source, "rb") as raw, open(tmp, "wb") as out:
                    codec, md5, payload_md5 = codecs.pack_stream(raw, out, level)
                    out.flush()
                    os.fsync(out.fileno())
        finally:
            if original is None:
                source.unlink(missing_ok=True)
        if md5 != original_md5:
            tmp.unlink(missing_ok=True)
            raise DamagedHere("the stored file no longer matches the MD5 Orthanc took at "
                              "ingest (disk damage?): not sent, left for the integrity check")
        # Payload, then its sidecar, each on disk before it is named: after a power cut a
        # sidecar never describes a payload that is not whole (and the size is checked too).
        os.replace(tmp, path)
        size = path.stat().st_size
        meta = {"codec": codec, "original_md5": md5, "payload_md5": payload_md5, "size": size}
        durable.write_bytes(path.with_suffix(".json.tmp"), json.dumps(meta).encode())
        os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
        durable.fsync_dir(self.directory)
        return Payload(path, codec, size, md5, payload_md5)

    def preview_of(self, instance_id: str, original_md5: str, level: int) -> Payload | None:
        """A lossy preview of the instance as a payload file (`preview.make_preview`), or None
        where the policy allows none or where it would not save much: a preview is worth its
        bytes only at a third of the lossless payload or less (a CR that JPEG-LS already
        shrinks 7x gains little from a 10:1 preview). Deterministic: made again, it is the
        same instance. The lossless payload made for the comparison is kept for sending; both
        come from one fetch of the file. Instances too large to transcode get no preview."""
        from . import preview

        original = self._fetch(instance_id)
        try:
            lossless = self.pack(instance_id, original_md5, level, original)
            if original.stat().st_size > codecs.MAX_TRANSCODE_BYTES:
                return None
            made = preview.make_preview(original.read_bytes())
        finally:
            original.unlink(missing_ok=True)
        if made is None or len(made.payload) * PREVIEW_GAIN > lossless.size:
            return None
        path = self.directory / f"preview-{instance_id}"
        durable.write_bytes(path, made.payload)
        md5 = hashlib.md5(made.payload).hexdigest()
        return Payload(path, "identity", len(made.payload), md5, md5, made.sop_uid)

    def submit_preview(self, instance_id: str, original_md5: str, level: int) -> Future:
        return self._pool.submit(self.preview_of, instance_id, original_md5, level)

    def discard(self, instance_id: str) -> None:
        path = self.path(instance_id)
        for leftover in (path, path.with_suffix(".json"), path.with_suffix(".tmp"),
                         path.with_suffix(".dcm")):
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._lock.close()


class Sender:
    def __init__(self, settings: Settings, outbox: Outbox, clinic: Orthanc, hq: HQClient,
                 chunk: int | None = None) -> None:
        """`chunk` fixes the chunk size (tests); by default it follows the link estimate."""
        self.settings = settings
        self.outbox = outbox
        self.clinic = clinic
        self.hq = hq
        self.fixed_chunk = chunk
        self.older_hq = False  # HQ refused a codec as unknown: pack as every receiver knows
        self.packer = Packer(settings, settings.state_path / "sync" / "payloads")
        self._uploads = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="upload")
        self._worker = threading.local()
        self._worker_outboxes: list[Outbox] = []
        self.packer.tidy(outbox.is_pending)

    def close(self) -> None:
        self._uploads.shutdown(wait=True, cancel_futures=True)
        for outbox in self._worker_outboxes:
            outbox.close()
        self.packer.close()

    def _upload_in_worker(self, row, payload: Payload) -> str | None:
        """`_upload` on a worker thread, with that thread's own HQ session and outbox."""
        local = self._worker
        if not hasattr(local, "hq"):
            local.hq, local.outbox = self.hq.clone(), Outbox(self.outbox.path)
            self._worker_outboxes.append(local.outbox)
        return self._upload(row, payload, local.hq, local.outbox)

    def _drain(self, uploading: deque, report: Sent) -> HQUnreachable | None:
        """Settle every upload still in flight; the first outage met, if any."""
        unreachable = None
        while uploading:
            try:
                self._settle(*uploading.popleft(), report)
            except HQUnreachable as exc:
                unreachable = unreachable or exc
        return unreachable

    def _settle(self, row, payload: Payload, future: Future, report: Sent) -> None:
        """The end of a parallel upload, recorded on the main thread."""
        self._record(row, payload, future.result, report)

    def _send_one(self, row, payload: Payload, report: Sent) -> None:
        self._record(row, payload, lambda: self._upload(row, payload), report)

    def _record(self, row, payload: Payload, upload, report: Sent) -> None:
        """Run (or collect) one upload and record how it ended: confirmed, refused (pauses),
        or lost on disk (packed again); an outage propagates, the instance stays owed."""
        try:
            hq_id = upload()
        except HQUnreachable:
            raise
        except PayloadLost as exc:
            log.warning("%s", exc)
            return
        except HQRefused as exc:
            self._refuse(row, str(exc), report)
            return
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the rest
            self._refuse(row, f"{exc.__class__.__name__}: {exc}", report)
            return
        if hq_id:
            self._confirm(row["orthanc_id"], hq_id, payload.original_md5)
            report.confirmed.append(row["orthanc_id"])

    @property
    def chunk(self) -> int:
        return self.fixed_chunk or self.hq.link.chunk_size()

    @property
    def level(self) -> int:
        """COMPRESSION_LEVEL, but level 3 at most (zstd at its level 3, JPEG-LS) on a link
        faster than FAST_CODECS_ABOVE_MBPS, as measured or, before any measurement, as capped
        by MAX_BANDWIDTH_MBPS: there the CPU would be the bottleneck, for a few percent of
        bytes. Level 3 too for an HQ that refused a codec as unknown (an older receiver)."""
        level, rate = self.settings.compression_level, self.hq.link.rate_bps
        fast = self.older_hq or (rate is not None and rate > FAST_CODECS_ABOVE_MBPS * 1e6)
        return min(level, 3) if fast else level

    def _original_md5(self, instance_id: str) -> str:
        return self.clinic.request(
            "GET", f"/instances/{instance_id}/attachments/dicom/md5").text.strip()

    def _upload(self, row, payload: Payload, hq: HQClient | None = None,
                outbox: Outbox | None = None) -> str | None:
        """HQ's instance ID once confirmed; None if the confirmation must be asked for again.
        `hq` and `outbox`: a worker thread's own connections (parallel uploads)."""
        hq, outbox = hq or self.hq, outbox or self.outbox
        instance_id = row["orthanc_id"]
        upload = outbox.upload(instance_id)
        url, offset = None, 0
        if upload and upload["payload_md5"] == payload.payload_md5:
            state = hq.offset(upload["upload_url"])
            if state is not None:
                url, (offset, confirmed) = upload["upload_url"], state
                if confirmed:  # it finished at HQ; only the answer was lost
                    return confirmed
        if url is None:  # new, or HQ no longer knows it (expired or refused): start over
            url = hq.create(payload.size, {
                "sop_uid": row["sop_uid"], "codec": payload.codec,
                "payload_md5": payload.payload_md5, "original_md5": payload.original_md5})
            outbox.start_upload(instance_id, url, payload.codec, payload.payload_md5,
                                     payload.original_md5)
        with open(payload.path, "rb") as handle:
            while True:
                handle.seek(offset)
                chunk = handle.read(self.chunk)
                if offset > payload.size or (not chunk and offset < payload.size):
                    # The payload file is not what was announced (cut short on disk): pack
                    # it again, in a new upload.
                    outbox.forget_upload(instance_id)
                    self.packer.discard(instance_id)
                    raise PayloadLost(f"payload of {row['sop_uid']} cut short; packing again")
                offset, confirmed = hq.append(url, offset, chunk, total=payload.size)
                if confirmed:
                    return confirmed
                if offset >= payload.size:  # every byte in, the answer lost: holdings will tell
                    return None

    def _packed(self, row, packing: Future, report: Sent) -> Payload | None:
        """The payload the packer made, or None (refusal recorded, or the instance is gone)."""
        try:
            return packing.result()
        except DamagedHere as exc:
            self._refuse(row, str(exc), report)
        except OSError as exc:  # a full or failing disk here: no fault of the instance's
            log.error("cannot pack %s here (%s); trying again next turn", row["sop_uid"], exc)
            raise LocalTrouble(str(exc)) from exc
        except OrthancError as exc:
            if exc.status != 404:
                raise
            log.error("%s was deleted here before HQ had it", row["sop_uid"])
            self.outbox.gone(row["orthanc_id"])
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the rest
            self._refuse(row, f"{exc.__class__.__name__}: {exc}", report)
        return None

    def _send_previews(self, to_send: list) -> None:
        """Poor link: lossy previews of new and urgent studies go first, so HQ can triage
        while the originals follow. A preview is its own derived instance; it never counts for
        its original. Sent once per study (a failed try is simply made again: deterministic)."""
        # Only the most urgent class now: routine previews never delay an urgent original.
        top = to_send[0]["priority"] if to_send else "low"
        studies = list(dict.fromkeys(
            row["study_id"] for row in to_send
            if row["priority"] == top and top in ("critical", "high") and not row["previewed"]))
        for study_id in studies:
            rows = [row for row in self.outbox.pending_of(study_id)
                    if row["size"] <= codecs.MAX_TRANSCODE_BYTES]
            futures = [self.packer.submit_preview(row["orthanc_id"],
                                                  self._original_md5(row["orthanc_id"]),
                                                  self.level) for row in rows]
            previews = []
            for future in futures:
                try:
                    if (made := future.result()) is not None:
                        previews.append(made)
                except Exception as exc:  # noqa: BLE001 - no preview is no loss: originals go
                    log.info("no preview: %s", exc)
            try:
                while previews:
                    group, size = [], 0
                    while previews and (not group or size + previews[0].size <= self.chunk):
                        size += previews[0].size
                        group.append(previews.pop(0))
                    outcome = self._upload_batch([(p.sop_uid, p) for p in group])
                    refused = [r for r in (outcome or {}).get("batch", []) if not r.get("hq_id")]
                    if refused:
                        log.warning("HQ refused %d previews: %s", len(refused),
                                    refused[0].get("message"))
                    for made in group:
                        made.path.unlink(missing_ok=True)
            except HQRefused as exc:
                log.warning("previews of study %s refused: %s", study_id, exc)
            finally:
                for made in previews:
                    made.path.unlink(missing_ok=True)
            self.outbox.mark_previewed(study_id)
            log.info("sent lossy previews of study %s ahead of its originals", study_id)

    def _upload_batch(self, members: list[tuple[str, Payload]]) -> dict | None:
        """One tar upload of (SOP Instance UID, payload) members; HQ's per-member outcome, or
        None when the answer was lost. Raises HQRefused (whole batch) and HQUnreachable."""
        manifest = [{"name": str(n), "sop_uid": sop_uid, "codec": payload.codec,
                     "payload_md5": payload.payload_md5, "original_md5": payload.original_md5}
                    for n, (sop_uid, payload) in enumerate(members)]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            listing = json.dumps(manifest).encode()
            info = tarfile.TarInfo(codecs.BATCH_MANIFEST)
            info.size = len(listing)
            tar.addfile(info, io.BytesIO(listing))
            for entry, (_, payload) in zip(manifest, members, strict=True):
                tar.add(payload.path, arcname=entry["name"])
        data = buffer.getvalue()
        url = self.hq.create(len(data), {"codec": codecs.BATCH, "count": str(len(members)),
                                         "payload_md5": hashlib.md5(data).hexdigest()})
        offset = 0
        while offset < len(data):
            offset, confirmed = self.hq.append(url, offset, data[offset:offset + self.chunk],
                                               total=len(data))
            if confirmed:
                break
        return self.hq.outcome(url)

    def _send_batch(self, batch: list, report: Sent) -> None:
        """Small instances in one upload: a tar of their payloads and a manifest. Not resumed
        across restarts (it is at most one chunk); the holdings question settles any doubt."""
        if len(batch) == 1:
            self._send_one(*batch[0], report)
            return
        try:
            outcome = self._upload_batch([(row["sop_uid"], payload) for row, payload in batch])
        except HQRefused as exc:
            for row, _ in batch:
                self._refuse(row, str(exc), report)
            return
        if outcome is None:
            return  # the answer was lost: the next holdings question confirms what arrived
        self._settle_batch(batch, outcome, report)

    def _settle_batch(self, batch: list, outcome: dict, report: Sent) -> None:
        """HQ's answer per member: confirmed ones count as at HQ, refused ones pause."""
        for (row, payload), result in zip(batch, outcome.get("batch", []), strict=False):
            if result.get("sop_uid") != row["sop_uid"]:
                log.error("HQ's batch answer does not match what was sent; asking again later")
                return
            if result.get("hq_id"):
                self._confirm(row["orthanc_id"], result["hq_id"], payload.original_md5)
                report.confirmed.append(row["orthanc_id"])
            else:
                self._refuse(row, f"HQ refused ({result.get('status')}): "
                                  f"{result.get('message')}", report)

    def _confirm(self, instance_id: str, hq_id: str, original_md5: str) -> None:
        self.outbox.confirm(instance_id, hq_id, original_md5)
        self.packer.discard(instance_id)

    def _refuse(self, row, reason: str, report: Sent) -> None:
        self.packer.discard(row["orthanc_id"])
        if "unknown codec" in reason and "jxl" in reason:  # the text may be HTML-escaped
            # HQ not yet updated to JPEG XL (sites updated first): the codecs every receiver
            # knows from now on, and this instance (or one packed ahead before) again at once.
            if not self.older_hq:
                log.warning("HQ does not know JPEG XL (%s): packing for an older HQ", reason)
            self.older_hq = True
            self.outbox.forget_upload(row["orthanc_id"])
            return
        pause = self.outbox.refused(row["orthanc_id"], reason)
        log.error("%s not sent: %s (next try in %.0f min)", row["sop_uid"], reason, pause / 60)
        report.refused.append(row["orthanc_id"])

    def _ready(self, limit: int, now_window: bool) -> list:
        """What goes now. Back-fill (low) waits outside the off-peak window and, on a poor link,
        until nothing else is owed."""
        rows = self.outbox.ready(limit, include_low=now_window and self.hq.link.tier != "poor")
        if not rows and now_window:
            rows = self.outbox.ready(limit)
        return rows

    def send(self, limit: int = 50, low_allowed: bool = True) -> Sent:
        """One batch. Raises HQUnreachable when the link fails (everything stays owed); any
        other trouble with one instance is recorded and leaves it owed, the rest goes on."""
        report = Sent()
        rows, md5s = [], {}
        for row in self._ready(limit, low_allowed):
            try:
                md5s[row["orthanc_id"]] = self._original_md5(row["orthanc_id"])
                rows.append(row)
            except OrthancError as exc:
                if exc.status == 404:
                    log.error("%s was deleted here before HQ had it", row["sop_uid"])
                    self.outbox.gone(row["orthanc_id"])
                    self.packer.discard(row["orthanc_id"])
                else:
                    raise
        if not rows:
            return report
        held = self.hq.holdings([{"sop_uid": row["sop_uid"],
                                  "original_md5": md5s[row["orthanc_id"]]} for row in rows])
        to_send = []
        for row, hq_id in zip(rows, held, strict=True):
            if hq_id:
                self._confirm(row["orthanc_id"], hq_id, md5s[row["orthanc_id"]])
                report.already_held.append(row["orthanc_id"])
            else:
                to_send.append(row)
        if self.settings.lossy_previews and self.hq.link.tier == "poor":
            self._send_previews(to_send)
        level = self.level
        packing: deque[Future] = deque()
        batch: list[tuple[sqlite3.Row, Payload]] = []
        uploading: deque[tuple[sqlite3.Row, Payload, Future]] = deque()
        try:
            for index, row in enumerate(to_send):
                while len(packing) < LOOKAHEAD + 1 and index + len(packing) < len(to_send):
                    ahead = to_send[index + len(packing)]["orthanc_id"]
                    packing.append(self.packer.submit(ahead, md5s[ahead], level))
                payload = self._packed(row, packing.popleft(), report)
                if payload is None:
                    continue
                chunk = self.chunk
                small = payload.size <= max(SMALL_MIN, chunk // 4)
                if batch and (not small or len(batch) >= BATCH_MEMBERS
                              or sum(p.size for _, p in batch) + payload.size > chunk):
                    self._send_batch(batch, report)
                    batch = []
                if small:
                    batch.append((row, payload))
                elif self.hq.link.tier == "excellent":  # the CPU and HQ's stores, not the link,
                    if len(uploading) >= PARALLEL:       # are the limit: keep several in flight
                        self._settle(*uploading.popleft(), report)
                    uploading.append((row, payload,
                                      self._uploads.submit(self._upload_in_worker, row, payload)))
                else:
                    self._send_one(row, payload, report)
            if batch:
                self._send_batch(batch, report)
        finally:  # every parallel upload is settled, even when one met an outage
            unreachable = self._drain(uploading, report)
        if unreachable:
            raise unreachable
        if report.confirmed or report.already_held:
            log.info("%d sent and confirmed, %d already at HQ, %d refused (link %s)",
                     len(report.confirmed), len(report.already_held), len(report.refused),
                     self.hq.link.tier)
        return report
