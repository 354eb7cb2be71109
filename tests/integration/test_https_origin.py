"""The appliance's one HTTPS origin, probed as an attacker and as a tablet would.

`pacs run` starts real Orthanc and real nginx from the same rendering the appliance uses; every
check here goes over real sockets with Python's OpenSSL as the client.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import stat
from pathlib import Path

import psutil
import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydicom import dcmread
from pydicom.data import get_testdata_file

from gotg_pacs import config
from gotg_pacs.process import start_proxy
from gotg_pacs.web.tls import SiteTLS
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.site import owe, running_appliance

EXTRA_NAMES = ("pacs.clinic.example", "10.99.0.7")


class Origin:
    def __init__(self, env: Path) -> None:
        self.settings = config.load(env)
        self.https = self.settings.https_port
        self.redirect = self.settings.http_redirect_port
        self.ca_file = self.settings.tls_dir / "ca-chain.crt"
        self.login = ("admin", self.settings.admin_password)
        self.session = ""

    def sign_in(self) -> None:
        """The admin's first sign-in through the origin, and the password change it asks for."""
        answer = requests.post(self.url("/auth/login"), verify=str(self.ca_file), timeout=30,
                               json={"user": "admin", "password": self.settings.admin_password})
        assert answer.status_code == 200 and answer.json()["must_change_password"]
        self.session = answer.cookies["pacs_session"]
        changed = self.post("/auth/password", json={"old": self.settings.admin_password,
                                                    "new": "a radiology department's own"})
        assert changed.status_code == 200, changed.text

    def cookie(self) -> dict:
        return {"Cookie": f"pacs_session={self.session}"} if self.session else {}

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url(path), verify=str(self.ca_file), timeout=30,
                             headers=self.cookie(), **kwargs)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.https}{path}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url(path), verify=str(self.ca_file), timeout=30, **kwargs)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    with running_appliance(tmp_path_factory.mktemp("origin"),
                           SERVER_NAMES=" ".join(EXTRA_NAMES)) as env:
        origin = Origin(env)
        origin.sign_in()
        yield origin


