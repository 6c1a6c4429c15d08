"""Where the scheduler process waits for the GPU, counted by call site.

SGLang's overlap scheduler launches forward N+1 before it processes forward N's result,
and after an extend's launch its stream waits for that whole forward (the write-after-read
barrier). Any op there that makes the host wait for the device (a read to the host, an
index by a device mask, cuSOLVER's error check) then waits for the forward in flight, and
the host work after it no longer overlaps the GPU. py-spy shows such a wait only as time
in the op that happened to wait first: the tenth run's 8B prefill profile spent 39% of
the scheduler's time in one device-mask index, and removing it moves the wait to the next
synchronizing op. PyTorch names every synchronizing op when its sync debug mode is
"warn"; with ``MOSAICKV_SYNC_CENSUS=1`` in the server's environment this module counts
them by the innermost frames of this project or SGLang, and ``kv_compress_info`` lists
the most frequent under ``sync_census``. Off by default: each warning costs a stack walk.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

ENV = "MOSAICKV_SYNC_CENSUS"
MESSAGE = "called a synchronizing CUDA operation"  # c10::cuda::warn_or_error_on_sync
_OURS = (str(Path(__file__).resolve().parents[1]), os.sep + "sglang" + os.sep)  # this project, SGLang


class SyncCensus:
    """Counts of synchronizing ops per call site (``frames`` innermost frames of this
    project or SGLang, innermost first), while installed."""

    def __init__(self, frames: int = 3) -> None:
        self.frames = frames
        self.sites: Counter[str] = Counter()
        self._previous = None

    def install(self) -> None:
        """Turn PyTorch's sync debug mode to "warn" and count its warnings (others pass on)."""
        if not torch.cuda.is_available():
            raise RuntimeError(f"{ENV}=1 counts synchronizing CUDA operations: this process has no CUDA device")
        if self._previous is not None:
            return
        warnings.filterwarnings("always", message=MESSAGE)  # every one, not once per line
        self._previous = warnings.showwarning
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode("warn")

    def uninstall(self) -> None:
        if self._previous is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, self._previous = self._previous, None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if MESSAGE in str(message):
            self.record(traceback.extract_stack()[:-1])
        else:
            self._previous(message, category, filename, lineno, file, line)

    def record(self, stack: list[traceback.FrameSummary]) -> str:
        """Count one synchronizing op whose Python stack (outermost first) is ``stack``."""
        ours = [f for f in reversed(stack) if f.filename.startswith(_OURS[0]) or _OURS[1] in f.filename]
        picked = (ours or list(reversed(stack)))[: self.frames]
        site = " <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in picked)
        self.sites[site] += 1
        return site

    def top(self, n: int = 30) -> dict[str, int]:
        return dict(self.sites.most_common(n))


def _short(filename: str) -> str:
    """A path from the project's or SGLang's root, as a reader finds it."""
    if filename.startswith(_OURS[0]):
        return os.path.relpath(filename, _OURS[0])
    at = filename.rfind(_OURS[1])
    return filename[at + 1:] if at >= 0 else filename


def census_from_env() -> SyncCensus | None:
    """An installed census if ``MOSAICKV_SYNC_CENSUS`` is 1, None if unset or 0; anything
    else is an error (a typo should not silently count nothing)."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 to count synchronizing CUDA operations, 0 or unset not to")
    if value == "0":
        return None
    census = SyncCensus()
    census.install()
    return census
