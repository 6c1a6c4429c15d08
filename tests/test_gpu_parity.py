"""Issue 5, part 1, kept as a GPU test: SGLang's greedy output may part from Hugging Face's
only where bf16 arithmetic order can decide, and by no more than HF's own bf16 does.

On the H100 (benchmarks/results/parity_h100.json) SGLang `none` and HF bf16 disagree on
the France prompt's first token ("L'Étoile" vs "The"): HF float32 puts those two tokens
0.08 nats apart, inside the 0.03-0.12 nats mean gap between HF bf16 and HF float32. The
bound asserted here: every greedy divergence from HF float32 sits at a step where HF
float32's own margin is below ``NEAR_TIE`` nats, and the mean prompt log-prob gap to HF
float32 is at most ``SLACK`` times HF bf16's.

Runs each engine in its own process (a process holds one model). The model comes from
``MOSAICKV_PARITY_MODEL`` (default: where ../shared/device/stage.sh builds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODEL = os.environ.get("MOSAICKV_PARITY_MODEL", "/tmp/mkv/models/smollm2-135m-instruct")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parity" / "parity.py"
NEAR_TIE = 0.5
SLACK = 1.5

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not Path(MODEL, "config.json").exists(), reason=f"no model at {MODEL}"),
]


def _run(*args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    pytest.importorskip("sglang")
    d = tmp_path_factory.mktemp("parity")
    _run("hf", "--model", MODEL, "--dtype", "float32", "--out", str(d / "hf_fp32.pt"))
    _run("hf", "--model", MODEL, "--dtype", "bfloat16", "--out", str(d / "hf_bf16.pt"))
    _run("sglang", "--model", MODEL, "--out", str(d / "none.pt"),
         "--engine", json.dumps({"attention_backend": "torch_native", "disable_radix_cache": False}))
    for name, attention in (("lossless", "sdpa"), ("lossless_kernels", "triton")):
        _run("sglang", "--model", MODEL, "--out", str(d / f"{name}.pt"),
             "--engine", json.dumps({"kv_compress": "mosaickv", "kv_compress_config": "lossless",
                                     "kv_compress_attention": attention, "disable_radix_cache": False}))
    return d


def _compare(d: Path, a: str, b: str) -> dict:
    out = d / f"{a}_vs_{b}.json"
    _run("compare", "--hf", str(d / f"{a}.pt"), "--sglang", str(d / f"{b}.pt"), "--json", str(out))
    return json.loads(out.read_text())


def _mean_gap(res: dict) -> float:
    return sum(p["prompt_logprob_absdiff_mean"] for p in res["prompts"]) / len(res["prompts"])


@pytest.mark.parametrize("engine", ["none", "lossless", "lossless_kernels"])
def test_sglang_parts_from_hf_only_at_near_ties(runs: Path, engine: str) -> None:
    res = _compare(runs, "hf_fp32", engine)
    for p in res["prompts"]:
        if not p["greedy_equal"]:
            assert p["a_logprob_gap_at_divergence"] < NEAR_TIE, p


@pytest.mark.parametrize("engine", ["none", "lossless", "lossless_kernels"])
def test_sglang_logprobs_are_as_close_to_fp32_as_hf_bf16(runs: Path, engine: str) -> None:
    assert _mean_gap(_compare(runs, "hf_fp32", engine)) <= SLACK * _mean_gap(_compare(runs, "hf_fp32", "hf_bf16"))


def test_lossless_equals_none_token_for_token(runs: Path) -> None:
    """Issue 3: with every token stored dense, the reference path is torch_native's."""
    res = _compare(runs, "none", "lossless")
    assert all(p["greedy_equal"] for p in res["prompts"]), [p for p in res["prompts"] if not p["greedy_equal"]]


def test_lossless_on_the_kernels_parts_from_none_only_at_near_ties(runs: Path) -> None:
    """The kernels round differently from torch_native (bf16 probabilities, split-K), so
    with every token dense their greedy output may leave none's only where none itself
    hesitates."""
    for p in _compare(runs, "none", "lossless_kernels")["prompts"]:
        if not p["greedy_equal"]:
            assert p["a_logprob_gap_at_divergence"] is not None, "none's run kept no top log-probs a step"
            assert p["a_logprob_gap_at_divergence"] < NEAR_TIE, p
