"""The clinic's side of the wire: tus 1.0 uploads and the holdings question, to the HQ receiver.

Deliberately small: the protocol is the open tus standard (create, ask the offset, append), the
site proves itself with its own bearer token, and every call both feeds and obeys the link
estimate (`network.LinkEstimate`): chunks are timed to measure the real link rather than ping it,
and timeouts follow what the link can do (seconds on a LAN, longer on 2G).
"""

from __future__ import annotations

import base64
import html
import re
import threading
import time
from pathlib import Path

import requests

from ..config import Settings
from .network import LinkEstimate

TUS = {"Tus-Resumable": "1.0.0"}


class HQUnreachable(Exception):
    """No answer from HQ (network down, receiver down): try again later, lose nothing."""


class HQRefused(Exception):
    """HQ answered and said no (bad credential, refused content): retrying as is will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HQ refused ({status}): {message}")
        self.status = status


class RateCap:
    """MAX_BANDWIDTH_MBPS as a hard cap: chunks wait until the budget allows them.

    A paid satellite link or a clinic's shared 2G must never be filled by the archive: the
    average rate since the last idle pause never exceeds the cap, whatever the chunk size.
    """

    def __init__(self, mbps: float) -> None:
        self.bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self._start = 0.0
        self._sent = 0
        self._lock = threading.Lock()  # parallel uploads share one budget

    def wait_for(self, size: int) -> None:
        if not self.bytes_per_s:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._start > 5 + self._sent / self.bytes_per_s:  # idle: a new window
                self._start, self._sent = now, 0
            self._sent += size
            delay = self._start + self._sent / self.bytes_per_s - now
        if delay > 0:
            time.sleep(delay)


class HQClient:
    def __init__(self, url: str, token: str, timeout: float | None = None,
                 max_mbps: float = 0.0, link: LinkEstimate | None = None,
                 ca_file: Path | None = None) -> None:
        """`timeout` fixes every call's timeout (tests); by default the link estimate sets it.
        `ca_file`: the CA(s) HQ's certificate must chain to (default: the system's)."""
        self.url = url.rstrip("/")
        self.fixed_timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", **TUS})
        self.session.verify = str(ca_file) if ca_file else True
        self.link = link or LinkEstimate(max_mbps)
        self.cap = RateCap(max_mbps)
        self._sent = [0]  # payload bytes HQ accepted, shared with clones

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float | None = None) -> HQClient:
        """This site's client: HQ_URL, its own HQ_TOKEN, HQ_CA_FILE, MAX_BANDWIDTH_MBPS."""
        return cls(settings.hq_url, settings.hq_token, timeout=timeout,
                   max_mbps=settings.max_bandwidth_mbps, ca_file=settings.hq_ca_file)

    @property
    def bytes_sent(self) -> int:
        return self._sent[0]

    def clone(self) -> HQClient:
        """A client for another thread (a session is not shared): same site, same link
        estimate, same bandwidth budget, same byte count."""
        twin = HQClient.__new__(HQClient)
        twin.url, twin.fixed_timeout = self.url, self.fixed_timeout
        twin.session = requests.Session()
        twin.session.headers.update(self.session.headers)
        twin.session.verify = self.session.verify
        twin.link, twin.cap, twin._sent = self.link, self.cap, self._sent
        return twin

    def _timeout(self, size: int, extra: float = 0.0) -> tuple[float, float]:
        if self.fixed_timeout:
            return self.fixed_timeout, self.fixed_timeout + extra
        if size:  # urllib3 applies the connect timeout to sending the body too
            timeout = self.link.timeout(size)
            return timeout, timeout + extra
        # A short connect timeout notices a dead link fast and a returning one soon after.
        return min(10.0, 3.0 + 4 * (self.link.latency or 0.5)), self.link.timeout(size) + extra

    def _call(self, method: str, url: str, size: int = 0, extra_wait: float = 0.0,
              **kwargs) -> requests.Response:
        started = time.monotonic()
        # Per request: requests lets REQUESTS_CA_BUNDLE in the environment override the
        # session's own setting, which would silently trust something other than HQ_CA_FILE.
        kwargs.setdefault("verify", self.session.verify)
        try:
            response = self.session.request(method, url, timeout=self._timeout(size, extra_wait),
                                            **kwargs)
        except requests.exceptions.SSLError as exc:
            # Waited out like an outage (nothing is sent, nothing lost), but worded so that
            # someone looks: a wrong HQ_CA_FILE, or a network that intercepts TLS.
            reason = re.search(r"(certificate verify failed: [^(]*|[A-Z_]{6,})", str(exc))
            raise HQUnreachable(f"HQ at {self.url}: its certificate is not trusted "
                                f"({reason.group(1).strip() if reason else exc}); "
                                "check HQ_CA_FILE") from exc
        except requests.RequestException as exc:
            self.link.failed(size if isinstance(exc, requests.Timeout) else 0)
            raise HQUnreachable(f"HQ at {self.url}: {exc.__class__.__name__}") from exc
        if response.status_code >= 500:
            self.link.failed()
            raise HQUnreachable(f"HQ at {self.url} answered {response.status_code}")
        if size:  # the link's time only: not the time HQ took to store a finished instance
            busy_at_hq = float(response.headers.get("Gotg-Store-Seconds", 0) or 0)
            self.link.sent(size, max(0.001, time.monotonic() - started - busy_at_hq))
        else:
            self.link.answered(time.monotonic() - started)
        return response

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else self.url + location

    def holdings(self, instances: list[dict[str, str]]) -> list[str | None]:
        """For each (SOP Instance UID, original MD5) asked, in order: HQ's instance if HQ holds
        exactly it from this site, else None."""
        response = self._call("POST", f"{self.url}/api/v1/holdings",
                              json={"instances": instances})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            held = response.json()["held"]
        except (ValueError, KeyError, TypeError):  # a captive portal, a proxy's error page
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None
        if not isinstance(held, list) or len(held) != len(instances):
            raise HQUnreachable(f"HQ at {self.url} answered a holdings list of the wrong size")
        return held

    def create(self, length: int, metadata: dict[str, str]) -> str:
        encoded = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                           for key, value in metadata.items())
        response = self._call("POST", f"{self.url}/files",
                              headers={"Upload-Length": str(length), "Upload-Metadata": encoded})
        if response.status_code != 201:
            raise HQRefused(response.status_code, response.text[:200])
        return self._absolute(response.headers["Location"])

    def offset(self, upload_url: str) -> tuple[int, str | None] | None:
        """Where the upload stands at HQ, and HQ's instance if it already finished; None when
        HQ no longer knows it (expired or refused: start over)."""
        response = self._call("HEAD", upload_url)
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise HQRefused(response.status_code, "cannot read the upload's offset")
        return int(response.headers["Upload-Offset"]), response.headers.get("Gotg-Confirmed")

    def outcome(self, upload_url: str) -> dict | None:
        """How a finished upload ended at HQ (per instance for a batch); None if HQ no longer
        knows (the holdings question will tell)."""
        response = self._call("GET", f"{upload_url}/outcome")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            return response.json()
        except ValueError:
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None

    def append(self, upload_url: str, offset: int, chunk: bytes,
               total: int | None = None) -> tuple[int, str | None]:
        """Send one chunk at offset; (new offset, HQ instance once the last byte is confirmed).
        With `total` (the upload's length), the last chunk also waits for HQ to unpack, store and
        read back the instance: 30 s plus a second per 10 MB."""
        self.cap.wait_for(len(chunk))
        last = total is not None and offset + len(chunk) >= total
        response = self._call("PATCH", upload_url, size=len(chunk), data=chunk,
                              extra_wait=30.0 + total / 10e6 if last else 0.0, headers={
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
        if response.status_code == 409 and "Upload-Offset" in response.headers:
            return int(response.headers["Upload-Offset"]), None  # stale offset: HQ says where
        if response.status_code != 204:
            raise HQRefused(response.status_code, response.text[:200])
        self._sent[0] += len(chunk)  # one thread per upload: += on a list cell is enough
        return int(response.headers["Upload-Offset"]), response.headers.get("Gotg-Confirmed")

    # --- HQ to clinic: what HQ queued for this site (reports, prior studies) -----------------

    def waiting(self, after: int = 0, limit: int = 100) -> tuple[list[dict], bool]:
        """What HQ holds for this site after `after` (its queue numbers), and whether more."""
        response = self._call("GET", f"{self.url}/api/v1/outbound",
                              params={"after": after, "limit": limit})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            answer = response.json()
            return list(answer["items"]), bool(answer["more"])
        except (ValueError, KeyError, TypeError):
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None

    def download(self, seq: int, first: int, last: int) -> requests.Response:
        """Bytes first..last of a queued instance, streamed (read it, then close it). Raises
        HQRefused when HQ says no: 404 not this site's, 410 HQ lost it, 416 nothing there."""
        response = self._call("GET", f"{self.url}/api/v1/outbound/{seq}/file", stream=True,
                              headers={"Range": f"bytes={first}-{last}"})
        if response.status_code not in (200, 206):
            response.close()
            raise HQRefused(response.status_code, f"download of HQ's item {seq}")
        return response

    def original(self, sop_uid: str, md5: str, first: int, last: int) -> requests.Response:
        """Bytes first..last of this site's original file (its MD5 as stored here), rebuilt by
        HQ for a repair; streamed. HQRefused: 404 HQ holds no such original for this site,
        409 HQ holds it only in other bytes (a transcoding), 416 nothing there."""
        response = self._call("GET", f"{self.url}/api/v1/originals/{md5}", stream=True,
                              params={"sop_uid": sop_uid},
                              headers={"Range": f"bytes={first}-{last}"})
        if response.status_code not in (200, 206):
            said = re.search(r"<p>(.*?)</p>", response.text, re.S)  # Flask's page for abort()
            response.close()
            raise HQRefused(response.status_code, html.unescape(said[1]) if said
                            else "no original of this instance for this site")
        return response

    def acknowledge(self, seq: int, md5: str, clinic_id: str) -> None:
        """This site stored and verified exactly HQ's content: HQ marks it delivered."""
        response = self._call("POST", f"{self.url}/api/v1/outbound/{seq}/ack",
                              json={"md5": md5, "clinic_id": clinic_id})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])

    # --- the audit trail, kept at HQ (`hq.audit`) -------------------------------------------

    def ship_audit(self, trail: str, start: int, end: int,
                   events: list[dict]) -> tuple[int, bool]:
        """Hand HQ the events between byte offsets start and end of this site's trail; how far
        HQ now holds, and whether it took these (not when it held more or less than that)."""
        response = self._call("POST", f"{self.url}/api/v1/audit",
                              json={"trail": trail, "start": start, "end": end,
                                    "events": events})
        if response.status_code not in (200, 409):
            raise HQRefused(response.status_code, response.text[:200])
        return int(response.json()["held"]), response.status_code == 200

    # --- the backup passphrase, kept at HQ (`hq.escrow`) -----------------------------------

    def hand_over_passphrase(self, passphrase: str) -> None:
        response = self._call("PUT", f"{self.url}/api/v1/escrow", json={"passphrase": passphrase})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])

    def hand_over_key(self, repository: str, key: str) -> None:
        """The backup disk's repository key (`borg key export`, sealed by the passphrase)."""
        response = self._call("PUT", f"{self.url}/api/v1/escrow/key",
                              json={"repository": repository, "key": key})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])

    def hand_over_disk_passphrase(self, luks_uuid: str, passphrase: str) -> bool:
        """The encrypted data disk's recovery passphrase (HQ never gives it back to a site):
        True when HQ did not hold it yet."""
        response = self._call("PUT", f"{self.url}/api/v1/escrow/disk",
                              json={"luks_uuid": luks_uuid, "passphrase": passphrase})
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            return bool(response.json()["new"])
        except (ValueError, KeyError, TypeError):
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None

    def kept_keys(self) -> list[dict]:
        """Every repository key HQ keeps for this site ({"repository", "key", "since"})."""
        response = self._call("GET", f"{self.url}/api/v1/escrow/keys")
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            return [{"repository": str(entry["repository"]), "key": str(entry["key"])}
                    for entry in response.json()["keys"]]
        except (ValueError, KeyError, TypeError):
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None

    def kept_passphrases(self) -> list[str]:
        """Every backup passphrase HQ keeps for this site, oldest first."""
        response = self._call("GET", f"{self.url}/api/v1/escrow")
        if response.status_code != 200:
            raise HQRefused(response.status_code, response.text[:200])
        try:
            return [str(entry["passphrase"]) for entry in response.json()["passphrases"]]
        except (ValueError, KeyError, TypeError):
            raise HQUnreachable(f"HQ at {self.url} answered something that is not HQ") from None
