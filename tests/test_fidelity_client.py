"""The serving fidelity comparison (benchmarks/serving/fidelity_client.py): identical
outputs score zero KL and full agreement; a moved top token is counted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "fidelity_client", Path(__file__).resolve().parent.parent / "benchmarks" / "serving" / "fidelity_client.py")
fidelity_client = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fidelity_client)


def _write(path: Path, tops: list[dict[int, float]]) -> str:
    path.write_text(json.dumps({"top_k": 3, "prefix": 4, "total": 8,
                                "texts": [{"cached_tokens": 4, "top": [{str(k): v for k, v in t.items()} for t in tops]}]}))
    return str(path)


def test_identical_outputs_have_zero_kl_and_full_agreement(tmp_path: Path) -> None:
    tops = [{1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.05)}, {4: math.log(0.9), 5: math.log(0.05), 6: math.log(0.01)}]
    res = fidelity_client.compare(_write(tmp_path / "a.json", tops), _write(tmp_path / "b.json", tops), str(tmp_path / "o.json"))
    assert res["top1_agreement"] == 1.0
    assert res["topk_kl_mean"] == 0.0


def test_a_moved_top_token_lowers_agreement_and_raises_kl(tmp_path: Path) -> None:
    a = [{1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.05)}]
    b = [{2: math.log(0.6), 1: math.log(0.3), 7: math.log(0.05)}]
    res = fidelity_client.compare(_write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b), str(tmp_path / "o.json"))
    assert res["top1_agreement"] == 0.0
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6) + 0.05 * math.log(0.05 / 0.05)
    assert math.isclose(res["topk_kl_mean"], expected, rel_tol=1e-9)
