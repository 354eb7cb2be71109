"""Build the wheelhouse HQ ships with every push: gotg-pacs and all it needs, as wheels.

A clinic may have no internet at all, so the pacs_services role installs only from this folder
(`pip --no-index`). The wheels are for the image's Python (Debian 13: CPython 3.13) and CPU, and
every version comes from constraints.txt, the same pins the tests ran with.

    python image-build/wheelhouse.py --arch amd64|arm64 [--out build/wheelhouse/ARCH]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = {"amd64": "x86_64", "arm64": "aarch64"}
TARGET_PYTHON = "3.13"  # Debian 13 "trixie"


def platforms(arch: str) -> list[str]:
    """pip's platform tags for wheels that run on the image's Debian 13 on this CPU."""
    machine = PLATFORMS[arch]
    return [f"manylinux_2_{minor}_{machine}" for minor in (17, 28, 34, 39)] + \
        [f"manylinux2014_{machine}"]


def build(arch: str, out: Path) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = project["version"]
    fresh = out.with_name(out.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(fresh),
                    str(ROOT)], check=True)
    subprocess.run([*pip, "download", "--only-binary=:all:", "-d", str(fresh),
                    "--python-version", TARGET_PYTHON, "--implementation", "cp",
                    *[arg for p in platforms(arch) for arg in ("--platform", p)],
                    "-c", str(ROOT / "constraints.txt"), *project["dependencies"]], check=True)
    (fresh / "VERSION").write_text(version + "\n")
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    return version


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(PLATFORMS), required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "build" / "wheelhouse" / args.arch
    version = build(args.arch, out)
    wheels = sorted(p.name for p in out.glob("*.whl"))
    print(f"gotg-pacs {version} for {args.arch}: {len(wheels)} wheels in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
