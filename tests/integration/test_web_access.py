"""Who may do what through the appliance's HTTPS origin: every role against every endpoint, as
real requests through real nginx to real Orthanc and the web service (`pacs run`).

The expected table below is written out by hand, apart from `web/policy.py`: a rule changed
there without thought fails here.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from gotg_pacs import config
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.site import running_appliance

ROLES = ("admin", "clinician", "radiographer", "hq_operator")
EVERYONE = set(ROLES)
STAFF = {"admin", "clinician", "radiographer"}
NEW_PASSWORD = "a long enough password"


class Site:
    def __init__(self, env: Path) -> None:
        self.env = env
        self.settings = config.load(env)
        self.ca = str(self.settings.tls_dir / "ca-chain.crt")
        self.origin = f"https://127.0.0.1:{self.settings.https_port}"
        self.direct = f"http://127.0.0.1:{self.settings.web_api_port}"

    def call(self, method: str, path: str, token: str | None = None, **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Cookie"] = f"pacs_session={token}"
        return requests.request(method, self.origin + path, headers=headers, verify=self.ca,
                                allow_redirects=False, timeout=60, **kwargs)

    def login(self, name: str, password: str) -> requests.Response:
        """Straight to the web service: the edge's rate limit is tested on its own."""
        return requests.post(f"{self.direct}/auth/login", json={"user": name,
                                                                "password": password},
                             headers={"X-Real-IP": "192.0.2.50"}, timeout=30)

    def signed_in(self, name: str, password: str) -> str:
        answer = self.login(name, password)
        assert answer.status_code == 200, answer.text
        return answer.cookies["pacs_session"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with running_appliance(tmp_path_factory.mktemp("access"), DICOM_ACCESS="standard") as env:
        yield Site(env)


@pytest.fixture(scope="module")
def tokens(site) -> dict[str, str]:
    """A signed-in session per role, each past its first-login password change."""
    made = {}
    for role in ROLES:
        if role == "admin":
            first = site.settings.admin_password
            name = "admin"
        else:
            name = role.replace("_", "-")
            added = run_pacs("user", "add", name, "--role", role, "--json", env_file=site.env)
            assert added.returncode == 0, added.stderr
            first = json.loads(added.stdout)["one_time_password"]
        token = site.signed_in(name, first)
        # Before the change, nothing but the change.
        assert site.call("GET", "/orthanc/system", token).status_code == 403
        changed = site.call("POST", "/auth/password", token,
                            json={"old": first, "new": NEW_PASSWORD})
        assert changed.status_code == 200, changed.text
        made[role] = token
    # The admin chose their own: the boot partition's copy of the made one may go.
    assert (site.settings.state_path / "web" / "admin-password-changed").exists()
    return made


@pytest.fixture(scope="module")
def stored(site) -> dict[str, str]:
    """A study in the archive, and an instance each role's DELETE may aim at."""
    path = corpus.representative()[0]
    orthanc = requests.post(f"{site.settings.orthanc_url}/instances", data=path.read_bytes(),
                            auth=site.settings.orthanc_credentials, timeout=60).json()
    spare = corpus.renumbered_copies([Path(get_testdata_file("CT_small.dcm"))], 1,
                                     Path(site.settings.state_path) / "spare")[0]
    victim = requests.post(f"{site.settings.orthanc_url}/instances", data=spare.read_bytes(),
                           auth=site.settings.orthanc_credentials, timeout=60).json()
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return {"study": orthanc["ParentStudy"], "instance": orthanc["ID"], "uid": uid,
            "victim": victim["ID"], "file": str(path)}


def _stow(path: str) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() \
        + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return {"data": body, "headers": {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"}}


def matrix(stored: dict[str, str]) -> list[tuple[str, str, set[str], dict]]:
    """(method, path, roles allowed, request arguments): the permission table, by hand."""
    study, instance, uid = stored["study"], stored["instance"], stored["uid"]
    return [
        ("GET", "/orthanc/system", EVERYONE, {}),
        ("GET", "/orthanc/statistics", EVERYONE, {}),
        ("GET", "/orthanc/studies", STAFF, {}),
        ("GET", f"/orthanc/studies/{study}", STAFF, {}),
        ("GET", f"/orthanc/instances/{instance}/file", STAFF, {}),
        ("GET", "/orthanc/app/explorer.html", STAFF, {}),
        ("POST", "/orthanc/tools/find", STAFF, {"json": {"Level": "Study", "Query": {}}}),
        ("POST", "/orthanc/instances", {"admin", "radiographer"},
         {"data": Path(stored["file"]).read_bytes()}),
        ("POST", f"/orthanc/studies/{study}/archive", {"admin", "clinician"},
         {"json": {"Synchronous": True}}),
        ("GET", "/orthanc/modalities", {"admin"}, {}),
        ("PUT", "/orthanc/modalities/matrix", {"admin"},
         {"json": {"AET": "MATRIX", "Host": "127.0.0.1", "Port": 104}}),
        ("GET", "/orthanc/jobs", {"admin"}, {}),
        ("GET", "/orthanc/changes", {"admin"}, {}),
        ("GET", "/orthanc/tools/now", {"admin"}, {}),
        ("GET", "/dicom-web/studies", STAFF, {}),
        ("GET", f"/dicom-web/studies/{uid}/metadata", STAFF, {}),
        ("POST", "/dicom-web/studies", {"admin", "radiographer"}, _stow(stored["file"])),
        ("POST", f"/api/studies/{uid}/urgent", {"admin", "clinician"}, {}),
        ("GET", "/api/users", {"admin"}, {}),
        ("GET", "/api/audit", {"admin"}, {}),
        ("GET", "/auth/me", EVERYONE, {}),
        # last: the admin's DELETEs really delete
        ("DELETE", "/orthanc/modalities/matrix", {"admin"}, {}),
        ("DELETE", f"/orthanc/instances/{stored['victim']}", {"admin"}, {}),
    ]


def test_every_role_against_every_endpoint(site, tokens, stored):
    wrong = []
    for role in ("hq_operator", "radiographer", "clinician", "admin"):
        for method, path, allowed, kwargs in matrix(stored):
            answer = site.call(method, path, tokens[role], **kwargs)
            expected = "allow" if role in allowed else "deny"
            got = ("allow" if answer.status_code < 300 else
                   "deny" if answer.status_code == 403 else f"status {answer.status_code}")
            if got != expected:
                wrong.append(f"{role} {method} {path}: expected {expected}, got {got} "
                             f"{answer.text[:120]!r}")
    assert wrong == [], "\n".join(wrong)


def test_the_audit_trail_names_who_did_what_to_which_study(site, tokens, stored):
    """After the matrix (module order): views, exports, deletions and refusals, each with the
    person, and a chain that shows nothing was removed."""
    trail = site.call("GET", "/api/audit", tokens["admin"]).json()
    assert trail["chain"] == []
    done = {(e["user"], e["action"], e.get("resource", "")) for e in trail["events"]}
    assert ("clinician", "view", stored["study"]) in done
    assert ("clinician", "export", stored["study"]) in done
    assert ("admin", "delete", stored["victim"]) in done
    assert ("hq-operator", "denied", "") in done
    assert {("admin", "login", ""), ("radiographer", "password-changed", "")} <= done
    assert site.call("GET", "/api/audit", tokens["clinician"]).status_code == 403
    shown = run_pacs("audit", "--last", "5", env_file=site.env)
    assert shown.returncode == 0 and "chain intact" in shown.stdout


def test_nobody_signed_in_gets_nothing_but_the_sign_in_page(site, stored):
    for method, path, _allowed, kwargs in matrix(stored):
        answer = site.call(method, path, **kwargs)
        assert answer.status_code == 401, (method, path, answer.status_code)
    # A browser is sent to sign in, and back where it was going afterwards.
    browser = site.call("GET", "/orthanc/app/explorer.html", headers={"Accept": "text/html"})
    assert browser.status_code == 302
    assert browser.headers["Location"] == (f"{site.origin}/auth/login"
                                           "?next=/orthanc/app/explorer.html")
    page = site.call("GET", "/auth/login?next=/orthanc/app/explorer.html")
    assert page.status_code == 200 and 'name="password"' in page.text
    # A stolen cookie from an earlier, ended session, or a made-up one, is nobody.
    assert site.call("GET", "/orthanc/system", "made-up-token").status_code == 401
    # The check nginx makes (and which writes the audit trail) is not a client's to call.
    forged = site.call("GET", "/auth/check", headers={"X-Original-URI": "/orthanc/studies/x"})
    assert forged.status_code == 404


def test_orthanc_itself_never_answers_without_its_credential(site):
    assert requests.get(f"{site.settings.orthanc_url}/system", timeout=10).status_code == 401


def test_logout_ends_the_session_and_everywhere_ends_them_all(site, tokens):
    name = "clinician"
    laptop, tablet, phone = (site.signed_in(name, NEW_PASSWORD) for _ in range(3))
    assert site.call("GET", "/orthanc/studies", laptop).status_code == 200
    assert site.call("POST", "/auth/logout", laptop, json={}).status_code == 200
    assert site.call("GET", "/orthanc/studies", laptop).status_code == 401
    assert site.call("GET", "/orthanc/studies", tablet).status_code == 200
    ended = site.call("POST", "/auth/logout?everywhere=1", tablet, json={})
    assert ended.json() == {"ended": 3}  # tablet, phone and the fixture's own session
    assert site.call("GET", "/orthanc/studies", phone).status_code == 401


def test_a_guessed_password_locks_the_account_not_the_others(site, tokens):
    added = run_pacs("user", "add", "target", "--role", "radiographer", "--json",
                     env_file=site.env)
    first = json.loads(added.stdout)["one_time_password"]
    for _ in range(5):
        assert site.login("target", "guess").status_code == 401
    locked = site.login("target", first)
    assert locked.status_code == 401 and "try again later" in locked.json()["error"]
    assert site.login("nobody-here", "guess").json()["error"] == "wrong name or password"
    assert site.signed_in("radiographer", NEW_PASSWORD)
    listed = json.loads(run_pacs("user", "list", "--json", env_file=site.env).stdout)
    assert {row["name"]: row["locked"] for row in listed}["target"] is True


def test_the_edge_slows_down_anyone_guessing_passwords(site):
    """Last in this module: it uses up 127.0.0.1's login allowance for a minute."""
    codes = [site.call("POST", "/auth/login", json={"user": "admin", "password": "guess"})
             .status_code for _ in range(15)]
    assert codes[0] == 401 and set(codes) == {401, 429}
    assert codes.count(429) >= 8
