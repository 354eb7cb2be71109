"""make bench-image [TARGET=nuc|pi4]: an appliance image against a bare Debian image of the same
kind, same run.

Both images come from image-build/image.py: the appliance as a clinic gets it, and `--bare`, the
same Debian 13 with the same packages, file systems and network, without the playbook. Both are
booted the same way, 2 vCPUs and 1 GB under TCG: the NUC's with UEFI on qemu-system-x86_64, the
Pi 4's own kernel, initramfs and command line on qemu-system-aarch64's `virt` board (there is no
Pi 4 model). Each boots from a fresh copy of its image on a disk 2 GB larger, twice: the first
boot (the appliance grows its disk and makes its keys), then, after a clean power-off (the Pi:
the plug pulled, see run_side), an ordinary boot. Measured from qemu's start:

- appliance: until a DICOM C-ECHO is answered (DICOM-ready) and until the console offers a login;
- bare Debian: until the console offers a login (it has no DICOM);

and, a minute after the appliance's ordinary boot, its memory as the box reports it over SSH:
the resident memory of every process (the target: 300 MB in all, Orthanc included, so a 2 GB
Pi keeps room for the page cache), their proportional share (PSS), and each service's cgroup.
TCG emulation makes every boot slower than on the real box: read the ratio, not the seconds. The
Pi 4's tree is built through qemu-user, so its build times are this machine's, not a Pi's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, report
from tests.support.site import free_port
from tests.support.vm import VM, PiVM

IMAGE = REPO / "image-build" / "image.py"
WHEELHOUSE = REPO / "image-build" / "wheelhouse.py"
AET = "BENCHBOX"
ARCH = {"nuc": "amd64", "pi4": "arm64"}
ADMIN = "gotgadmin"
MEMORY_LIMIT_MB = 300
# Resident and proportional memory of every process, and each appliance unit's cgroup, in KiB.
MEMORY_SCRIPT = r"""
rss=0; pss=0
for p in /proc/[0-9]*; do
  r=$(awk '/^VmRSS/ {print $2}' $p/status 2>/dev/null); rss=$((rss + ${r:-0}))
  s=$(awk '/^Pss:/ {print $2}' $p/smaps_rollup 2>/dev/null); pss=$((pss + ${s:-0}))
done
echo "rss $rss"; echo "pss $pss"
for unit in $(systemctl list-units --plain --no-legend --state=active 'orthanc.service' \
              'pacs-*.service' | awk '{print $1}'); do
  echo "unit $unit $(($(systemctl show -P MemoryCurrent $unit) / 1024))"
