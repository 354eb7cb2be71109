#!/bin/bash
# Apply this USB update bundle to this box: the playbook HQ would push, run here, offline.
#
#   sudo /media/usb/gotg-update-SITE-VERSION/apply
#
# The bundle carries HQ's settings for one site without its secrets; the box keeps its own
# (ADMIN_PASSWORD, HQ_TOKEN, ...). A damaged bundle, a bundle for another site, or a box that is
# not a GOTG PACS changes nothing. Every run is logged in /var/lib/gotg-pacs/updates/.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

here=$(cd "$(dirname "$0")" && pwd)
env_file=/etc/gotg-pacs/pacs.env
pacs=/opt/gotg-pacs/venv/bin/pacs

fail() { echo "gotg-update: $*: nothing changed" >&2; exit 2; }

[ "$(id -u)" = 0 ] || fail "run it as root (sudo $0)"
[ -x "$pacs" ] && [ -f "$env_file" ] || fail "this box is not a GOTG PACS ($env_file missing)"
cd "$here"
sha256sum --quiet --strict -c MANIFEST.sha256 2>/dev/null \
    || fail "the bundle is damaged (its checksums do not match): copy it again"

field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
bundle_site=$(field site-vars.json pacs_config_site_code)
host=$(field bundle.json host)
version=$(cat VERSION)
box_site=$("$pacs" --env-file "$env_file" config check --json \
           | python3 -c 'import json, sys; print(json.load(sys.stdin)["settings"]["SITE_CODE"])') \
    || fail "this box's $env_file does not load"
[ "$bundle_site" = "$box_site" ] \
    || fail "this bundle is for site '$bundle_site', this box is site '$box_site'"

work=$(mktemp -d /run/gotg-update.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0700 "$work"
"$pacs" --env-file "$env_file" config ansible-vars --secrets-only --out "$work/box-secrets.json" \
    >/dev/null
printf 'clinics:\n  hosts:\n    %s:\n      ansible_connection: local\n' "$host" > "$work/hosts.yml"

logs=/var/lib/gotg-pacs/updates
mkdir -p "$logs"
log="$logs/$(date -u +%Y%m%dT%H%M%SZ)-$version.log"
echo "gotg-update: applying gotg-pacs $version for site $box_site (log: $log)"
set +e
PYTHONPATH="$here/tools" ANSIBLE_CONFIG="$here/ansible/ansible.cfg" \
ANSIBLE_COLLECTIONS_PATH="$here/collections" ANSIBLE_LOCAL_TEMP="$work/tmp" \
ANSIBLE_NOCOLOR=1 PYTHONDONTWRITEBYTECODE=1 \
    python3 -m ansible.cli.playbook -i "$work/hosts.yml" "$here/ansible/clinic.yml" \
    -e "@$here/site-vars.json" -e "@$work/box-secrets.json" \
    -e "pacs_services_wheelhouse=$here/wheelhouse" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "gotg-update: the update FAILED (exit $status); the log says where: $log" >&2
    exit 1
fi
echo "gotg-update: done, gotg-pacs $version is installed"
