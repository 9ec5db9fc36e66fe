"""`enclave bench --matrix`, run briefly: every case against every target, with CPU per request
read from /proc, the issue's targets judged, and the JSON a user can keep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_the_cost_matrix_measures_every_case_and_judges_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli.main", "bench", "--matrix", "--size", "0.1",
         "--size", "4", "--concurrency", "4", "--seconds", "1", "--rounds", "1",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path),
             "ENCLAVE_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    cells = data["matrix"]
    cases = {c["case"] for c in cells}
    assert cases == {"0.1 KB", "4 KB, plain", "4 KB, dense", "0.1 KB, streamed",
                     "4 KB, plain, streamed", "4 KB, dense, streamed"}
    assert {c["target"] for c in cells} == {"bare proxy", "gateway, auth only",
                                          "gateway, every guard"}
    assert len(cells) == 6 * 3
    for cell in cells:
        assert cell["errors"] == 0, cell
        assert cell["rps"] > 0 and cell["cpu_us_per_request"] > 0, cell
    # A streamed answer of 512 events costs the gateway more CPU than a short JSON answer.
    by = {(c["case"], c["target"]): c for c in cells}
    guarded = "gateway, every guard"
    assert by[("0.1 KB, streamed", guarded)]["cpu_us_per_request"] > \
        by[("0.1 KB", guarded)]["cpu_us_per_request"]
    summary = "\n".join(data["summary"])
    assert "every guard / bare proxy, 4 KB, dense" not in summary  # judged at c=16 only
    assert "CPU per extra KB of prompt, dense, gateway, every guard" in summary
    assert "CPU per streamed event, gateway, every guard" in summary
    assert "The cost matrix" in result.stdout
