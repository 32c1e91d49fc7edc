"""One ``vmmig run`` as a benchmark sample: the figures its JSON report gives.

Shared by the benchmarks that compare migrations side by side; this module
runs nothing by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


MOVING_PHASES = ("transferring-memory", "stopping-source", "transferring-cpu-state")


def migrate(options: Sequence[str], label: str) -> dict[str, float]:
    """Run ``vmmig run OPTIONS --json``; GB/s figures over the moving phases.

    ``rate``: the report's own measure (transferred bytes over the time
    pages moved); ``wall``: the same bytes over the wall time of the moving
    phases, set-up included.  Exits naming ``label`` if the run fails.
    """
    with tempfile.TemporaryDirectory() as work:
        report_path = Path(work) / "report.json"
        result = subprocess.run([sys.executable, "-m", "vmmig", "run", *options,
                                 "--json", str(report_path)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{label}: vmmig run failed:\n{result.stderr}")
        report = json.loads(report_path.read_text())
    transferred = report["ram"]["transferred"]
    moving = sum(report["phases"].get(phase, 0) for phase in MOVING_PHASES) / 1000
    return {"rate": report["ram"]["mbps"] / 8 / 1000, "wall": transferred / moving / 1e9,
            "transferred": transferred / 1e9, "downtime": report["downtime"],
            "total": report["total-time"] / 1000}
