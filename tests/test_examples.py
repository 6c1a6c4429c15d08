"""The custom-policy example registers working parts (its full eval is the README's job)."""

import importlib.util
import sys
from pathlib import Path

import torch

from mosaickv.compressor import Compressor
from mosaickv.config import load_policy
from mosaickv.parts import Observation

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_policy.py"


def test_custom_policy_example_parts_compress_to_budget(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_policy_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    path = tmp_path / "p.yaml"
    path.write_text(module.POLICY)
    policy = load_policy(path, min_context=256)
    assert policy.token_scorer.power == 2.0
    g = torch.Generator().manual_seed(0)
    obs = [Observation(torch.randn(3, 512, 64, generator=g), torch.randn(3, 512, 64, generator=g), torch.randn(9, 512, 64, generator=g))]
    cache = Compressor(policy, 64).compress(obs)
    assert all(fmt.startswith("t32/k=lowrank") for fmt in cache.formats() if "dense" not in fmt)
    assert cache.dense_nbytes() / cache.nbytes() >= 3.0