done
"""


def build(target: str, where: Path, vars_file: Path, bare: bool, log: Path) -> dict:
    with log.open("a") as sink:
        done = subprocess.run([sys.executable, str(IMAGE), "--target", target, "--out", str(where),
                               "--vars", str(vars_file), *(["--bare"] if bare else [])],
                              stdout=subprocess.PIPE, stderr=sink, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def fresh_disk(image: Path, work: Path) -> Path:
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    with disk.open("r+b") as handle:
        handle.truncate(disk.stat().st_size + 2 * 1024**3)
    return disk


def _login_offered(vm: VM) -> bool:
    return "login:" in vm.console_text()


def _echo(port: int) -> bool:
    """A C-ECHO with short association timeouts: qemu's port forward accepts a connection before
    the guest listens, and DCMTK's default 30 s wait would blur the measurement."""
    try:
        return subprocess.run(["echoscu", "-to", "3", "-ta", "3", "-td", "3", "-aet", "BENCH",
                               "-aec", AET, "127.0.0.1", str(port)], capture_output=True,
                              timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _seconds_until(reached, begun: float, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        if reached():
            return round(time.monotonic() - begun, 1)
        time.sleep(0.5)
    return None


def boot(vm: VM, dicom_port: int | None) -> dict:
    """Seconds from power-on to a login prompt, and to DICOM answering when there is DICOM
    (watched side by side, so a slow probe of one never delays the other)."""
    begun = time.monotonic()
    deadline = begun + 1200
    vm.start()
    watches = {"login_s": lambda: _login_offered(vm)}
    if dicom_port is not None:
        watches["dicom_s"] = lambda: _echo(dicom_port)
    with ThreadPoolExecutor(len(watches)) as pool:
        futures = {name: pool.submit(_seconds_until, reached, begun, deadline)
                   for name, reached in watches.items()}
        seen = {name: future.result() for name, future in futures.items()}
    missing = sorted(name for name, seconds in seen.items() if seconds is None)
    if missing:
        raise SystemExit(f"boot {vm.boots}: never reached {missing}; console:\n"
                         + vm.console_text()[-2000:])
    return seen


def memory(vm: VM, key: Path) -> dict:
    shown = vm.ssh(key, ADMIN, "sudo", "sh", "-c", MEMORY_SCRIPT)
    if shown.returncode != 0:
        raise SystemExit(f"memory over SSH failed: {shown.stderr}")
    figures: dict = {"units_mb": {}}
    for line in shown.stdout.splitlines():
        fields = line.split()
        if fields[0] in ("rss", "pss"):
            figures[f"{fields[0]}_total_mb"] = round(int(fields[1]) / 1024, 1)
        elif fields[0] == "unit":
            figures["units_mb"][fields[1]] = round(int(fields[2]) / 1024, 1)
    return figures


def run_side(target: str, image: Path, work: Path, key: Path | None, settle: float) -> dict:
    """Two boots of a fresh copy of `image`; memory after the second when SSH is there."""
    work.mkdir(parents=True)
    dicom, ssh = free_port(), free_port()
    disk, forwards = fresh_disk(image, work), {4242: dicom, 22: ssh}
    vm = PiVM.from_image(disk, work, forwards) if target == "pi4" else VM(disk, work, forwards)
    port = dicom if key else None
    try:
        first = boot(vm, port)
        if target == "pi4":
            # No power button reaches the Pi's kernel on the virt board, and a Pi has none: the
            # plug is pulled once the first boot has had time to write everything out (the
            # kernel writes dirty pages back within 30 s). Both images get the same.
            time.sleep(45)
            vm.power_off()
        elif not vm.shut_down():
            raise SystemExit("the first boot did not power off when asked")
        second = boot(vm, port)
        result = {"first_boot": first, "boot": second}
        if key:
            time.sleep(settle)
            result["memory"] = memory(vm, key)
        if target != "pi4":
            vm.shut_down()
        return result
    finally:
        vm.power_off()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(ARCH), default="nuc")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="Seconds after the ordinary boot before memory is read.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "build", prefix="bench-image-") as scratch:
        work = Path(scratch)
        log = work / "build.log"
        with log.open("w") as sink:
            subprocess.run([sys.executable, str(WHEELHOUSE), "--arch", ARCH[args.target], "--out",
                            str(work / "wheelhouse")], check=True, stdout=sink, stderr=sink)
        key = work / "admin_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        site = {"pacs_services_wheelhouse": str(work / "wheelhouse"),
                "pacs_config_pacs_aet": AET, "pacs_config_site_code": "bench",
                "base_admin_ssh_keys": [Path(f"{key}.pub").read_text().strip()],
                "base_ssh_allowed_from": ["10.0.2.2/32"]}
        vars_file = work / "site.json"
        vars_file.write_text(json.dumps(site))
        appliance = build(args.target, work / "appliance", vars_file, bare=False, log=log)
        bare = build(args.target, work / "bare", vars_file, bare=True, log=log)
        ours = run_side(args.target, Path(appliance["image"]), work / "boot-appliance", key,
                        args.settle)
        theirs = run_side(args.target, Path(bare["image"]), work / "boot-bare", None,
                          args.settle)

    def sizes(built: dict) -> dict:
        return {"build_s": round(built["rootfs_seconds"] + built["image_seconds"], 1),
                "image_mb": round(built["bytes"] / 2**20),
                "zst_mb": round(built["zst_bytes"] / 2**20)}

    rss = ours["memory"]["rss_total_mb"]
    figures = {**sizes(appliance), "first_boot_dicom_s": ours["first_boot"]["dicom_s"],
               "first_boot_login_s": ours["first_boot"]["login_s"],
               "boot_dicom_s": ours["boot"]["dicom_s"], "boot_login_s": ours["boot"]["login_s"],
               **ours["memory"]}
    baseline = {**sizes(bare), "first_boot_login_s": theirs["first_boot"]["login_s"],
                "boot_login_s": theirs["boot"]["login_s"]}
    ratios = {"boot_to_dicom_vs_bare_login": ours["boot"]["dicom_s"] / theirs["boot"]["login_s"],
              "first_boot_to_dicom_vs_bare_login":
                  ours["first_boot"]["dicom_s"] / theirs["first_boot"]["login_s"],
              "zst_size_vs_bare": appliance["zst_bytes"] / bare["zst_bytes"],
              "rss_vs_limit": rss / MEMORY_LIMIT_MB}
    # Correct only if the box came up whole: Orthanc and the services running when measured.
    ok = "orthanc.service" in ours["memory"]["units_mb"] and len(ours["memory"]["units_mb"]) > 1
    area = "image" if args.target == "nuc" else f"image-{args.target}"
    report(area, ok=ok, figures=figures, baseline=baseline, ratios=ratios,
           targets={"rss_vs_limit": "<= 1"})


if __name__ == "__main__":
    main()
