"""HQ's receiver fuzzed against its own OpenAPI description (schemathesis, hypothesis underneath),
on a real HQ (Orthanc with its index in PostgreSQL, `pacs hq run`): every route is described,
every answer is documented and well-formed, none is a server error, no route answers without
its own kind of token, and nothing the fuzzer sends is stored as an instance."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from gotg_pacs import config
from gotg_pacs.hq import receiver
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import wait_until
from gotg_pacs.sync.transport import HQClient
from tests.conftest import Appliance, run_pacs
from tests.support import corpus
from tests.support.site import free_port, hq_answers, write_env

SPEC = Path(receiver.__file__).with_name("openapi.yaml")
OPERATIONS = 20  # every route `create_app` registers, each method once
EXAMPLES = 25  # generated requests per operation, half of them aimed at what HQ holds
NEGATIVE_EXAMPLES = 10  # schema-violating ones per operation
TUS = "application/offset+octet-stream"

# A tus chunk is opaque bytes: small ones, so that some finish a one-byte upload.
schemathesis.openapi.media_type(TUS, st.binary(max_size=64))


@dataclass
class HQ:
    url: str
    tokens: dict[str, str]  # by security scheme of the description: site, operator
    orthanc: Orthanc
    log: Path
    # The queued item (seq, md5) and the entry by number; per operation, the overrides that
    # aim generated requests at what HQ holds.
    seeded: dict[str, str | int] = field(default_factory=dict)
    known: dict[str, list[dict]] = field(default_factory=dict)

    def auth(self, scheme: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scheme]}"}

    def instances(self) -> int:
        return self.orthanc.statistics()["CountInstances"]


def _operations(base_url: str = "http://127.0.0.1") -> list:
    api = schemathesis.openapi.from_path(SPEC)
    api.config.update(base_url=base_url)
    return [result.ok() for result in api.get_all_operations()]


def _label(operation) -> str:
    return f"{operation.method.upper()} {operation.path}"


def _scheme(operation) -> str:
    """The kind of token the description asks for: the test sends exactly that one."""
    [requirement] = operation.definition.raw["security"]
    [scheme] = requirement
    return scheme


# --- a real HQ, with something in it ------------------------------------------------------------

def _upload(client: HQClient, data: bytes, metadata: dict[str, str]) -> tuple[str, str | None]:
    """An upload of `data` in one chunk: its ID, and what confirmed it (None: refused)."""
    url = client.create(len(data), metadata)
    answer = client.session.patch(url, data=data, timeout=60,
                                  headers={"Upload-Offset": "0", "Content-Type": TUS})
    assert answer.status_code in (204, 422), answer.text
    return url.rsplit("/", 1)[1], answer.headers.get("Gotg-Confirmed")


def _identity(data: bytes, sop_uid: str) -> dict[str, str]:
    md5 = hashlib.md5(data).hexdigest()
    return {"sop_uid": sop_uid, "codec": "identity", "payload_md5": md5, "original_md5": md5}


def _metadata(values: dict[str, str]) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items())


def _batch(members: list[tuple[bytes, dict]]) -> bytes:
    """A batch upload as the clinic makes it: a tar of payloads and their manifest."""
    buffer = io.BytesIO()
    manifest = [{"name": str(n), **meta} for n, (_, meta) in enumerate(members)]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()),
                           *((str(n), data) for n, (data, _) in enumerate(members))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _seed(hq: HQ, client: HQClient, env: Path) -> None:
    """Something for the fuzzer to meet: a confirmed upload, a refused one, a batch with a
    stored and a refused member, one in progress, a revision and the reconciliation entry it
    opened, an item queued for the site, a passphrase kept."""
    source = corpus.representative()[0]
    original = source.read_bytes()
    sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    confirmed, hq_id = _upload(client, original, _identity(original, sop_uid))
    assert hq_id and not hq_id.startswith("rev-")
    changed = pydicom.dcmread(source)
    changed.StudyDescription = "corrected at the modality"
    buffer = io.BytesIO()
    changed.save_as(buffer)
    corrected = buffer.getvalue()
    _, revision = _upload(client, corrected, _identity(corrected, sop_uid))
    assert revision and revision.startswith("rev-")
    refused, nothing = _upload(client, b"not DICOM", _identity(b"not DICOM", "1.2.3"))
    assert nothing is None
    batch = _batch([(original, _identity(original, sop_uid)),
                    (b"damaged", {**_identity(b"damaged", "1.2.4"), "payload_md5": "0" * 32})])
    batched, said = _upload(client, batch, {"codec": "batch",
                                            "payload_md5": hashlib.md5(batch).hexdigest()})
    assert said == "batch"
    started = client.create(100, _identity(b"x" * 100, "1.2.5"))
    client.append(started, 0, b"x" * 10)
    started = started.rsplit("/", 1)[1]
    # Uploads for the fuzzer's chunks: any one-byte chunk at 0 finishes a one-byte upload
    # (refused: not DICOM); the longer ones grow, or are offered too much.
    fresh = [client.create(n, _identity(b"?" * n, "1.2.6")).rsplit("/", 1)[1]
             for n in (1, 1, 1, 1, 2, 3, 5, 8, 64, 1000)]
    sent = run_pacs("hq", "send", "--site", "test-site", hq_id, "--json", env_file=env)
    assert sent.returncode == 0, sent.stderr
    [item] = client.waiting()[0]
    client.hand_over_passphrase("a-site's-backup-passphrase")
    [entry] = requests.get(f"{hq.url}/api/v1/reconciliation", headers=hq.auth("operator"),
                           timeout=30).json()["entries"]
    hq.seeded = {"seq": item["seq"], "md5": item["md5"], "entry": entry["id"]}
    uploads = [confirmed, refused, batched, started]
    seq, entry_id = {"seq": item["seq"]}, {"id": entry["id"]}
    hq.known = {
        "POST /files": [
            {"headers": {"Upload-Metadata": _metadata(_identity(b"", "1.2.7"))}},
            {"headers": {"Upload-Metadata": _metadata({"codec": "batch",
                                                       "payload_md5": "0" * 32})}}],
        "HEAD /files/{id}": [{"path_parameters": {"id": upload}} for upload in uploads],
        "PATCH /files/{id}": [
            *({"path_parameters": {"id": upload}} for upload in uploads + fresh),
            *({"path_parameters": {"id": upload}, "headers": {"Upload-Offset": "0"}}
              for upload in fresh),
            *({"path_parameters": {"id": upload}, "headers": {"Upload-Offset": "0"},
               "body": b"\0"} for upload in fresh[:4])],
        "GET /files/{id}/outcome": [{"path_parameters": {"id": upload}} for upload in uploads],
        "POST /api/v1/holdings": [{"body": {"instances": [
            {"sop_uid": sop_uid, "original_md5": hashlib.md5(original).hexdigest()},
            {"sop_uid": sop_uid, "original_md5": hashlib.md5(corrected).hexdigest()},
            {"sop_uid": "1.2.3", "original_md5": "0" * 32}]}}],
        "GET /api/v1/outbound/{seq}/file": [
            {"path_parameters": seq},
            {"path_parameters": seq, "headers": {"Range": "bytes=0-99"}},
            {"path_parameters": seq, "headers": {"Range": "bytes=99999999-"}}],
        "POST /api/v1/outbound/{seq}/ack": [
            {"path_parameters": seq},
            {"path_parameters": seq, "body": {"md5": item["md5"]}}],
        "GET /api/v1/originals/{md5}": [
            {"path_parameters": {"md5": hashlib.md5(original).hexdigest()},
             "query": {"sop_uid": sop_uid}},
            {"path_parameters": {"md5": hashlib.md5(corrected).hexdigest()},
             "query": {"sop_uid": sop_uid}, "headers": {"Range": "bytes=0-99"}},
            {"path_parameters": {"md5": hashlib.md5(original).hexdigest()},
             "query": {"sop_uid": sop_uid}, "headers": {"Range": "bytes=99999999-"}}],
        "GET /api/v1/reconciliation/{id}": [{"path_parameters": entry_id}],
        "POST /api/v1/reconciliation/{id}/resolve": [{"path_parameters": entry_id}],
        "GET /api/v1/revisions/{id}": [{"path_parameters": {"id": revision}}],
        "GET /api/v1/revisions/{id}/file": [{"path_parameters": {"id": revision}}],
    }


@pytest.fixture(scope="module")
def hq(tmp_path_factory, postgres):
    """A real HQ for the module (cheaper than the suite's per-test one): its Orthanc on
    PostgreSQL, the receiver as `pacs hq run`, a site's token, an operator's token."""
    folder = tmp_path_factory.mktemp("hq-fuzz")
    port = free_port()
    env = write_env(folder / "pacs.env", SITE_CODE="hq", HQ_RECEIVER_PORT=str(port),
                    **postgres.env(postgres.create_database()))
    archive = Appliance(env)
    running = None
    try:
        tokens = {}
        for scheme, args in (("site", ("site", "add", "test-site")),
                             ("operator", ("operator", "add", "fuzzing-operator"))):
            added = run_pacs("hq", *args, "--json", env_file=env)
            assert added.returncode == 0, added.stderr
            answer = json.loads(added.stdout)
            tokens[scheme] = answer.get("hq_token") or answer["token"]
        site = HQ(url=f"http://127.0.0.1:{port}", tokens=tokens, orthanc=archive.orthanc,
                  log=folder / "receiver.log")
        with open(site.log, "w") as log:
            running = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                        str(env), "hq", "run"], stdout=subprocess.DEVNULL,
                                       stderr=log)
        client = HQClient(site.url, tokens["site"], timeout=60)
        assert wait_until(lambda: hq_answers(client), 30), site.log.read_text()
        _seed(site, client, env)
        yield site
    finally:
        if running is not None:
            running.terminate()
            running.wait(30)
        archive.stop()


def _fuzz(strategy, examples: int, auth: dict[str, str], excluded: list) -> None:
    """`examples` requests drawn from `strategy`, each sent and validated (schemathesis's
    default checks, less `excluded`)."""

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_as_documented(case) -> None:
        case.call_and_validate(headers=auth, excluded_checks=excluded)

    answers_as_documented()


# --- the tests ----------------------------------------------------------------------------------

def test_the_description_is_every_route_the_receiver_serves(tmp_path):
    """A route added to the receiver without its description (or one described that the
    receiver does not serve) fails here."""
    app = receiver.create_app(config.load(write_env(tmp_path / "pacs.env")))
    served = set()
    for rule in app.url_map.iter_rules():
        methods = rule.methods - {"OPTIONS"} - ({"HEAD"} if "GET" in rule.methods else set())
        served |= {(method, re.sub(r"<[^>]*>", "{}", rule.rule)) for method in methods}
    operations = _operations()
    described = {(operation.method.upper(), re.sub(r"\{[^}]*\}", "{}", operation.path))
                 for operation in operations}
    assert len(operations) == OPERATIONS == len(described)
    assert described == served
    paths = yaml.safe_load(SPEC.read_text())["paths"]
    assert sum(len(set(methods) - {"parameters"}) for methods in paths.values()) == OPERATIONS


def test_every_operation_answers_as_documented(hq):
    """Each operation of the description, 25 generated requests (schemathesis's own pytest
    plugin does not run on this pytest: its strategies are driven here instead), about half
    of them aimed at uploads, items, entries and revisions HQ holds; then 10 that violate the
    description. Each with the token the description names."""
    operations = _operations(hq.url)
    assert len(operations) == OPERATIONS
    before = hq.instances()
    for operation in operations:
        auth = hq.auth(_scheme(operation))
        known = hq.known.get(_label(operation), [])
        for mode, examples, excluded in (
                # Schema-valid requests HQ refuses by design (an upload ID, queue number or
                # entry it does not know: 404; metadata that is not base64: 400; a chunk at
                # another offset: 409; a finished upload that is not DICOM: 422): documented.
                (GenerationMode.POSITIVE, EXAMPLES, [positive_data_acceptance]),
                # The receiver takes more than the description promises by design (an unknown
                # query parameter or header is ignored, Tus-Resumable is not checked, a body
                # that is not JSON asks nothing): only what it answers is checked.
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES,
                 [positive_data_acceptance, negative_data_rejection])):
            generated = operation.as_strategy(mode)
            aimed = [operation.as_strategy(mode, **overrides) for overrides in known]
            _fuzz(st.one_of(generated, st.one_of(*aimed)) if aimed else generated, examples,
                  auth, excluded)
    assert hq.instances() == before, "fuzzing the receiver stored no instance"
    assert "Traceback" not in hq.log.read_text()


def test_no_operation_answers_without_its_kind_of_token(hq):
    """No token, an unknown one, the right one under another scheme than Bearer, and the other
    kind's token: refused for every operation, before anything is read or done (the paths name
    things HQ holds). A site's token on an operator route is 403, the rest 401."""
    for operation in _operations(hq.url):
        scheme = _scheme(operation)
        other = "operator" if scheme == "site" else "site"
        aimed = next((overrides["path_parameters"] for overrides
                      in hq.known.get(_label(operation), []) if "path_parameters" in overrides),
                     {})
        url = hq.url + operation.path.format(**aimed)
        attempts = {
            "none": ({}, 401),
            "unknown": ({"Authorization": "Bearer not-a-token"}, 401),
            "not bearer": ({"Authorization": f"Basic {hq.tokens[scheme]}"}, 401),
            other: (hq.auth(other), 403 if scheme == "operator" else 401),
        }
        for name, (headers, status) in attempts.items():
            answer = requests.request(operation.method.upper(), url, headers=headers, timeout=30)
            assert answer.status_code == status, (_label(operation), name)
            assert str(status) in operation.definition.raw["responses"], _label(operation)


