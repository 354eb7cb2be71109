"""HQ's server as ansible/hq.yml leaves it, seen from inside (testinfra, through Ansible's
nsenter): every clinic's studies, and their backups, end up here."""

from __future__ import annotations

import json
import shlex

VENV = "/opt/gotg-pacs/venv"

# Orthanc's /system as the admin sees it, and the receiver's answer to a holdings question
# with the given bearer token (none: no Authorization header at all).
ASK = """
import base64, json, sys, urllib.error, urllib.request

def call(url, headers, body=None):
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, None

basic = base64.b64encode(b"admin:molecule-hq-pw").decode()
token = sys.argv[1] if len(sys.argv) > 1 else ""
holdings = call("http://127.0.0.1:7000/api/v1/holdings",
                {"Content-Type": "application/json",
                 **({"Authorization": "Bearer " + token} if token else {})},
                json.dumps({"instances": []}).encode())
print(json.dumps({"system": call("http://127.0.0.1:8042/system",
                                 {"Authorization": "Basic " + basic})[1],
                  "holdings": holdings[0]}))
"""


def _ask(host, *token: str) -> dict:
    ran = host.run(f"{VENV}/bin/python -c {shlex.quote(ASK)} {' '.join(token)}")
    assert ran.rc == 0, ran.stderr
    return json.loads(ran.stdout)


def test_orthanc_keeps_its_index_in_the_database_the_role_made(host):
    assert host.service("postgresql").is_enabled and host.service("postgresql").is_running
    owner = host.run("runuser -u postgres -- psql -tA -c "
                     "\"select pg_get_userbyid(datdba) from pg_database where datname='orthanc'\"")
    assert owner.stdout.strip() == "orthanc", owner.stdout + owner.stderr
    assert host.service("orthanc").is_running
    assert _ask(host)["system"]["DatabaseBackendPlugin"], "not the SQLite file beside it"
    tables = host.run("runuser -u postgres -- psql -tA -d orthanc -c "
                      "\"select count(*) from information_schema.tables "
                      "where table_name = 'resources'\"").stdout.strip()
    assert tables == "1"
    assert not host.file("/var/lib/gotg-pacs/orthanc/index/index").exists, "no SQLite index"


def test_the_receiver_runs_sandboxed_and_answers_only_sites_with_a_credential(host):
    assert host.service("pacs-hq").is_enabled and host.service("pacs-hq").is_running
    assert not host.file("/etc/systemd/system/pacs-sync.service").exists, "HQ syncs to nobody"
    shown = dict(line.split("=", 1) for line in host.run(
        "systemctl show pacs-hq -p User -p ProtectSystem -p MemoryMax").stdout.split())
    assert shown == {"User": "gotg-pacs", "ProtectSystem": "strict", "MemoryMax": str(1 << 30)}
    assert _ask(host)["holdings"] == 401
    added = host.run("pacs hq site add molecule-site --json")
    assert added.rc == 0, added.stderr
    token = json.loads(added.stdout)["hq_token"]
    assert _ask(host, token)["holdings"] == 200
    assert host.run("pacs hq site revoke molecule-site").rc == 0
    assert _ask(host, token)["holdings"] == 401, "a revoked site is refused at once"


# The receiver as a clinic reaches it: through HQ's HTTPS origin under /sync/, HQ's own CA
# trusted, with the given bearer token (none: no Authorization header).
THROUGH_HTTPS = """
import json, ssl, sys, urllib.error, urllib.request

context = ssl.create_default_context(cafile="/var/lib/gotg-pacs/state/tls/ca.crt")
token = sys.argv[1] if len(sys.argv) > 1 else ""
request = urllib.request.Request(
    "https://localhost/sync/api/v1/holdings", data=json.dumps({"instances": []}).encode(),
    headers={"Content-Type": "application/json",
             **({"Authorization": "Bearer " + token} if token else {})})
try:
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        print(answer.status, answer.headers.get("Strict-Transport-Security"))
except urllib.error.HTTPError as refused:
    print(refused.code, refused.headers.get("Strict-Transport-Security"))
"""


def test_clinics_reach_the_receiver_only_through_https_under_sync(host):
    assert host.service("nginx").is_enabled and host.service("nginx").is_running
    added = host.run("pacs hq site add molecule-https --json")
    assert added.rc == 0, added.stderr
    token = json.loads(added.stdout)["hq_token"]
    ask = f"{VENV}/bin/python -c {shlex.quote(THROUGH_HTTPS)}"
    assert host.check_output(f"{ask} {token}") == "200 max-age=31536000"
    assert host.check_output(ask) == "401 max-age=31536000"
    listening = host.check_output("ss -Htln 'sport = :7000'")
    assert "127.0.0.1:7000" in listening and "0.0.0.0:7000" not in listening, listening