def handshake(port: int, *, version: ssl.TLSVersion | None = None, cipher: str | None = None,
              cafile: Path | None = None, name: str = "localhost") -> tuple[str, str]:
    """Connect to 127.0.0.1:port as `name`; the negotiated protocol and cipher."""
    if cafile:
        context = ssl.create_default_context(cafile=str(cafile))
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if version:
        context.minimum_version = context.maximum_version = version
    if cipher or version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        # Lower the client's own floor: the refusal measured must be the server's.
        context.set_ciphers(f"{cipher or 'ALL'}:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        return tls.version(), tls.cipher()[0]


def test_only_tls_1_2_and_1_3_are_spoken(origin):
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|protocol version"):
            handshake(origin.https, version=old)
    assert handshake(origin.https, version=ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"
    assert handshake(origin.https, version=ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"
    assert handshake(origin.https)[0] == "TLSv1.3"  # preferred when the client has it


def test_every_tls_1_2_suite_accepted_is_forward_secret_and_authenticated_encryption(origin):
    """Each TLS 1.2 suite this OpenSSL knows is offered alone: CBC, RSA key exchange, SHA-1,
    3DES, export and null suites are all refused."""
    every = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    every.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    suites = [c["name"] for c in every.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert len(suites) > 30
    accepted = []
    for suite in suites:
        try:
            handshake(origin.https, version=ssl.TLSVersion.TLSv1_2, cipher=suite)
        except (ssl.SSLError, ConnectionResetError):
            continue
        accepted.append(suite)
    assert accepted, "no TLS 1.2 suite accepted at all"
    for suite in accepted:
        assert suite.startswith("ECDHE-"), suite
        assert "GCM" in suite or "CHACHA20" in suite, suite
    for weak in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256",
                 "ECDHE-ECDSA-AES256-SHA384"):
        assert weak not in accepted


def test_the_certificate_chain_is_valid_for_every_name_the_box_is_reached_by(origin):
    host = socket.gethostname().split(".")[0]
    addresses = [a.address for nic in psutil.net_if_addrs().values() for a in nic
                 if a.family == socket.AF_INET]
    for name in ("localhost", "127.0.0.1", host, f"{host}.local", *addresses, *EXTRA_NAMES):
        assert handshake(origin.https, cafile=origin.ca_file, name=name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        handshake(origin.https, cafile=origin.ca_file, name="another-site.example")
    # Nothing else vouches for it: a box's CA is trusted only where someone installed it.
    with pytest.raises(ssl.SSLCertVerificationError):
        socket_context = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", origin.https), timeout=10) as raw, \
                socket_context.wrap_socket(raw, server_hostname="localhost"):
            pass


def test_the_certificates_are_what_browsers_require_and_the_keys_are_root_only(origin):
    tls = origin.settings.tls_dir
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    server, chained_ca = x509.load_pem_x509_certificates((tls / "server.crt").read_bytes())
    assert chained_ca == ca
    server.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.not_valid_after_utc - server.not_valid_before_utc <= datetime.timedelta(398)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.99.0.7") in names.get_values_for_type(x509.IPAddress)
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700


def test_plain_http_only_redirects_to_the_same_place_over_https(origin):
    for path in ("/orthanc/system?expand=1", "/dicom-web/studies", "/"):
        answer = requests.get(f"http://127.0.0.1:{origin.redirect}{path}",
                              allow_redirects=False, timeout=10)
        assert answer.status_code == 301
        assert answer.headers["Location"] == origin.url(path)
        assert b"ID" not in answer.content and b"00081190" not in answer.content
    posted = requests.post(f"http://127.0.0.1:{origin.redirect}/orthanc/instances", data=b"x",
                           auth=origin.login, allow_redirects=False, timeout=10)
    assert posted.status_code == 301


def test_a_tablet_can_fetch_the_site_ca_it_must_trust(origin):
    expected = origin.ca_file.read_bytes()
    over_http = requests.get(f"http://127.0.0.1:{origin.redirect}/gotg-pacs-ca.crt", timeout=10)
    over_https = origin.get("/gotg-pacs-ca.crt")
    for answer in (over_http, over_https):
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "application/x-x509-ca-cert"
        assert answer.content == expected


def test_every_https_answer_carries_hsts_and_the_security_headers(origin):
    for path, status in (("/orthanc/system", 401), ("/no-such-page", 404),
                         ("/gotg-pacs-ca.crt", 200), ("/", 302)):
        answer = origin.get(path, allow_redirects=False)
        assert answer.status_code == status, path
        assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Server"] == "nginx"  # no version to look up exploits by


def test_orthanc_answers_only_a_signed_in_person_and_only_through_the_origin(origin):
    assert origin.get("/orthanc/system").status_code == 401
    assert origin.get("/dicom-web/studies").status_code == 401
    # Orthanc's own credential is no way in from outside: the origin wants a session.
    assert origin.get("/orthanc/system", auth=origin.login).status_code == 401
    system = origin.get("/orthanc/system", headers=origin.cookie())
    assert system.json()["DicomAet"] == "GOTG_PACS"
    # Orthanc's own port, from an address of this box that is not loopback: refused even with
    # the right password (what a laptop on the clinic LAN would get).
    lan = [a.address for nic in psutil.net_if_addrs().values() for a in nic
           if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    assert lan, "this machine needs a non-loopback IPv4 address for this check"
    direct = requests.get(f"http://{lan[0]}:{origin.settings.http_port}/system",
                          auth=origin.login, timeout=10)
    assert direct.status_code in (401, 403)
    loopback = requests.get(f"{origin.settings.orthanc_url}/system", auth=origin.login,
                            timeout=10)
    assert loopback.status_code == 200


def test_images_go_in_and_dicomweb_points_back_at_the_origin(origin):
    path = Path(get_testdata_file("CT_small.dcm"))
    stored = origin.post("/orthanc/instances", data=path.read_bytes())
    assert stored.status_code == 200 and stored.json()["Status"] in ("Success", "AlreadyStored")
    study = dcmread(path).StudyInstanceUID
    found = origin.get(f"/dicom-web/studies?StudyInstanceUID={study}",
                       headers=origin.cookie()).json()
    assert found[0]["00081190"]["Value"] == [origin.url(f"/dicom-web/studies/{study}")]
    back = origin.get(f"/orthanc/instances/{stored.json()['ID']}/file", headers=origin.cookie())
    assert back.content == path.read_bytes()


def test_dicomweb_serves_frames_as_stored_and_asking_to_transcode_cannot_crash_orthanc(origin):
    """Orthanc 1.10's DICOMweb transcoding crashes it (CharLS, GDCM): the origin asks for the
    stored encoding whatever the browser's Accept says, so no signed-in person can bring the
    archive down, and every answer is the file's own pixels."""
    path = corpus.DATA_DIR / "MR2_J2KR.dcm"
    stored = origin.post("/orthanc/instances", data=path.read_bytes())
    assert stored.status_code == 200
    ds = dcmread(path, stop_before_pixels=True)
    base = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    stored_syntax = str(ds.file_meta.TransferSyntaxUID)
    for _ in range(10):
        for accept in ('multipart/related; type="application/octet-stream"; '
                       'transfer-syntax=1.2.840.10008.1.2.4.80',
                       'multipart/related; type="application/octet-stream"', None):
            frame = origin.get(f"{base}/frames/1", headers={
                **origin.cookie(), **({"Accept": accept} if accept else {})})
            assert frame.status_code == 200, frame.text[:200]
            assert f"transfer-syntax={stored_syntax}" in frame.headers["Content-Type"]
        whole = origin.get(base, headers={**origin.cookie(), "Accept": (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5')})
        assert whole.status_code == 200 and stored_syntax.encode() in whole.content
    # The same transcoding through Orthanc's REST API is refused before it reaches Orthanc.
    study_id = origin.get(f"/orthanc/instances/{stored.json()['ID']}/study",
                          headers=origin.cookie()).json()["ID"]
    for path in (f"/orthanc/studies/{study_id}/archive?transcode=1.2.840.10008.1.2.4.80",
                 f"/orthanc/studies/{study_id}/media?x=1&Transcode=1.2.840.10008.1.2.5",
                 f"/orthanc/dicom-web{base}/frames/1",
                 f"/orthanc/wado?requestType=WADO&objectUID={ds.SOPInstanceUID}"
                 "&transferSyntax=1.2.840.10008.1.2.4.80"):
        assert origin.get(path, headers=origin.cookie()).status_code == 403, path
    assert origin.get(f"/orthanc/studies/{study_id}/archive",
                      headers=origin.cookie()).status_code == 200, "as stored: allowed"
    assert origin.get("/orthanc/system", headers=origin.cookie()).status_code == 200
    # Searches keep their own Accept: JSON as asked.
    found = origin.get(f"/dicom-web/studies?StudyInstanceUID={ds.StudyInstanceUID}",
                       headers={**origin.cookie(), "Accept": "application/dicom+json"})
    assert found.status_code == 200 and found.json()[0]["0020000D"]["Value"] == [
        ds.StudyInstanceUID]


def test_a_clinic_syncs_only_to_an_hq_whose_certificate_it_trusts(make_clinic, hq):
    """Clinic to HQ the way it runs in the field: HTTPS through HQ's nginx, HQ's CA pinned in
    HQ_CA_FILE, the site's own token inside; a clinic trusting another CA sends nothing."""
    front = start_proxy(hq.settings, hq=True)
    try:
        url = f"https://127.0.0.1:{hq.settings.https_port}/sync"
        hq_ca = hq.settings.tls_dir / "ca-chain.crt"
        clinic = make_clinic(url, HQ_CA_FILE=str(hq_ca))
        files = corpus.representative()[:2]
        owe(clinic, files).close()
        ok = run_pacs("sync", "now", "--json", env_file=clinic.env_file)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["confirmed"] == len(files)
        assert hq.instance_count() == len(files)

        # The same clinic, trusting its own CA instead of HQ's: refused before a byte is sent.
        stranger_ca = clinic.settings.tls_dir.parent / "not-hq.crt"
        SiteTLS(stranger_ca.parent / "other-tls", "other").ensure(["localhost"])
        stranger_ca.write_bytes((stranger_ca.parent / "other-tls" / "ca.crt").read_bytes())
        env = clinic.env_file.read_text().replace(str(hq_ca), str(stranger_ca))
        clinic.env_file.write_text(env)
        refused = run_pacs("sync", "test-connection", env_file=clinic.env_file)
        assert refused.returncode == 1
        assert "certificate is not trusted" in refused.stdout and "HQ_CA_FILE" in refused.stdout
        access = (hq.settings.log_dir / "nginx-access.log").read_text()
        assert access.count("/sync/api/v1/holdings") >= 1 and "verify" not in access
    finally:
        front.stop()
