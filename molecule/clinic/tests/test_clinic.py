"""The clinic's roles as the running box shows them (testinfra, through Ansible's nsenter)."""

from __future__ import annotations

import json
import shlex

VENV = "/opt/gotg-pacs/venv"
PASSWORD = "molecule-admin-pw"

# A modality's day, from inside the box with the venv's own pynetdicom: echo, store one image,
# then ask Orthanc's REST API (with and without the admin's password) what it holds.
MODALITY = """
import base64, json, sys, urllib.error, urllib.request
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
ds.PatientName, ds.PatientID, ds.Modality = "Molecule^Test", "MOL-1", "CR"
ds.Rows = ds.Columns = 8
ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
ds.BitsAllocated = ds.BitsStored = 16
ds.HighBit, ds.PixelRepresentation = 15, 0
ds.PixelData = bytes(range(128))
ae = AE(ae_title="MOLECULE")
ae.add_requested_context("1.2.840.10008.1.1")
ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", 4242, ae_title=sys.argv[1])
echo = assoc.send_c_echo().Status
store = assoc.send_c_store(ds).Status
assoc.release()

def get(path, password=None):
    request = urllib.request.Request("http://127.0.0.1:8042" + path)
    if password:
        token = base64.b64encode(("admin:" + password).encode()).decode()
        request.add_header("Authorization", "Basic " + token)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, None

print(json.dumps({"echo": echo, "store": store, "anonymous": get("/system")[0],
                  "system": get("/system", sys.argv[2])[1],
                  "studies": [get("/studies/" + s, sys.argv[2])[1]["MainDicomTags"]
                              ["StudyInstanceUID"] for s in get("/studies", sys.argv[2])[1]],
                  "sent": ds.StudyInstanceUID}))
"""


# The studies Orthanc holds, as its REST API lists them (the admin's password in argv[1]).
STUDIES = """
import base64, json, sys, urllib.request
request = urllib.request.Request("http://127.0.0.1:8042/studies?expand")
token = base64.b64encode(("admin:" + sys.argv[1]).encode()).decode()
request.add_header("Authorization", "Basic " + token)
with urllib.request.urlopen(request, timeout=30) as answer:
    print(json.dumps(sorted(s["MainDicomTags"]["StudyInstanceUID"] for s in json.load(answer))))
"""


def _show(host, unit: str) -> dict[str, str]:
    shown = host.run(f"systemctl show {unit} -p User -p ProtectSystem -p NoNewPrivileges "
                     "-p PrivateTmp -p MemoryMax").stdout
    return dict(line.split("=", 1) for line in shown.split())