def test_the_sites_backups_are_kept_append_only_and_pruned_by_hq_as_their_owner(host):
    account = host.user("gotg-backup")
    assert account.shell == "/bin/sh" and account.home == "/var/lib/gotg-backup"
    folder = host.file("/srv/gotg-backups")
    assert (folder.user, folder.mode) == ("gotg-backup", 0o700)
    keys = host.file("/var/lib/gotg-backup/.ssh/authorized_keys")
    assert (keys.user, keys.mode) == ("gotg-backup", 0o600)
    assert keys.content_string.startswith(
        'restrict,command="borg serve --append-only --restrict-to-repository '
        '/srv/gotg-backups/field-9.borg" ssh-ed25519 ')
    for job in ("prune", "check", "verify"):
        timer = host.service(f"pacs-hq-backups-{job}.timer")
        assert timer.is_enabled and timer.is_running, job
    # A site's repository with three archives of one day, as borg serve leaves it, and the
    # site's passphrase in HQ's escrow.
    borg = "runuser -u gotg-backup -- env BORG_PASSPHRASE=site-secret borg"
    repo = "/srv/gotg-backups/field-9.borg"
    assert host.run(f"{borg} init -e repokey-blake2 {repo}").rc == 0
    for n in range(3):
        made = host.run(f"{borg} create {repo}::field-9-2026-11-26T10:0{n}:00.000000 /etc/hostname")
        assert made.rc == 0, made.stderr
    escrow = json.dumps({"passphrases": [{"passphrase": "site-secret", "since": 0}]})
    host.run("install -d -m 0700 /var/lib/gotg-pacs/state/hq/escrow")
    assert host.run(f"printf %s {shlex.quote(escrow)} > "
                    "/var/lib/gotg-pacs/state/hq/escrow/field-9.json").rc == 0
    pruned = host.run("systemctl start pacs-hq-backups-prune.service")
    said = host.run("journalctl -u pacs-hq-backups-prune.service --no-pager -n 20").stdout
    assert pruned.rc == 0, said
    assert "field-9: 1 pruned, 2 kept (first audit)" in said, said
    listed = host.run(f"{borg} list --short {repo}").stdout.split()
    assert listed == ["field-9-2026-11-26T10:00:00.000000", "field-9-2026-11-26T10:02:00.000000"]
    # Every chunk read and verified on HQ's disks, by the monthly unit.
    verified = host.run("systemctl start pacs-hq-backups-verify.service")
    said = host.run("journalctl -u pacs-hq-backups-verify.service --no-pager -n 20").stdout
    assert verified.rc == 0, said
    assert "field-9: ok" in said, said
    # borg ran as the repositories' owner: nothing in them is root's, the sites still write.
    assert host.run("find /srv/gotg-backups ! -user gotg-backup").stdout.split() == []



def test_a_site_logs_in_through_base_and_reaches_only_its_own_repository(host):
    """A clinic's borg over SSH as it really connects: through base's sshd (AllowUsers, keys
    only) into the backup account, where the key's forced command serves one repository,
    append-only, and nothing else (a shell, another site's repository)."""
    key = "/root/site-key"
    assert host.run(f"rm -f {key} {key}.pub && ssh-keygen -q -t ed25519 -N '' -f {key}").rc == 0
    public = host.file(f"{key}.pub").content_string.strip()
    keys = "/var/lib/gotg-backup/.ssh/authorized_keys"
    line = ('restrict,command="borg serve --append-only --restrict-to-repository '
            f'/srv/gotg-backups/site-ssh.borg" {public}')
    assert host.run(f"cp -p {keys} {keys}.saved && printf '%s\\n' {shlex.quote(line)} "
                    f">> {keys}").rc == 0
    ssh = (f"ssh -i {key} -o BatchMode=yes -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null")
    borg = (f"env BORG_RSH={shlex.quote(ssh)} BORG_PASSPHRASE=site-secret "
            "BORG_BASE_DIR=/root/site-borg borg")
    site = "ssh://gotg-backup@127.0.0.1/srv/gotg-backups"
    try:
        made = host.run(f"{borg} init -e repokey-blake2 {site}/site-ssh.borg")
        assert made.rc == 0, made.stderr
        created = host.run(f"{borg} create {site}/site-ssh.borg::first /etc/hostname")
        assert created.rc == 0, created.stderr
        listed = host.run("runuser -u gotg-backup -- env BORG_PASSPHRASE=site-secret borg "
                          "list --short /srv/gotg-backups/site-ssh.borg")
        assert listed.stdout.split() == ["first"], listed.stderr
        other = host.run(f"{borg} list {site}/field-9.borg")
        assert other.rc != 0 and "not allowed" in other.stderr.lower(), other.stderr
        shell = host.run(f"{ssh} gotg-backup@127.0.0.1 cat /etc/passwd")
        assert "root:" not in shell.stdout, "the key runs borg serve, never a command asked"
    finally:
        host.run(f"mv {keys}.saved {keys}; rm -rf /srv/gotg-backups/site-ssh.borg "
                 f"/root/site-borg {key} {key}.pub")
