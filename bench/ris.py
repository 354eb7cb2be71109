"""make bench-ris: the worklist with 10,000 scheduled items, and how fast HL7 orders are taken.

The appliance: `pacs ris run` takes 10,000 ORM^O01 orders over one MLLP connection (the python
`hl7` package's client, as a RIS's interface engine holds one open), each acknowledged only once
it is on disk and its worklist item written; Orthanc's worklists plugin answers from the items
the bridge wrote. The baseline, in the same run: a second Orthanc, same version and plugin,
answering the same 10,000 orders from plain worklist files made by DCMTK's `dump2dcm` from text
dumps (the classic way a worklist folder is filled by hand or by script).

Measured, alternating between the two, 15 times each: C-FIND (pynetdicom as the modality) for a
radiographer's day list (one modality, one day), for one patient, and for everything. Both
answer sets must be the same orders for the run to count.
Ratios: worklist_day_list_vs_plain_files = baseline seconds / appliance seconds (>= 0.8: the
bridge's items cost a modality nothing), the same for one patient, and hl7_orders_per_s_vs_10 =
orders per second / 10 (>= 1: far above what a clinic's RIS sends).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hl7
from hl7.client import MLLPClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from common import REPO, median, report
from gotg_pacs import config
from gotg_pacs.process import start_orthanc, wait_until
from tests.support.site import write_env

MODALITIES = ("CR", "CT", "US", "MR", "DX")
DAYS = 10


def _order(n: int) -> dict[str, str]:
    return {"n": str(n), "accession": f"B{n:07d}", "patient": f"P{n // 2:06d}",
            "name": f"Family{n % 997}^Given{n % 89}", "birth": f"19{50 + n % 50:02d}0{1 + n % 9}15",
            "modality": MODALITIES[n % len(MODALITIES)],
            "date": f"202612{1 + n % DAYS:02d}", "time": f"{8 + n % 10:02d}{n % 60:02d}00"}


def _message(n: int, order: dict[str, str]) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127101500||ORM^O01|B{n}|P|2.5.1",
        f"PID|1||{order['patient']}^^^CLINIC^MR||{order['name']}||{order['birth']}|F",
        "PV1|1|O||||||DOC1^House^Greg",
        f"ORC|NW|PL{n}|FL{n}||SC||^^^{order['date']}{order['time']}",
        f"OBR|1|PL{n}|FL{n}|XR^Imaging^LOCAL||||||||||||||{order['accession']}|RP{n}|SPS{n}"
        f"||||{order['modality']}"])


def _dump(order: dict[str, str]) -> str:
    """The same worklist item as the bridge writes, attribute for attribute, as a DCMTK text
    dump (dump2dcm's input) in the classic Latin-1 character set."""
    code = ["(0008,0100) SH [XR]", "(0008,0102) SH [LOCAL]", "(0008,0104) LO [Imaging]"]

    def sequence(tag: str, items: list[str], indent: str) -> list[str]:
        return [f"{indent}({tag}) SQ (Sequence with explicit length #=1)",
                f"{indent}  (fffe,e000) na (Item with explicit length #={len(items)})",
                *[f"{indent}    {line}" for line in items],
                f"{indent}  (fffe,e00d) na (ItemDelimitationItem for re-encoding)",
                f"{indent}(fffe,e0dd) na (SequenceDelimitationItem for re-encoding)"]
    step = [f"(0008,0060) CS [{order['modality']}]", "(0040,0001) AE []",
            f"(0040,0002) DA [{order['date']}]", f"(0040,0003) TM [{order['time']}]",
            "(0040,0006) PN []", "(0040,0007) LO [Imaging]",
            *sequence("0040,0008", code, ""),
            f"(0040,0009) SH [SPS{order['n']}]", "(0040,0020) CS [SCHEDULED]"]
    return "\n".join([
        "(0008,0005) CS [ISO_IR 100]",
        f"(0008,0050) SH [{order['accession']}]",
        "(0008,0090) PN [House^Greg]",
        f"(0010,0010) PN [{order['name']}]",
        f"(0010,0020) LO [{order['patient']}]",
        "(0010,0021) LO [CLINIC]",
        f"(0010,0030) DA [{order['birth']}]",
        "(0010,0040) CS [F]",
        f"(0020,000d) UI [1.2.826.0.1.3680043.10.543.{order['n']}]",
        "(0032,1060) LO [Imaging]",
        *sequence("0032,1064", code, ""),
        *sequence("0040,0100", step, ""),
        f"(0040,1001) SH [RP{order['n']}]", ""])


def _plain_files(orders: list[dict[str, str]], folder: Path, dumps: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dumps.mkdir(parents=True, exist_ok=True)

    def one(order: dict[str, str]) -> None:
        dump = dumps / f"{order['accession']}.dump"
        dump.write_text(_dump(order))
        subprocess.run(["dump2dcm", "-q", str(dump), str(folder / f"{order['accession']}"
                                                               ".wl")], check=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, orders))


def _find(aet: str, port: int, query: dict) -> tuple[float, set[str]]:
    """One modality's worklist C-FIND: seconds to the last answer, the accessions answered."""
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "", query.get("PatientID", ""), ""
    step = Dataset()
    step.Modality = query.get("Modality", "")
    step.ScheduledProcedureStepStartDate = query.get("Date", "")
    step.ScheduledStationAETitle = ""
    ds.ScheduledProcedureStepSequence = [step]
    ae = AE(ae_title="BENCH_MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError("worklist association refused")
    found = set()
    try:
        for status, answer in assoc.send_c_find(ds, ModalityWorklistInformationFind):
            if status is None or status.Status not in (0xFF00, 0xFF01, 0x0000):
                raise RuntimeError(f"C-FIND failed: {status}")
            if answer is not None and status.Status in (0xFF00, 0xFF01):
                found.add(str(answer.AccessionNumber))
    finally:
        assoc.release()
    return time.perf_counter() - started, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    orders = [_order(n) for n in range(args.orders)]
    with tempfile.TemporaryDirectory(prefix="bench-ris-", dir=REPO / "build") as tmp:
        home, base_home = Path(tmp) / "site", Path(tmp) / "baseline"
        home.mkdir()
        base_home.mkdir()
        env = write_env(home / "pacs.env", WORKLIST_SYNC="false")
        base_env = write_env(base_home / "pacs.env")
        settings, base_settings = config.load(env), config.load(base_env)
        _plain_files(orders, base_settings.worklists_dir, Path(tmp) / "dumps")
        appliance, baseline = start_orthanc(settings), start_orthanc(base_settings)
        log = open(Path(tmp) / "ris.log", "w")  # noqa: SIM115
        ris = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(env),
                                "ris", "run"], stdout=subprocess.DEVNULL, stderr=log)
        try:
            client = None
            if not wait_until(lambda: _connects(settings.hl7_port), 60):
                raise RuntimeError("pacs-ris did not listen")
            client = MLLPClient("127.0.0.1", settings.hl7_port)
            refused = 0
            started = time.perf_counter()
            for n, order in enumerate(orders):
                ack = hl7.parse(client.send_message(_message(n, order)).decode())
                refused += str(ack.segment("MSA")[1]) != "AA"
            hl7_seconds = time.perf_counter() - started
            client.close()
            items = len(list(settings.worklists_dir.glob("*.wl")))

            day = orders[5]  # a CR order: its modality's list for its day
            queries = {"day_list": {"Modality": day["modality"], "Date": day["date"]},
                       "one_patient": {"PatientID": orders[len(orders) // 3]["patient"]},
                       "everything": {}}
            times: dict[str, list[float]] = {f"{k}_{w}": [] for k in queries
                                             for w in ("appliance", "baseline")}
            same = True
            for _ in range(args.repeat):
                for name, query in queries.items():
                    ours, mine = _find(settings.pacs_aet, settings.dicom_port, query)
                    theirs, plain = _find(base_settings.pacs_aet, base_settings.dicom_port,
                                          query)
                    times[f"{name}_appliance"].append(ours)
                    times[f"{name}_baseline"].append(theirs)
                    same = same and mine == plain and bool(mine)
            expected_day = sum(1 for o in orders if (o["modality"], o["date"]) ==
                               (day["modality"], day["date"]))
            _, day_list = _find(settings.pacs_aet, settings.dicom_port, queries["day_list"])
        finally:
            ris.terminate()
            ris.wait(60)
            appliance.stop()
            baseline.stop()
    ok = refused == 0 and items == args.orders and same and len(day_list) == expected_day
    figures = {"orders": args.orders, "hl7_orders_per_s": round(args.orders / hl7_seconds, 1),
               "hl7_refused": refused, "worklist_items": items,
               **{f"{name}_s": round(median(times[f"{name}_appliance"]), 4)
                  for name in queries}, "day_list_answers": len(day_list)}
    baseline_figures = {f"{name}_s": round(median(times[f"{name}_baseline"]), 4)
                        for name in queries}
    ratios = {f"worklist_{name}_vs_plain_files": median(times[f"{name}_baseline"])
              / median(times[f"{name}_appliance"]) for name in queries}
    ratios["hl7_orders_per_s_vs_10"] = args.orders / hl7_seconds / 10
    report("ris", ok, figures, baseline_figures, ratios,
           {"worklist_day_list_vs_plain_files": ">= 0.8",
            "worklist_one_patient_vs_plain_files": ">= 0.8",
            "hl7_orders_per_s_vs_10": ">= 1"})


def _connects(port: int) -> bool:
    import socket
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    main()
