"""The clinic's side of the wire: tus 1.0 uploads and the holdings question, to the HQ receiver.

Deliberately small: the protocol is the open tus standard (create, ask the offset, append), the
site proves itself with its own bearer token, every call has a timeout, and bytes are counted so
the sync can measure the real link rather than ping it.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import requests

TUS = {"Tus-Resumable": "1.0.0"}


class HQUnreachable(Exception):
    """No answer from HQ (network down, receiver down): try again later, lose nothing."""


class HQRefused(Exception):
    """HQ answered and said no (bad credential, refused content): retrying as is will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HQ refused ({status}): {message}")
        self.status = status


@dataclass
class LinkStats:
    """What the real transfers showed: the raw material of the network estimate."""

    bytes_sent: int = 0
    seconds_sending: float = 0.0
    requests: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)


class RateCap:
    """MAX_BANDWIDTH_MBPS as a hard cap: chunks wait until the budget allows them.

    A paid satellite link or a clinic's shared 2G must never be filled by the archive: the
    average rate since the last idle pause never exceeds the cap, whatever the chunk size.
    """

    def __init__(self, mbps: float) -> None:
        self.bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self._start = 0.0
        self._sent = 0

    def wait_for(self, size: int) -> None:
        if not self.bytes_per_s:
            return
        now = time.monotonic()
        if now - self._start > 5 + self._sent / self.bytes_per_s:  # idle a while: a new window
            self._start, self._sent = now, 0
        self._sent += size
        delay = self._start + self._sent / self.bytes_per_s - now
        if delay > 0:
            time.sleep(delay)


class HQClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0,
                 max_mbps: float = 0.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", **TUS})
        self.stats = LinkStats()
        self.cap = RateCap(max_mbps)

    def _call(self, method: str, url: str, **kwargs) -> requests.Response:
        started = time.monotonic()
        self.stats.requests += 1
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            self.stats.failures += 1
            raise HQUnreachable(f"HQ at {self.url}: {exc.__class__.__name__}") from exc
        self.stats.latencies = (self.stats.latencies + [time.monotonic() - started])[-50:]
        if response.status_code >= 500:
            self.stats.failures += 1
            raise HQUnreachable(f"HQ at {self.url} answered {response.status_code}")
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

    def offset(self, upload_url: str) -> int | None:
        """Where the upload stands at HQ; None when HQ no longer knows it (start over)."""
        response = self._call("HEAD", upload_url)
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise HQRefused(response.status_code, "cannot read the upload's offset")
        return int(response.headers["Upload-Offset"])

    def append(self, upload_url: str, offset: int, chunk: bytes) -> tuple[int, str | None]:
        """Send one chunk at offset; (new offset, HQ instance once the last byte is confirmed)."""
        self.cap.wait_for(len(chunk))
        started = time.monotonic()
        response = self._call("PATCH", upload_url, data=chunk, headers={
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
        self.stats.seconds_sending += time.monotonic() - started
        if response.status_code == 409 and "Upload-Offset" in response.headers:
            return int(response.headers["Upload-Offset"]), None  # stale offset: HQ says where
        if response.status_code != 204:
            raise HQRefused(response.status_code, response.text[:200])
        self.stats.bytes_sent += len(chunk)
        return int(response.headers["Upload-Offset"]), response.headers.get("Gotg-Confirmed")
