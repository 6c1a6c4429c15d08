"""benchmarks/kernels/plot_diag.py charts a device run's diag_formats.json on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_loader import load_script

RUN = Path(__file__).resolve().parents[1] / "benchmarks/results/h200x2_2026-11-30j/kernels/diag_formats_segment32.json"


def test_every_setting_is_a_bar_labelled_by_its_knobs(tmp_path):
    plot = load_script("benchmarks/kernels/plot_diag.py")
    out = tmp_path / "diag.png"
    labels = plot.plot(json.loads(RUN.read_text()), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels[0] == "n32 pack32 /8" and labels[4] == "n32 pack64 /8" and labels[7] == "n32 pack32 w8 /4"
    assert len(labels) == len(set(labels)) == 10  # the tenth run's ten settings


def test_a_profile_only_run_is_refused(tmp_path):
    plot = load_script("benchmarks/kernels/plot_diag.py")
    empty = tmp_path / "profiled.json"
    empty.write_text(json.dumps({"device": "x", "segment": 32, "rows": []}))
    with pytest.raises(SystemExit, match="no timed rows"):
        plot.main([str(empty)])
