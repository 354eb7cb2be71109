"""make bench-sync: studies to HQ over a shaped link with outages, against Orthanc's peer push.

Two scenarios, each run for both sides in the same run over the same kind of link (a veth pair
into a network namespace with a tbf rate limit, down for 30 s of every 2 minutes, the first
outage 20 s in):

* main: at least 20 MB of CT, MR, CR and US from pydicom-data over 1 Mbit/s;
* slow: at least 5 MB over 256 kbit/s.

Our side is the real pacs-sync service sending to the real HQ receiver; the baseline is Orthanc's
own `/peers/{peer}/store` with its gzip `Compress` option, resubmitted whenever its job fails
(it has no resume). The physical limit is our payload bytes divided by (link rate x fraction of
time the link was up while we sent). Ratios: vs_limit (<= 1.2), speedup_vs_peer_push (>= 2),
resent_chunks_per_outage (<= 1), size_vs_gzip (reported).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, report
from gotg_pacs import config
from gotg_pacs.hq.sites import Sites
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import start_orthanc, wait_until
from gotg_pacs.sync.outbox import Outbox
from tests.support import corpus
from tests.support.netns import Link
from tests.support.site import free_port, owe, same_at_hq, write_env

UP_S, DOWN_S = 90, 30  # a 30 s outage every 2 minutes
FIRST_OUTAGE_S = 20     # the first one early, so even a short transfer meets one


class Outages:
    """Takes the link down for DOWN_S, first after FIRST_OUTAGE_S then after every UP_S;
    counts the outages and the seconds the link was down."""

    def __init__(self, link: Link) -> None:
        self.link, self.count, self.down_seconds = link, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        wait = FIRST_OUTAGE_S
        while not self._stop.wait(wait):
            self.link.down()
            self.count += 1
            went_down = time.monotonic()
            self._stop.wait(DOWN_S)
            self.link.up()
            self.down_seconds += time.monotonic() - went_down
            wait = UP_S

    def __enter__(self) -> Outages:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.link.up()


class Site:
    """An appliance (Orthanc from the project's configuration) in a folder of its own."""

    def __init__(self, home: Path, **overrides: str) -> None:
        home.mkdir(parents=True)
        self.env_file = write_env(home / "pacs.env", **overrides)
        self.settings = config.load(self.env_file)
        self.child = start_orthanc(self.settings)
        self.orthanc = Orthanc.from_settings(self.settings, timeout=120)

    def stop(self) -> None:
        self.child.stop()


def _corpus(names: list[str], minimum_mb: float, work: Path) -> list[Path]:
    sources = [corpus.DATA_DIR / name for name in names]
    per_copy = sum(p.stat().st_size for p in sources)
    copies = max(1, int(minimum_mb * 2**20 // per_copy) + 1)
    return corpus.renumbered_copies(sources, copies, work / "corpus")


def run_ours(files: list[Path], rate: str, work: Path) -> dict:
    link = Link()
    hq = clinic = receiver = service = None
    try:
        link.shape(rate)
        hq = Site(work / "hq", SITE_CODE="hq", HQ_RECEIVER_PORT=str(free_port()))
        token = Sites(hq.settings.hq_dir / "sites.json").add("bench-site")
        receiver = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                     str(hq.env_file), "hq", "run"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = link.expose(hq.settings.hq_receiver_port)
        clinic = Site(work / "clinic", SITE_CODE="bench-site", HQ_URL=url, HQ_TOKEN=token,
                      OFFLINE_MODE="auto", COMPRESSION_LEVEL="6")
        clinic.modality = _modality(clinic)
        owe(clinic, files).close()
        time.sleep(2)
        with Outages(link) as outages:
            started = time.monotonic()
            service = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file",
                                        str(clinic.env_file), "sync", "run"],
                                       stderr=open(work / "sync.log", "w"))  # noqa: SIM115
            done = wait_until(lambda: _confirmed(clinic) == len(files), 3600, interval=0.5)
            seconds = time.monotonic() - started
            count, down = outages.count, outages.down_seconds
        journal = [json.loads(line) for line in
                   (hq.settings.hq_dir / "transfers.jsonl").read_text().splitlines()]
        payload = sum(entry["length"] for entry in journal)
        resent = sum(entry["received"] - entry["length"] for entry in journal)
        # Chunks follow the link estimate: an outage may cost the largest one in flight.
        chunk = max(entry["max_chunk"] for entry in journal)
        intact = done and all(_same(clinic.orthanc, hq.orthanc, i)
                              for i in clinic.orthanc.get("/instances"))
        return {"ok": bool(intact), "seconds": seconds, "payload_bytes": payload,
                "resent_bytes": resent, "chunk_bytes": chunk, "outages": count,
                "down_seconds": down}
    finally:
        for process in (service, receiver):
            if process:
                process.terminate()
                process.wait(60)
        for site in (clinic, hq):
            if site:
                site.stop()
        link.close()


def run_peer_push(files: list[Path], rate: str, work: Path, give_up_after: float) -> dict:
    """Orthanc's peer push; a run still failing and restarting after give_up_after seconds is
    stopped there (its time is then a lower bound, and so is our speedup)."""
    link = Link()
    hq = clinic = None
    try:
        link.shape(rate)
        hq = Site(work / "hq", SITE_CODE="hq")
        url = link.expose(hq.settings.http_port)
        clinic = Site(work / "clinic", SITE_CODE="bench-site")
        clinic.modality = _modality(clinic)
        assert clinic.modality.store(files).ok
        user, password = hq.settings.orthanc_credentials
        clinic.orthanc.put("/peers/hq", json={"Url": url + "/", "Username": user,
                                             "Password": password})
        instances = clinic.orthanc.get("/instances")
        with Outages(link) as outages:
            started = time.monotonic()
            job = clinic.orthanc.post("/peers/hq/store", json={
                "Resources": instances, "Compress": True, "Synchronous": False})["ID"]
            resubmits, finished = 0, True
            while True:
                state = clinic.orthanc.get(f"/jobs/{job}")["State"]
                if state == "Success":
                    break
                if time.monotonic() - started > give_up_after:
                    clinic.orthanc.post(f"/jobs/{job}/cancel", json={})
                    finished = False
                    break
                if state == "Failure":  # no resume: the whole job again, as an operator would
                    clinic.orthanc.post(f"/jobs/{job}/resubmit", json={})
                    resubmits += 1
                time.sleep(0.5)
            seconds = time.monotonic() - started
            count = outages.count
        intact = not finished or all(_same(clinic.orthanc, hq.orthanc, i) for i in instances)
        return {"ok": intact, "finished": finished, "seconds": seconds, "resubmits": resubmits,
                "outages": count}
    finally:
        for site in (clinic, hq):
            if site:
                site.stop()
        link.close()


def _modality(site: Site):
    from tests.support.dcmtk import Modality

    return Modality(site.settings.pacs_aet, site.settings.dicom_port)


def _confirmed(site: Site) -> int:
    box = Outbox(site.settings.sync_outbox_file)
    try:
        return box.summary()["instances"].get("confirmed", {}).get("instances", 0)
    finally:
        box.close()


def _same(clinic: Orthanc, hq: Orthanc, instance: str) -> bool:
    uid = clinic.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"]
    return same_at_hq(clinic, hq, uid)


def scenario(name: str, rate: str, bits_per_s: float, files: list[Path], work: Path) -> dict:
    corpus_bytes = sum(f.stat().st_size for f in files)
    gzip_bytes = sum(len(gzip.compress(f.read_bytes(), 6)) for f in files)
    ours = run_ours(files, rate, work / f"{name}-ours")
    print(f"{name} ours: {ours}", file=sys.stderr)
    peer = run_peer_push(files, rate, work / f"{name}-peer",
                         give_up_after=max(600.0, 5 * ours["seconds"]))
    print(f"{name} peer push: {peer}", file=sys.stderr)
    # The physical limit: every payload bit at the link rate, plus the time the link was down
    # while we were sending (the same as bytes / (rate x fraction of time up)).
    limit = ours["payload_bytes"] * 8 / bits_per_s + ours["down_seconds"]
    return {
        "corpus_mb": round(corpus_bytes / 2**20, 1), "instances": len(files),
        "ours": ours, "peer_push": peer, "gzip_bytes": gzip_bytes, "limit_seconds": limit,
        "vs_limit": ours["seconds"] / limit,
        "speedup_vs_peer_push": peer["seconds"] / ours["seconds"],
        "resent_chunks_per_outage": (ours["resent_bytes"] / ours["chunk_bytes"])
        / max(1, ours["outages"]),
        "size_vs_gzip": ours["payload_bytes"] / gzip_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-mb", type=float, default=20)
    parser.add_argument("--slow-mb", type=float, default=5)
    args = parser.parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sync-", dir=REPO / "build") as tmp:
        work = Path(tmp)
        mix = ["693_UNCR.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm"]
        main_files = _corpus(mix, args.main_mb, work / "main")
        slow_files = _corpus(["693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm"], args.slow_mb,
                             work / "slow")
        main = scenario("main", "1mbit", 1e6, main_files, work)
        slow = scenario("slow", "256kbit", 256e3, slow_files, work)
        shutil.rmtree(work, ignore_errors=True)

    def figures(result: dict, prefix: str = "") -> dict:
        return {f"{prefix}seconds": round(result["ours"]["seconds"], 1),
                f"{prefix}payload_mb": round(result["ours"]["payload_bytes"] / 2**20, 2),
                f"{prefix}corpus_mb": result["corpus_mb"],
                f"{prefix}resent_kb": round(result["ours"]["resent_bytes"] / 1024, 1),
                f"{prefix}outages": result["ours"]["outages"]}

    def baseline(result: dict, prefix: str = "") -> dict:
        return {f"{prefix}peer_push_seconds": round(result["peer_push"]["seconds"], 1),
                f"{prefix}peer_push_resubmits": result["peer_push"]["resubmits"],
                f"{prefix}peer_push_finished": result["peer_push"]["finished"],
                f"{prefix}limit_seconds": round(result["limit_seconds"], 1),
                f"{prefix}gzip_mb": round(result["gzip_bytes"] / 2**20, 2)}

    ratios = {name: main[name] for name in
              ("vs_limit", "speedup_vs_peer_push", "resent_chunks_per_outage", "size_vs_gzip")}
    ratios |= {f"{name}_256k": slow[name] for name in
               ("vs_limit", "speedup_vs_peer_push", "resent_chunks_per_outage", "size_vs_gzip")}
    targets = {"vs_limit": "<= 1.2", "speedup_vs_peer_push": ">= 2",
               "resent_chunks_per_outage": "<= 1", "vs_limit_256k": "<= 1.2",
               "speedup_vs_peer_push_256k": ">= 2", "resent_chunks_per_outage_256k": "<= 1"}
    report("sync",
           ok=all(r["ours"]["ok"] and r["peer_push"]["ok"] for r in (main, slow)),
           figures=figures(main) | figures(slow, "slow_"),
           baseline=baseline(main) | baseline(slow, "slow_"),
           ratios=ratios, targets=targets)


if __name__ == "__main__":
    main()