def test_requests_that_were_server_errors(hq):
    """Requests that answered 500 (a traceback in the receiver's log) before this description
    came, found by fuzzing it or by reading the routes to write it: each now gets the
    documented refusal, or an empty answer."""
    site, operator = hq.auth("site"), hq.auth("operator")
    huge = 2**64  # past SQLite's INTEGER

    def ask(method: str, path: str, headers: dict, **kwargs) -> requests.Response:
        return requests.request(method, hq.url + path, headers=headers, timeout=60, **kwargs)

    # PATCH with an Upload-Offset that is no number: treated as a missing one (where to go on).
    upload = HQClient(hq.url, hq.tokens["site"], timeout=60).create(
        10, _identity(b"x" * 10, "1.2.8"))
    for offset in ("abc", "\u00b2"):  # int() reads neither ("²" is a digit to isdigit())
        answer = requests.patch(upload, data=b"x", timeout=60,
                                headers={**site, "Upload-Offset": offset, "Content-Type": TUS})
        assert (answer.status_code, answer.headers.get("Upload-Offset")) == (409, "0")
    # The holdings question as something else than a list of questions.
    for body in ([1], {"instances": 5}, {"instances": "ab"}, {"instances": [1]}):
        assert ask("POST", "/api/v1/holdings", site, json=body).status_code == 400, body
    # Questions no instance can answer: a wildcard (Orthanc refuses to look it up), a lone
    # surrogate (no UTF-8 spelling).
    for uid in ("1.2.*", "1.?", "\ud800"):
        answer = ask("POST", "/api/v1/holdings", site,
                     json={"instances": [{"sop_uid": uid, "original_md5": "0" * 32}]})
        assert (answer.status_code, answer.json()) == (200, {"held": [None]}), uid
    # Numbers past SQLite's: nothing by that number.
    answer = ask("GET", f"/api/v1/outbound?after={huge}", site)
    assert (answer.status_code, answer.json()) == (200, {"items": [], "more": False})
    assert ask("GET", "/api/v1/outbound?after=%C2%B2", site).status_code == 400
    assert ask("GET", "/api/v1/outbound?limit=%C2%B2", site).status_code == 400
    assert ask("GET", f"/api/v1/outbound/{huge}/file", site).status_code == 404
    assert ask("POST", f"/api/v1/outbound/{huge}/ack", site, json={}).status_code == 404
    assert ask("GET", f"/api/v1/reconciliation/{huge}", operator).status_code == 404
    assert ask("POST", f"/api/v1/reconciliation/{huge}/resolve", operator,
               json={"decision": "acknowledged"}).status_code == 404
    # JSON bodies that are not objects.
    seq, entry = hq.seeded["seq"], hq.seeded["entry"]
    assert ask("POST", f"/api/v1/outbound/{seq}/ack", site, json=[1]).status_code == 409
    assert ask("PUT", "/api/v1/escrow", site, json=[1]).status_code == 400
    assert ask("PUT", "/api/v1/escrow", site, json="a-long-enough-passphrase").status_code == 400
    assert ask("POST", f"/api/v1/reconciliation/{entry}/resolve", operator,
               json=[1]).status_code == 400
    # The right MD5 with a clinic instance ID SQLite cannot store as text.
    assert ask("POST", f"/api/v1/outbound/{seq}/ack", site,
               json={"md5": hq.seeded["md5"], "clinic_id": "\ud800"}).status_code == 400
    # An instance whose own SOP Instance UID holds a wildcard (a modality's bug): Orthanc cannot
    # look it up, and every retry of its upload answered 500; now it is refused (422), and the
    # clinic keeps it and says so.
    wild = pydicom.dcmread(corpus.representative()[0])
    wild.SOPInstanceUID = wild.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.*"
    buffer = io.BytesIO()
    wild.save_as(buffer)
    data = buffer.getvalue()
    client = HQClient(hq.url, hq.tokens["site"], timeout=60)
    url = client.create(len(data), _identity(data, "1.2.826.0.1.3680043.*"))
    answer = requests.patch(url, data=data, timeout=60,
                            headers={**site, "Upload-Offset": "0", "Content-Type": TUS})
    assert answer.status_code == 422 and "cannot be looked up" in answer.text, answer.text
    # Not a server error, but answered {"held": true}: true and false are no byte offsets.
    answer = ask("POST", "/api/v1/audit", site,
                 json={"trail": "f" * 32, "start": False, "end": True, "events": []})
    assert answer.status_code == 400
    assert "Traceback" not in hq.log.read_text()