def test_orthanc_and_sync_run_sandboxed_as_their_own_users(host):
    for unit, user, memory in (("orthanc", "orthanc", 1 << 30),
                               ("pacs-sync", "gotg-pacs", 256 << 20),
                               ("pacs-web", "gotg-pacs", 128 << 20),
                               ("pacs-ris", "gotg-pacs", 128 << 20)):
        assert host.service(unit).is_enabled and host.service(unit).is_running, unit
        assert _show(host, unit) == {"User": user, "ProtectSystem": "strict",
                                     "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                                     "MemoryMax": str(memory)}, unit
    # The RIS bridge's worklist folder: its own, readable by Orthanc through the group.
    folder = host.file("/var/lib/gotg-pacs/state/ris/worklists")
    assert (folder.user, folder.group, folder.mode) == ("gotg-pacs", "gotg-pacs", 0o750)
    assert host.run("systemctl show orthanc -p SupplementaryGroups").stdout.strip() == \
        "SupplementaryGroups=gotg-pacs"


def test_pacs_came_from_the_shipped_wheelhouse_and_is_a_command(host):
    releases = host.file("/opt/gotg-pacs/wheelhouse").listdir()
    assert len(releases) == 1, releases
    version = releases[0]
    shipped = host.file(f"/opt/gotg-pacs/wheelhouse/{version}/VERSION")
    assert shipped.content_string.strip() == version
    installed = host.run(f"{VENV}/bin/pip show gotg-pacs").stdout
    assert f"Version: {version}" in installed.splitlines()
    assert host.file("/usr/local/bin/pacs").linked_to == f"{VENV}/bin/pacs"
    assert version in host.check_output("pacs --version")


def test_the_sites_configuration_is_valid_and_kept_from_other_users(host):
    env = host.file("/etc/gotg-pacs/pacs.env")
    assert (env.user, env.group, env.mode) == ("root", "gotg-pacs", 0o640)
    assert env.contains('^SITE_CODE="field-9"$') and env.contains('^PACS_AET="FIELD9"$')
    assert host.run("pacs config check").rc == 0
    storage = host.file("/var/lib/gotg-pacs/orthanc")
    assert (storage.user, storage.mode) == ("orthanc", 0o700)


def test_a_modality_stores_a_study_and_the_archive_shows_it(host):
    ran = host.run(f"{VENV}/bin/python -c {shlex.quote(MODALITY)} FIELD9 {PASSWORD}")
    assert ran.rc == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["echo"] == 0 and seen["store"] == 0, seen
    assert seen["anonymous"] == 401, "Orthanc's REST API wants the admin's password"
    assert seen["system"]["Name"] == 'Field <b>9</b> & "clinic"'
    assert seen["system"]["DicomAet"] == "FIELD9"
    assert seen["sent"] in seen["studies"]
    status = host.run("pacs status --json")
    assert status.rc == 0, status.stdout + status.stderr


def test_the_timer_backs_up_to_the_usb_disk_and_never_to_the_images_own_disk(host):
    for name in ("pacs-backup", "pacs-backup-check", "pacs-backup-verify", "pacs-backup-drill",
                 "pacs-integrity"):
        timer = host.service(f"{name}.timer")
        assert timer.is_enabled and timer.is_running, name
    declared = host.run("findmnt --fstab --noheadings -o SOURCE,FSTYPE,OPTIONS /mnt/backup").stdout
    assert declared.split()[:2] == ["LABEL=GOTG-BACKUP", "ext4"] and "nofail" in declared
    # No USB disk: /mnt/backup is a folder of the root file system, like the images.
    host.run("mkdir -p /mnt/backup")
    refused = host.run("systemctl start pacs-backup.service")
    assert refused.rc != 0
    said = host.run("journalctl -u pacs-backup.service --no-pager -n 20").stdout
    assert "nothing is mounted at BACKUP_PATH" in said, said
    assert not host.file("/mnt/backup/gotg-pacs.borg").exists
    # The disk is plugged in: the same unit, sandboxed as it is, backs up to it.
    assert host.run("mount -t tmpfs -o size=2g usb-backup /mnt/backup").rc == 0
    try:
        ran = host.run("systemctl start pacs-backup.service")
        assert ran.rc == 0, host.run("journalctl -u pacs-backup.service --no-pager -n 30").stdout
        archives = json.loads(host.check_output("pacs backup list --json"))
        assert len(archives) == 1 and archives[0]["name"].startswith("field-9-")
        # The checks, sandboxed as their timers run them, work on that backup.
        for unit in ("pacs-backup-check", "pacs-backup-drill", "pacs-integrity"):
            done = host.run(f"systemctl start {unit}.service")
            assert done.rc == 0, host.run(f"journalctl -u {unit} --no-pager -n 30").stdout
        backup = json.loads(host.check_output("pacs status --json"))["backup"]
        assert {kind: outcome["ok"] for kind, outcome in backup["checks"].items()} == \
            {"check": True, "drill": True, "integrity": True}
        # The sandboxed unit paused Orthanc (another user's process) to copy its index.
        assert 0 <= backup["index"]["index_pause_ms"] < 1000, backup["index"]
        # A backup unit that stops while Orthanc is frozen (killed mid-copy) thaws it.
        main = host.check_output("systemctl show -p MainPID --value orthanc.service")
        assert host.run(f"kill -STOP {main}").rc == 0
        assert host.run(f"grep -q '^State:.*stopped' /proc/{main}/status").rc == 0
        assert host.run("systemctl start pacs-backup-check.service").rc == 0
        assert host.run(f"grep -q '^State:.*stopped' /proc/{main}/status").rc == 1, \
            "Orthanc runs again"
        _the_disk_dies_and_restore_brings_back_index_files_and_services(host)
    finally:
        host.run("umount /mnt/backup")


def _the_disk_dies_and_restore_brings_back_index_files_and_services(host):
    """The images' disk replaced: Orthanc runs empty; `pacs restore` stops it and the sync
    service, puts the archive's index and files back, and starts them again."""
    studies = f"{VENV}/bin/python -c {shlex.quote(STUDIES)} {PASSWORD}"
    before = json.loads(host.check_output(studies))
    assert before
    assert host.run("systemctl stop pacs-sync orthanc").rc == 0
    assert host.run("mv /var/lib/gotg-pacs/orthanc /var/lib/gotg-pacs/orthanc-dead").rc == 0
    assert host.run("install -d -o orthanc -g orthanc -m 0700 /var/lib/gotg-pacs/orthanc").rc == 0
    assert host.run("systemctl start orthanc pacs-sync").rc == 0
    assert json.loads(host.check_output(studies)) == []
    restored = host.run("pacs restore --latest --json")
    assert restored.rc == 0, restored.stdout + restored.stderr
    report = json.loads(restored.stdout)
    assert (report["mode"], report["failed"], report["missing"]) == ("whole", [], [])
    assert report["stopped"] == ["pacs-sync.service", "orthanc.service"]
    assert host.service("orthanc").is_running and host.service("pacs-sync").is_running
    assert json.loads(host.check_output(studies)) == before
    owners = host.run("find /var/lib/gotg-pacs/orthanc ! -user orthanc").stdout.split()
    assert owners == [], "Orthanc's user owns every file and folder put back"


# Through the HTTPS origin as a tablet on the LAN would go, trusting only the box's own CA:
# the admin's first sign-in (ADMIN_PASSWORD, argv[1]) and the password change it asks for.
ORIGIN = """
import json, sys, requests
ca, base = "/var/lib/gotg-pacs/state/tls/ca-chain.crt", "https://localhost"
plain = requests.get("http://127.0.0.1/orthanc/system", allow_redirects=False, timeout=10)
anonymous = requests.get(base + "/orthanc/system", verify=ca, timeout=10)
signed = requests.post(base + "/auth/login", verify=ca, timeout=30,
                       json={"user": "admin", "password": sys.argv[1]})
cookie = {"Cookie": "pacs_session=" + signed.cookies["pacs_session"]}
before = requests.get(base + "/orthanc/system", verify=ca, timeout=10, headers=cookie)
changed = requests.post(base + "/auth/password", verify=ca, timeout=30, headers=cookie,
                        json={"old": sys.argv[1], "new": "field nine's own secret"})
secure = requests.get(base + "/orthanc/system", verify=ca, timeout=10, headers=cookie)
print(json.dumps({"redirect": [plain.status_code, plain.headers.get("Location")],
                  "anonymous": anonymous.status_code, "must_change": before.status_code,
                  "changed": changed.status_code, "aet": secure.json()["DicomAet"],
                  "hsts": secure.headers.get("Strict-Transport-Security")}))
"""
# Once the password is changed: the origin still serves (after a reload, say).
SERVING = """
import requests
answer = requests.get("https://localhost/gotg-pacs-ca.crt", timeout=10,
                      verify="/var/lib/gotg-pacs/state/tls/ca-chain.crt")
print(answer.status_code)
"""


WORKERS = """
import sys, psutil
print(" ".join(child.username() for child in psutil.Process(int(sys.argv[1])).children()))
"""


def test_tablets_reach_the_archive_only_through_https_with_the_boxs_own_ca(host):
    """nginx, sandboxed, is the one door; the CA it serves was made on this box at its first
    start and its key is root's alone."""
    assert host.service("nginx").is_enabled and host.service("nginx").is_running
    assert _show(host, "nginx")["ProtectSystem"] == "strict"
    key = host.file("/var/lib/gotg-pacs/state/tls/ca.key")
    assert (key.user, key.mode) == ("root", 0o600)
    ran = host.run(f"{VENV}/bin/python -c {shlex.quote(ORIGIN)} {PASSWORD}")
    assert ran.rc == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["redirect"] == [301, "https://127.0.0.1/orthanc/system"]
    assert (seen["anonymous"], seen["must_change"], seen["changed"]) == (401, 403, 200)
    assert seen["aet"] == "FIELD9"
    assert seen["hsts"] == "max-age=31536000"
    main = host.check_output("systemctl show -p MainPID --value nginx")
    workers = host.check_output(f"{VENV}/bin/python -c {shlex.quote(WORKERS)} {main}")
    assert set(workers.split()) == {"www-data"}, workers
    shown = json.loads(host.check_output("pacs tls show --json"))
    assert "localhost" in shown["server_names"] and not shown["signed_by_hq"]
    # The renewal timer reloads nginx through the sandboxed unit; it keeps serving.
    assert host.service("nginx-renew.timer").is_enabled
    renewed = host.run("systemctl start nginx-renew.service")
    assert renewed.rc == 0, host.run("journalctl -u nginx --no-pager -n 20").stdout
    assert host.check_output("systemctl show -p MainPID --value nginx") == main
    again = host.run(f"{VENV}/bin/python -c {shlex.quote(SERVING)}")
    assert again.rc == 0 and again.stdout.strip() == "200", again.stderr
