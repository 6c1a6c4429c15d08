"""benchmarks/device_session.sh refuses what it cannot run before touching the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/device_session.sh"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30)


def test_an_unknown_part_is_refused_by_name(tmp_path):
    got = run({"PART": "everything", "OUT": str(tmp_path)})
    assert got.returncode == 2 and "PART=everything is not one of one_first, ncu, first, profile, profile_8b, census, eq, admission" in got.stdout
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_part_and_an_out_folder_are_required(tmp_path):
    assert "set PART" in run({"OUT": str(tmp_path)}).stderr
    assert "the device call sets OUT" in run({"PART": "eq"}).stderr


def test_every_gpu_test_file_is_run_by_a_device_script():
    """A GPU test no device call runs never runs: the channel-pricing tests were missing
    from backend_gpu.sh's list through the fourteenth run."""
    scripts = "\n".join(p.read_text() for p in (ROOT / "benchmarks").rglob("*.sh"))
    marked = [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
              if p.name != Path(__file__).name and "pytest.mark.gpu" in p.read_text()]
    assert "test_kernels_channel_pricing.py" in marked
    assert [name for name in marked if f"tests/{name}" not in scripts] == []
