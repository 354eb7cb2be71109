"""make bench-sync-offline: a clinic offline for hours, then online; everything must arrive.

Too long for `make test` (its default is two hours), so it is a measurement run by hand, with
real processes over a real link (a veth pair into a network namespace, `tbf` at 1 Mbit/s): the
clinic's pacs-sync and HQ's receiver, Orthanc at both ends, DCMTK as the modality.

What happens, at fractions of the offline time:

* before: a study is being sent; the link goes down with part of an upload already at HQ;
* 0.2, 0.4, 0.9: routine studies arrive at the clinic;
* 0.5: a power cut at the clinic while it waits (kill -9 of pacs-sync, started again; a kill
  mid-upload is `make test`'s);
* 0.7: HQ's receiver restarted (maintenance at HQ);
* 0.8: an urgent study arrives and staff mark it urgent;
* then the link returns.

Checked: every instance at HQ once and as sent; the urgent study before every routine one that
waited offline; an outage of hours costs at most the chunk in flight. Measured: how soon HQ
receives bytes once the link is back, against the longest wait between probes (the circuit
breaker never sleeps longer than its cap, whatever the outage), and the catch-up from then on
against the physical limit: what waited, as sent, at the link rate.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from sync import Site, _confirmed, _modality, _same

from common import REPO, report
from gotg_pacs.hq.sites import Sites
from gotg_pacs.process import wait_until
from gotg_pacs.sync.service import CircuitBreaker
from tests.support import corpus
from tests.support.netns import Link
from tests.support.site import free_port

RATE, BITS_PER_S = "1mbit", 1e6


def _pacs(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gotg_pacs", "--env-file", str(env_file), *args],
                          capture_output=True, text=True, timeout=120)


def _service(env_file: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(env_file),
                             "sync", "run"], stderr=open(log, "a"))  # noqa: SIM115


def _receiver(env_file: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(env_file),
                             "hq", "run"], stdout=subprocess.DEVNULL,
                            stderr=open(log, "a"))  # noqa: SIM115


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _study(names: list[str], work: Path, tag: str) -> list[Path]:
    return corpus.renumbered_study([corpus.DATA_DIR / n for n in names], work / tag,
                                   PatientID=f"OFFLINE-{tag}")


def run(hours: float, work: Path) -> dict:
    offline_s = hours * 3600
    link = Link()
    hq = clinic = receiver = service = None
    try:
        link.shape(RATE)
        hq = Site(work / "hq", SITE_CODE="hq", HQ_RECEIVER_PORT=str(free_port()))
        token = Sites(hq.settings.hq_dir / "sites.json").add("offline-site")
        receiver = _receiver(hq.env_file, work / "receiver.log")
        url = link.expose(hq.settings.hq_receiver_port)
        clinic = Site(work / "clinic", SITE_CODE="offline-site", HQ_URL=url, HQ_TOKEN=token,
                      OFFLINE_MODE="auto", COMPRESSION_LEVEL="6")
        modality = _modality(clinic)
        first = _study(["693_UNCR.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm"], work, "first")
        routine = {f: _study(["693_UNCR.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm"], work, f"r{f}")
                   for f in (0.2, 0.4, 0.9)}
        urgent = _study(["MR2_UNCR.dcm", "693_UNCR.dcm"], work, "urgent")
        everything = first + urgent + [f for files in routine.values() for f in files]

        # Sending when the link fails: part of an upload is at HQ.
        service = _service(clinic.env_file, work / "sync.log")
        assert modality.store(first).ok
        assert _pacs(clinic.env_file, "sync", "prioritize",
                     str(pydicom.dcmread(first[0]).StudyInstanceUID)).returncode == 0
        uploads = hq.settings.hq_dir / "uploads"
        assert wait_until(lambda: any(p.stat().st_size > 200_000
                                      for p in uploads.glob("*.part")), 300, interval=0.05), \
            "an upload under way before the link fails"
        link.down()
        went_down = time.monotonic()
        before = _confirmed(clinic)
        print(f"offline for {hours} h from {time.strftime('%H:%M:%S')}", file=sys.stderr,
              flush=True)

        def at(fraction: float) -> None:
            time.sleep(max(0.0, went_down + fraction * offline_s - time.monotonic()))
            print(f"{time.strftime('%H:%M:%S')} offline {fraction:.0%}", file=sys.stderr,
                  flush=True)

        for fraction in (0.2, 0.4):
            at(fraction)
            assert modality.store(routine[fraction]).ok
        at(0.5)
        service.kill()  # a power cut: no goodbye
        service.wait()
        service = _service(clinic.env_file, work / "sync.log")
        at(0.7)
        receiver.terminate()
        receiver.wait(60)
        receiver = _receiver(hq.env_file, work / "receiver.log")
        at(0.8)
        assert modality.store(urgent).ok
        urgent_study = str(pydicom.dcmread(urgent[0]).StudyInstanceUID)
        assert _pacs(clinic.env_file, "sync", "prioritize", urgent_study).returncode == 0
        at(0.9)
        assert modality.store(routine[0.9]).ok
        at(1.0)
        status = json.loads(_pacs(clinic.env_file, "sync", "status", "--json").stdout)
        held_offline = _confirmed(clinic) - before

        journal_file = hq.settings.hq_dir / "transfers.jsonl"

        def at_hq() -> tuple[int, dict[str, int]]:
            """Uploads HQ finished, and the bytes of those under way."""
            return (journal_file.read_text().count("\n"),
                    {p.name: p.stat().st_size for p in uploads.glob("*.part")})

        def grown(before: tuple[int, dict[str, int]]) -> bool:
            """Has a byte of image arrived since (an upload finished or one grew)?"""
            finished, parts = at_hq()
            return finished > before[0] or any(size > before[1].get(name, 0)
                                               for name, size in parts.items())

        idle_at_hq = at_hq()
        link.up()
        back = time.monotonic()
        assert wait_until(lambda: grown(idle_at_hq), 900, interval=0.2), \
            "the link used once it is back"
        link_used = time.monotonic() - back
        assert wait_until(lambda: _confirmed(clinic) == len(everything), 1800, interval=0.5), \
            "everything confirmed"
        catch_up = time.monotonic() - back

        journal = [json.loads(line) for line in journal_file.read_text().splitlines()]
        wanted = _uids(everything)
        stored = [e["sop_uid"] for e in journal if e["sop_uid"] in wanted]
        once = sorted(stored) == sorted(wanted)
        intact = all(_same(clinic.orthanc, hq.orthanc, i)
                     for i in clinic.orthanc.get("/instances"))
        waited = _uids(urgent) | {u for f in routine.values() for u in _uids(f)}
        order = [e["sop_uid"] for e in journal if e["sop_uid"] in waited]
        urgent_first = set(order[:len(urgent)]) == _uids(urgent)
        resent = sum(e["received"] - e["length"] for e in journal)
        chunk = max(e["max_chunk"] for e in journal)
        # What crossed the link after it came back, at the link rate: the catch-up's limit.
        # Uploads finished since then, less what HQ already held of them when the link failed.
        sent_after = sum(e["length"] for e in journal[idle_at_hq[0]:]) - sum(
            idle_at_hq[1].values())
        limit = sent_after * 8 / BITS_PER_S
        return {"ok": bool(once and intact and urgent_first and held_offline == 0),
                "once": once, "intact": intact, "urgent_first": urgent_first,
                "confirmed_while_offline": held_offline, "status_offline": status,
                "instances": len(everything), "offline_s": offline_s,
                "link_used_s": link_used, "catch_up_s": catch_up, "catch_up_limit_s": limit,
                "resent_bytes": resent, "chunk_bytes": chunk}
    finally:
        for process in (service, receiver):
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
        for site in (clinic, hq):
            if site:
                site.stop()
        link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0)
    args = parser.parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sync-offline-", dir=REPO / "build") as tmp:
        result = run(args.hours, Path(tmp))
    print(json.dumps(result), file=sys.stderr)
    cap = CircuitBreaker().cap
    report("sync-offline", ok=result["ok"],
           figures={"offline_hours": args.hours, "instances": result["instances"],
                    "link_used_s": round(result["link_used_s"], 1),
                    "catch_up_s": round(result["catch_up_s"], 1),
                    "resent_kb": round(result["resent_bytes"] / 1024, 1)},
           baseline={"probe_cap_s": cap,
                     "catch_up_limit_s": round(result["catch_up_limit_s"], 1)},
           ratios={"link_used_vs_probe_cap": result["link_used_s"] / cap,
                   "catch_up_vs_limit": (result["catch_up_s"] - result["link_used_s"])
                   / result["catch_up_limit_s"],
                   "resent_chunks_per_outage": result["resent_bytes"] / result["chunk_bytes"]},
           targets={"link_used_vs_probe_cap": "<= 1", "catch_up_vs_limit": "<= 1.2",
                    "resent_chunks_per_outage": "<= 1"})


if __name__ == "__main__":
    main()
