"""benchmarks/gpu_check.py on the CPU (--quick): every section runs, so the one command that
verifies the GPU path is known to work before a GPU machine is at hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_quick_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out), "--work", str(work), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    doc = json.load(open(out / "gpu_check_cpu_quick.json"))
    failed = {k: v.get("error", v.get("result")) for k, v in doc["sections"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    s = {k: v["result"] for k, v in doc["sections"].items()}
    assert list(s) == ["environment", "kernel parity", "kernel speed", "loader throughput", "training",
                       "process group", "contracam"]
    assert s["environment"]["device_stage"] == "numba"
    assert s["kernel parity"]["cases"] > 0 and "passed" in s["kernel parity"]["summary"]
    assert all(r["numba"]["ms"] > 0 and r["speedup_vs_torchvision"] > 0 for r in s["kernel speed"]["rows"])
    assert set(s["loader throughput"]["engines"]["torch"]) == {"vanilla", "+OA-Crop", "+BG-Mixup", "+both"}
    assert all("img_per_s" in r for r in s["loader throughput"]["engines"]["torch"].values())
    assert {r["method"] for r in s["training"]["rows"]} == {"moco", "byol"}
    assert all("loader_steps_per_s" in r for r in s["training"]["rows"]) and s["training"]["trainer"]["returncode"] == 0
    assert s["process group"]["all_reduce_ok"] and s["contracam"]["ok"]
    md = open(out / "gpu_check_cpu_quick.md").read()
    assert "## kernel speed: ok" in md and "| torch |" in md
