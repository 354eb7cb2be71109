"""The Pi 4 image's boot settings, without building an image.

Why it matters: raspi-firmware rewrites cmdline.txt at every kernel update on the box. If the
image's root were not pinned by label in its settings, the first kernel update at a clinic would
point the Pi at whatever device the build machine's root was, and the box would not boot again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "image-build"))
import image  # noqa: E402  (image-build/ holds scripts, not a package)
import rootfs  # noqa: E402

PACKAGE_DEFAULTS = "# Filesystem to mount on root.\n#ROOTPART=/dev/mmcblk0p2\n#CONSOLES=\"auto\"\n"


def test_the_pi_boot_settings_survive_a_kernel_update_on_the_box(tmp_path):
    settings = tmp_path / "etc/default/raspi-firmware"
    settings.parent.mkdir(parents=True)
    settings.write_text(PACKAGE_DEFAULTS)
    rootfs.pin_pi_boot_settings(tmp_path)
    # The hook sources the file with sh: read it back the same way.
    seen = subprocess.run(["sh", "-c", '. "$0"; printf "%s|%s|%s" "$ROOTPART" "$CONSOLES" "$CMA"',
                           str(settings)], capture_output=True, text=True, check=True).stdout
    assert seen == "LABEL=gotg-root|tty1 ttyS1,115200|0"
    assert settings.read_text().startswith(PACKAGE_DEFAULTS), "the package's own text is kept"


def test_an_image_whose_cmdline_misses_the_root_label_is_refused(tmp_path):
    firmware = tmp_path / "boot/firmware"
    (firmware / "overlays").mkdir(parents=True)
    (firmware / "overlays/disable-bt.dtbo").write_bytes(b"\xd0\x0d")
    (firmware / "config.txt").write_text("arm_64bit=1\n")
    (firmware / "cmdline.txt").write_text("console=tty0 root=/dev/mmcblk0p2 rw rootwait\n")
    with pytest.raises(SystemExit, match="does not boot the image's root"):
        image.boot_files_pi4(tmp_path)
    (firmware / "cmdline.txt").write_text("console=tty0 root=LABEL=gotg-root rw rootwait\n")
    files = image.boot_files_pi4(tmp_path)
    assert set(files) == {"overlays/disable-bt.dtbo", "config.txt", "cmdline.txt"}
