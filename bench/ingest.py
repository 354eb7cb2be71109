"""make bench-ingest: C-STORE throughput into the appliance against bare Orthanc, same run.

Both sides get the same Orthanc configuration rendered from the same settings, a fresh empty
archive per round, and the same corpus (real pydicom-data images, renumbered so every instance is
new) sent by DCMTK's storescu over one association, each file in its native transfer syntax.
The appliance side is `pacs run` with every service it starts; the baseline is the Orthanc binary
alone. Rounds alternate sides so drift on the machine hits both equally; medians are reported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import REPO, median, report
from gotg_pacs import config, orthanc_conf
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import Child, orthanc_binary, wait_until
from tests.support import corpus
from tests.support.dcmtk import Modality
from tests.support.site import Running, write_env


def _start_bare(settings: config.Settings) -> Child:
    orthanc_conf.prepare_directories(settings)
    child = Child("bare-orthanc", [orthanc_binary(), str(orthanc_conf.write(settings))],
                  settings.log_dir / "bare-orthanc.log")
    child.start()
    return child


def _rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def one_round(side: str, files: list[Path], work: Path) -> dict:
    home = work / side
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env_file = write_env(home / "pacs.env", DICOM_ACCESS="open")
    settings = config.load(env_file)
    client = Orthanc.from_settings(settings, timeout=60)
    if side == "bare":
        child = _start_bare(settings)
        pid, stop = child.pid, child.stop
    else:
        running = Running(env_file)
        pid, stop = running.process.pid, running.interrupt
    try:
        if not wait_until(client.is_alive, 60):
            raise RuntimeError(f"{side}: Orthanc did not start")
        modality = Modality(settings.pacs_aet, settings.dicom_port)
        started = time.perf_counter()
        result = modality.store(files)
        elapsed = time.perf_counter() - started
        stored = client.statistics()["CountInstances"]
        intact = all(client.verify_md5(i) for i in client.get("/instances"))
        rss = _rss_mb(pid)
    finally:
        stop()
        Running.kill_all()  # only does anything if a stop timed out
    size = sum(f.stat().st_size for f in files)
    return {"ok": result.ok and stored == len(files) and intact, "seconds": elapsed,
            "instances_per_s": len(files) / elapsed, "mb_per_s": size / 2**20 / elapsed,
            "rss_mb_after": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8,
                        help="studies in the corpus (14 real instances each)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=REPO / "build") as tmp:
        work = Path(tmp)
        files = corpus.renumbered_copies(corpus.representative(), args.copies, work / "corpus")
        corpus_mb = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        rounds: dict[str, list[dict]] = {"bare": [], "appliance": []}
        for _ in range(args.rounds):
            for side in ("bare", "appliance"):
                rounds[side].append(one_round(side, files, work))
                print(f"{side}: {rounds[side][-1]}", file=sys.stderr)

    def summary(side: str) -> dict:
        runs = rounds[side]
        return {"instances_per_s": round(median([r["instances_per_s"] for r in runs]), 2),
                "mb_per_s": round(median([r["mb_per_s"] for r in runs]), 2),
                "rss_mb_after_ingest": round(median([r["rss_mb_after"] for r in runs]), 1),
                "rounds": len(runs), "instances": len(files),
                "corpus_mb": corpus_mb}

    figures, baseline = summary("appliance"), summary("bare")
    report(
        "ingest",
        ok=all(r["ok"] for side in rounds.values() for r in side),
        figures=figures,
        baseline=baseline,
        ratios={"vs_bare_orthanc": figures["instances_per_s"] / baseline["instances_per_s"]},
        targets={"vs_bare_orthanc": ">= 0.9"},
    )


if __name__ == "__main__":
    main()
