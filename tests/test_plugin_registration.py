"""A third-party package adds a scorer and a strategy through the ``mosaickv.policies`` entry point."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from mosaickv import registry
from mosaickv.config import load_policy
from mosaickv.errors import PolicyError

PACKAGE = "mosaickv_thirdparty_demo"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{PACKAGE}"
        version = "0.0.1"
        [project.entry-points."mosaickv.policies"]
        demo = "{PACKAGE}.parts"
        [tool.setuptools]
        packages = ["{PACKAGE}"]
    """))
    pkg = src / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "parts.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import torch
        from mosaickv.parts import TokenScorer
        from mosaickv.registry import register_scorer

        @register_scorer("demo_first_tokens")
        @dataclass
        class FirstTokens(TokenScorer):
            boost: float = 2.0

            def score(self, obs):
                hkv, t, _ = obs.keys.shape
                return torch.linspace(self.boost, 1.0, t).expand(hkv, t)
    """))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
    )
    sys.path.insert(0, str(target))
    registry.reload_plugins()
    yield
    sys.path.remove(str(target))


def test_entry_point_is_discovered_and_its_part_is_usable(installed_plugin):
    assert any(ep.name == "demo" for ep in entry_points(group=registry.ENTRY_POINT_GROUP))
    assert "demo_first_tokens" in registry.SCORERS.names()
    policy = load_policy({"token_scorer": {"name": "demo_first_tokens", "boost": 5.0}})
    assert policy.token_scorer.boost == 5.0
    with pytest.raises(PolicyError, match="boost"):
        load_policy({"token_scorer": {"name": "demo_first_tokens", "boost": "lots"}})


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_scorer("key_norm")(type("Impostor", (), {}))
