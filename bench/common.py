"""What every `make bench-<area>` shares: the result format of design brief section 4.

A benchmark measures the appliance and its baseline in the same run, checks that both did the work
correctly, and writes one JSON object to build/bench/<area>.json (also its last stdout line).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "build" / "bench"
sys.path.insert(0, str(REPO))  # tests.support: the DCMTK modality and the real-data corpus


def median(values: list[float]) -> float:
    return statistics.median(values)


def _holds(value: float, target: str) -> bool:
    operator, threshold = target.split()
    return value >= float(threshold) if operator == ">=" else value <= float(threshold)


def report(area: str, ok: bool, figures: dict, baseline: dict, ratios: dict,
           targets: dict[str, str]) -> dict:
    result = {
        "area": area,
        "ok": ok,
        "figures": figures,
        "baseline": baseline,
        "ratios": {name: round(value, 3) for name, value in ratios.items()},
        "targets": targets,
        "met": {name: ok and _holds(ratios[name], target) for name, target in targets.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{area}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result
