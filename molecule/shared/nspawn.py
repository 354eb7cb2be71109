"""Boxes for the role scenarios: Debian 13 trees booted with `systemd-nspawn --boot`.

There is no Docker engine on these machines, so the scenarios' create and destroy steps call this:

    python molecule/shared/nspawn.py up NAME STATE_DIR [--packages a,b,...]
    python molecule/shared/nspawn.py down NAME STATE_DIR

`up` makes (once, cached in build/molecule/) a minimal Debian 13 tree with the packages the role
installs, so a converge needs no network: the box has its own network namespace with no route
out, and its firewall never touches this machine's. Each box boots from an overlay over that
tree, reached by Ansible through `community.docker.nsenter`; its init's PID goes to
STATE_DIR/NAME.pid. `down` stops it and removes the overlay.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "services"))
sys.path.insert(0, str(REPO / "image-build"))
import rootfs  # noqa: E402

from tests.support.container import Container, Overlay  # noqa: E402

CACHE = REPO / "build" / "molecule"


def base_tree(packages: list[str]) -> Path:
    """A booted-ready minimal tree with these packages, built once per package set."""
    key = hashlib.sha256(",".join(sorted(packages)).encode()).hexdigest()[:12]
    tree = CACHE / f"trixie-{key}"
    if (tree / "etc/os-release").exists():
        return tree
    partial = tree.with_name(tree.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    rootfs.build("container", partial, None, log=subprocess.DEVNULL, bare=True,
                 extra_packages=tuple(packages))
    partial.rename(tree)
    return tree


def up(name: str, state: Path, packages: list[str]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    overlay = Overlay(base_tree(packages), state / f"{name}.overlay")
    box = Container(overlay.merged, state / f"{name}.console")
    if not box.wait_booted():
        box.kill()
        overlay.close()
        raise SystemExit(f"{name} did not boot: {box.console_text()}")
    (state / f"{name}.pid").write_text(f"{box.init_pid}\n")
    (state / f"{name}.nspawn").write_text(f"{box.process.pid}\n")


def down(name: str, state: Path) -> None:
    nspawn = state / f"{name}.nspawn"
    if nspawn.exists():
        pid = nspawn.read_text().strip()
        subprocess.run(["kill", "-TERM", pid], capture_output=True)
        subprocess.run(["timeout", "60", "tail", f"--pid={pid}", "-f", "/dev/null"],
                       capture_output=True)
        subprocess.run(["kill", "-KILL", pid], capture_output=True)
    merged = state / f"{name}.overlay" / "merged"
    if merged.exists():
        subprocess.run(["umount", "--lazy", str(merged)], capture_output=True)
    shutil.rmtree(state / f"{name}.overlay", ignore_errors=True)
    for suffix in (".pid", ".nspawn", ".console"):
        (state / f"{name}{suffix}").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("name")
    parser.add_argument("state", type=Path)
    parser.add_argument("--packages", default="")
    args = parser.parse_args()
    if args.action == "up":
        up(args.name, args.state, [p for p in args.packages.split(",") if p])
    else:
        down(args.name, args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
