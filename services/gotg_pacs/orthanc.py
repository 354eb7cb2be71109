"""The Orthanc REST client every service uses.

Small on purpose: one `requests.Session` per client, explicit timeouts on every call (a hung
Orthanc must never hang a service), errors turned into `OrthancError` with the URL and Orthanc's
own message so logs say what failed.
"""

from __future__ import annotations

from typing import Any

import requests

from .config import Settings

DEFAULT_TIMEOUT = 10.0


class OrthancError(Exception):
    """Orthanc could not be reached or refused a request (`status`: its HTTP answer, if any)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OrthancUnreachable(OrthancError):
    """No answer at all: Orthanc is down, starting, or the port is wrong."""


class Orthanc:
    def __init__(self, url: str, credentials: tuple[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never send local archive traffic through a proxy
        if credentials:
            self.session.auth = credentials

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> Orthanc:
        return cls(settings.orthanc_url, settings.orthanc_credentials, timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.ConnectionError as exc:
            raise OrthancUnreachable(f"Orthanc at {self.url} is not answering") from exc
        except requests.Timeout as exc:
            raise OrthancUnreachable(f"Orthanc at {self.url} timed out on {path}") from exc
        if response.status_code >= 400:
            detail = response.text[:300]
            try:
                detail = response.json().get("Message", detail)
            except ValueError:
                pass
            raise OrthancError(f"{method} {path}: HTTP {response.status_code} {detail}",
                               status=response.status_code)
        return response

    @staticmethod
    def _json(response: requests.Response) -> Any:
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # something that is not Orthanc answers on its port
            raise OrthancError(f"{response.url} answered something that is not Orthanc's JSON "
                               f"(HTTP {response.status_code})") from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self._json(self.request("GET", path, **kwargs))

    def post(self, path: str, json: Any = None, data: bytes | None = None, **kwargs: Any) -> Any:
        return self._json(self.request("POST", path, json=json, data=data, **kwargs))

    def put(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self._json(self.request("PUT", path, json=json, **kwargs))

    def delete(self, path: str, **kwargs: Any) -> None:
        self.request("DELETE", path, **kwargs)

    # --- what the services ask most often ---

    def system(self) -> dict[str, Any]:
        return self.get("/system")

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

    def plugins(self) -> dict[str, str]:
        """Loaded plugin name -> version (Orthanc also lists `explorer.js`, which is no plugin)."""
        return {name: self.get(f"/plugins/{name}").get("Version", "?")
                for name in self.get("/plugins") if not name.endswith(".js")}

    def is_alive(self) -> bool:
        try:
            self.system()
        except OrthancError:
            return False
        return True

    def find_instance(self, sop_instance_uid: str) -> list[str]:
        """Orthanc IDs of the instance with that SOP Instance UID (empty if absent)."""
        found = self.post("/tools/lookup", data=sop_instance_uid.encode()) or []
        return [item["ID"] for item in found if item.get("Type") == "Instance"]

    def verify_md5(self, instance_id: str) -> bool:
        """Orthanc re-reads the stored file and compares it with the MD5 taken at ingest."""
        try:
            self.post(f"/instances/{instance_id}/attachments/dicom/verify-md5")
        except OrthancUnreachable:
            raise
        except OrthancError:  # Orthanc answers 400 when the file no longer matches
            return False
        return True

    # --- modalities declared in Orthanc's database (survive restarts, travel in backups) ---

    def modalities(self) -> dict[str, dict[str, Any]]:
        return self.get("/modalities", params={"expand": ""})

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.put(f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def delete_modality(self, name: str) -> None:
        self.delete(f"/modalities/{name}")
