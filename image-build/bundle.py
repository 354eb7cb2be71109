"""A USB update bundle for one clinic that no push can reach: the push, carried by hand.

A site offline for weeks still gets its update: HQ writes this bundle to a USB stick, anyone at
the site plugs it in and runs `sudo .../apply`. The bundle holds everything the playbook needs,
so the box needs no network at all:

- `ansible/clinic.yml` and `roles/`: exactly what HQ pushes;
- `site-vars.json`: the clinic roles' variables for the site from HQ's inventory, **without its
  secrets** (a stick can be lost; the box keeps its own ADMIN_PASSWORD, HQ_TOKEN, ...);
- `wheelhouse/`: gotg-pacs and its dependencies for the box's CPU and Python;
- `tools/` and `collections/`: ansible-core (same version HQ runs) for the box's Python, and the
  collections the clinic roles use;
- `MANIFEST.sha256`, checked before anything runs.

    python image-build/bundle.py --host mobile-3 [--inventory ansible/inventory/example/hosts.yml]
        [--arch amd64] [--wheelhouse build/wheelhouse/amd64] [--out build/bundles]

Writes gotg-update-HOST-VERSION.tar and its .sha256 (sha256sum format).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheelhouse  # noqa: E402  (this folder is scripts, not a package)

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ["ansible/posix"]  # what the clinic roles use beyond ansible.builtin
PLAYBOOKS = ["clinic.yml", "ansible.cfg"]
ROLE_PREFIXES = ("base_", "pacs_services_", "pacs_config_", "orthanc_", "backup_", "clinic_")


def site_variables(inventory: Path, host: str) -> dict:
    """The host's variables as HQ's push would see them, less secrets and connection details."""
    from gotg_pacs.config import schema
    from gotg_pacs.reference import role_variable

    shown = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i",
                            str(inventory), "--host", host], capture_output=True, text=True,
                           env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible/ansible.cfg")})
    if shown.returncode != 0:
        raise SystemExit(f"cannot read {host} from {inventory}: {shown.stderr.strip()}")
    values = json.loads(shown.stdout)
    secrets = {role_variable(info) for info in schema() if info.secret}
    # Only the clinic roles' own (prefixed) variables: never a vault_* value, a connection
    # detail or anything else the inventory happens to hold.
    kept = {name: value for name, value in values.items()
            if name.startswith(ROLE_PREFIXES) and name not in secrets}
    if not kept.get("pacs_config_site_code"):
        raise SystemExit(f"{host} has no pacs_config_site_code in {inventory}: a bundle is made "
                         "for one site, and the box checks it is that site")
    return kept


def _ansible_core_version() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("ansible-core=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit("constraints.txt pins no ansible-core")


def install_tools(target: Path, arch: str) -> None:
    """ansible-core and its dependencies, unpacked for the box's Python (run with PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "--target", str(target), "--only-binary=:all:", "--no-compile",
                    "--python-version", wheelhouse.TARGET_PYTHON, "--implementation", "cp",
                    *[arg for p in wheelhouse.platforms(arch) for arg in ("--platform", p)],
                    "-c", str(ROOT / "constraints.txt"),
                    f"ansible-core=={_ansible_core_version()}"], check=True)
    for unused in ("bin", "ansible_test"):  # scripts made for this machine's Python; test tools
        shutil.rmtree(target / unused, ignore_errors=True)


def _collections_root() -> Path:
    import ansible_collections

    return Path(ansible_collections.__path__[0])


def build(host: str, inventory: Path, arch: str, wheels: Path, out_dir: Path) -> dict:
    version = (wheels / "VERSION").read_text().strip()
    variables = site_variables(inventory, host)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"gotg-update-{host}-{version}"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bundle-") as scratch:
        top = Path(scratch) / name
        top.mkdir()
        shutil.copy2(ROOT / "image-build" / "update-apply.sh", top / "apply")
        (top / "VERSION").write_text(version + "\n")
        (top / "site-vars.json").write_text(json.dumps(variables, indent=1) + "\n")
        (top / "bundle.json").write_text(json.dumps({"host": host, "arch": arch,
                                                     "version": version}) + "\n")
        (top / "ansible").mkdir()
        for playbook in PLAYBOOKS:
            shutil.copy2(ROOT / "ansible" / playbook, top / "ansible" / playbook)
        shutil.copytree(ROOT / "roles", top / "roles")
        for collection in COLLECTIONS:
            shutil.copytree(_collections_root() / collection,
                            top / "collections/ansible_collections" / collection,
                            ignore=shutil.ignore_patterns("__pycache__", "tests"))
        shutil.copytree(wheels, top / "wheelhouse")
        install_tools(top / "tools", arch)
        files = sorted(p for p in top.rglob("*") if p.is_file())
        manifest = [f"{_sha256(p)}  {p.relative_to(top)}" for p in files]
        (top / "MANIFEST.sha256").write_text("\n".join(manifest) + "\n")
        bundle = out_dir / f"{name}.tar"
        with tarfile.open(bundle, "w") as tar:
            tar.add(top, arcname=name, filter=_owned_by_root)
    Path(f"{bundle}.sha256").write_text(f"{_sha256(bundle)}  {bundle.name}\n")
    return {"bundle": str(bundle), "host": host, "version": version, "arch": arch,
            "bytes": bundle.stat().st_size, "site_code": variables["pacs_config_site_code"]}


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="The site's name in HQ's inventory.")
    parser.add_argument("--inventory", type=Path,
                        default=ROOT / "ansible" / "inventory" / "example" / "hosts.yml")
    parser.add_argument("--arch", choices=sorted(wheelhouse.PLATFORMS), default="amd64")
    parser.add_argument("--wheelhouse", type=Path, default=None,
                        help="Built by make wheelhouse [default: build/wheelhouse/ARCH].")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bundles")
    args = parser.parse_args()
    wheels = args.wheelhouse or ROOT / "build" / "wheelhouse" / args.arch
    if not (wheels / "VERSION").is_file():
        raise SystemExit(f"{wheels} is no wheelhouse: make wheelhouse ARCH={args.arch}")
    print(json.dumps(build(args.host, args.inventory, args.arch, wheels, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
