"""A modality as the archive meets one: DCMTK's echoscu, storescu, findscu, getscu and movescu.

Used by the integration tests and the benchmarks. Each call runs the real DCMTK binary and returns
its exit code and output; parsing is done on the DICOM files DCMTK writes (`-X`, `-od`), never on
its log text.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from gotg_pacs.process import wait_until

UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")


class QueryRefused(AssertionError):
    """The archive answered a C-FIND with a failure (or the association failed)."""


@dataclass
class Result:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _run(argv: list[str], timeout: float) -> Result:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout + done.stderr)


def storescu_profile(files: list[Path], path: Path) -> Path:
    """A storescu association profile proposing each file's own transfer syntax.

    A real modality sends what it acquired in its native transfer syntax (JPEG, JPEG-LS, J2K, RLE,
    uncompressed); by default storescu would propose uncompressed only and fail on the others.
    One presentation context per (SOP class, native transfer syntax), plus uncompressed as a
    fallback.
    """
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for file in files:
        meta = pydicom.dcmread(file, stop_before_pixels=True).file_meta
        syntaxes[str(meta.MediaStorageSOPClassUID)].add(str(meta.TransferSyntaxUID))
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(UNCOMPRESSED, 1)]
    native = sorted({ts for group in syntaxes.values() for ts in group})
    for n, ts in enumerate(native):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    count = 0
    for sop_class, group in sorted(syntaxes.items()):
        for ts in sorted(group):
            count += 1
            lines.append(f"PresentationContext{count} = {sop_class}\\TS{native.index(ts)}")
        count += 1
        lines.append(f"PresentationContext{count} = {sop_class}\\Uncompressed")
    if count > 128:
        raise ValueError(f"{count} presentation contexts: more than one association can carry")
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Modality:
    """DCMTK pointed at one archive (called AET, host, port)."""

    called_aet: str
    port: int
    host: str = "127.0.0.1"
    calling_aet: str = "DCMTK_MODALITY"
    timeout: float = 120.0

    def _peer(self) -> list[str]:
        return ["-aet", self.calling_aet, "-aec", self.called_aet, self.host, str(self.port)]

    def echo(self) -> Result:
        return _run(["echoscu", "-to", "10", *self._peer()], self.timeout)

    def store(self, files: list[Path], extra: list[str] | None = None) -> Result:
        """All files over one association, each in its own transfer syntax."""
        with tempfile.TemporaryDirectory() as tmp:
            profile = storescu_profile(files, Path(tmp) / "storescu.cfg")
            return _run(["storescu", "-xf", str(profile), "Corpus", *(extra or []), *self._peer(),
                         *map(str, files)], self.timeout)

    def store_raw(self, files: list[Path], extra: list[str] | None = None) -> Result:
        """storescu with its own defaults (what a user types first)."""
        return _run(["storescu", *(extra or []), *self._peer(), *map(str, files)], self.timeout)

    def find(self, keys: dict[str, str], out_dir: Path,
             level: str = "STUDY") -> list[pydicom.Dataset]:
        """C-FIND (Study Root); the answers as datasets."""
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = ["findscu", "-S", "-X", "-od", str(out_dir), "-k", f"QueryRetrieveLevel={level}"]
        for key, value in keys.items():
            argv += ["-k", f"{key}={value}" if value else key]
        return self._answers(_run([*argv, *self._peer()], self.timeout), out_dir)

    def _answers(self, result: Result, out_dir: Path) -> list[pydicom.Dataset]:
        # findscu exits 0 even when the archive refuses the query: read its verdict too.
        if not result.ok or "Find Failed" in result.output:
            raise QueryRefused(result.output)
        return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]

    def find_worklist(self, keys: dict[str, str], out_dir: Path) -> list[pydicom.Dataset]:
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = ["findscu", "-W", "-X", "-od", str(out_dir)]
        for key, value in keys.items():
            argv += ["-k", f"{key}={value}" if value else key]
        return self._answers(_run([*argv, *self._peer()], self.timeout), out_dir)

    def get(self, study_uid: str, out_dir: Path) -> Result:
        """C-GET a study into out_dir (no declaration needed by the SCU's own port)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return _run(["getscu", "-S", "-od", str(out_dir), "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study_uid}", *self._peer()], self.timeout)

    def move(self, study_uid: str, out_dir: Path, receive_port: int, destination: str) -> Result:
        """C-MOVE a study to `destination`; movescu itself receives on receive_port."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return _run(["movescu", "-S", "-od", str(out_dir), "--port", str(receive_port),
                     "-aem", destination, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study_uid}", *self._peer()], self.timeout)


def acknowledged_before(modality: Modality, files: list[Path], cut: Callable[[], None],
                        after: int, timeout: float = 600) -> list[Path]:
    """Send `files` one association each; once `after` are acknowledged, call `cut` (a power
    cut, every process killed) and return which files the modality saw acknowledged."""
    acknowledged: list[Path] = []
    stop = threading.Event()

    def send() -> None:
        for path in files:
            if stop.is_set():
                return
            if modality.store([path]).ok:
                acknowledged.append(path)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        if not wait_until(lambda: len(acknowledged) >= after, timeout, interval=0.05):
            raise AssertionError(f"only {len(acknowledged)} of {after} images acknowledged")
        cut()
    finally:
        stop.set()
        sender.join(120)
    return list(acknowledged)
