"""benchmarks/throughput.py's summary: medians, overheads against the same engine's vanilla,
the speedup against the reference-style loader, and images/s per core."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
throughput = pytest.importorskip("throughput")


def test_summary_per_core_and_overheads():
    R = throughput.Run
    runs = [R("torch", "vanilla", "full", images_per_s=[400, 420, 380]),
            R("torch", "+both", "full", images_per_s=[300, 320, 340]),
            R("reference", "+both", "full", images_per_s=[150, 160, 170])]
    s = throughput.summarise(runs, cores=2)
    assert s["median_images_per_s"]["torch"] == {"vanilla": 400, "+both": 320}
    assert s["overhead_percent_vs_vanilla"]["torch"]["+both"] == 25.0  # 400 / 320 - 1
    assert s["speedup_both_vs_reference_both"]["torch"] == 2.0
    assert s["median_images_per_s_per_core"]["torch"] == {"vanilla": 200.0, "+both": 160.0}
    assert s["cores"] == 2
