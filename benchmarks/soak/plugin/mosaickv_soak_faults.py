"""A token scorer that fails on purpose, for the fault-injection soak of issue 6.

Registered through the ``mosaickv.policies`` entry point of the metadata folder beside
this file (``mosaickv_soak_faults-0.1.dist-info``), so putting this folder on PYTHONPATH
is all a server needs: the launcher finds the part when it loads the policy, and the
scheduler imports this module when it unpickles the policy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from mosaickv.errors import check
from mosaickv.parts import Observation, TokenScorer
from mosaickv.registry import register_scorer

FAULTS = ("raise", "nan", "shape")
_COUNTING = threading.Lock()  # module-level: the policy (and its parts) is pickled to the scheduler


def fault_at(call: int, every: int) -> Optional[str]:
    """The fault of the ``call``-th score (from 0): every ``every``-th call fails, by
    raising, with NaN and with the wrong shape in turn; the others succeed. A segment asks
    the scorer once per layer, so ``every`` above the layer count lets whole segments seal
    between two faults."""
    if call % every != every - 1:
        return None
    return FAULTS[(call // every) % len(FAULTS)]


@register_scorer("fault_injector")
@dataclass
class FaultInjector(TokenScorer):
    """Key norms as scores, except on the calls :func:`fault_at` picks. Each sealing
    process (``--kv-compress-workers``) counts its own calls, under a lock for callers
    that share one; which segment a call belongs to is fixed only with one process."""

    every: int = 64
    calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check(self.every >= 2, "every", self.every, "an integer >= 2")

    def score(self, obs: Observation) -> torch.Tensor:
        with _COUNTING:
            call = self.calls
            self.calls += 1
        fault = fault_at(call, self.every)
        scores = obs.keys.float().norm(dim=-1)  # [Hkv, T], >= 0
        if fault == "raise":
            raise RuntimeError(f"injected fault at call {call}")
        if fault == "nan":
            return torch.full_like(scores, float("nan"))
        if fault == "shape":
            return scores[:, :-1]
        return scores
