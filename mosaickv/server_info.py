"""What a running server says about its KV compression, from ``/get_server_info``.

A MosaicKV server seals segments in the background and swaps them in between steps, so a
client that wants a request to read a *compressed* prefix sends the prefix, waits here
until nothing is left pending, then sends the request that reuses it.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from mosaickv.launch import NO_PROXY


class Settled(NamedTuple):
    """What :func:`wait_sealed` saw: the seconds it waited, and how many segments the server
    had left dense so far because its arena was full (``arena_full``; 0 without MosaicKV).
    A prefix read after such a deferral may be partly dense: less compressed than its budget."""

    seconds: float
    arena_full: int


def kv_compress_info(root: str, timeout: float = 30.0) -> dict | None:
    """The first scheduler's ``kv_compress_info`` (None: the server does not compress with MosaicKV)."""
    with NO_PROXY.open(root.rstrip("/") + "/get_server_info", timeout=timeout) as response:
        states = json.loads(response.read().decode()).get("internal_states") or [{}]
    return states[0].get("kv_compress_info")


def wait_sealed(root: str, timeout: float = 300.0, poll: float = 0.2) -> Settled:
    """Wait until every segment handed to the sealing workers is swapped in (an idle
    MosaicKV server applies finished results itself); returns the seconds waited (0 at
    once for a server without MosaicKV) and the server's ``arena_full`` count. Raises
    TimeoutError naming what is still pending."""
    start = time.monotonic()
    while True:
        info = kv_compress_info(root)
        pending = 0 if info is None else int(info["sealing_pending"])
        if not pending:
            return Settled(time.monotonic() - start, 0 if info is None else int(info.get("arena_full", 0)))
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{root}: {pending} segments still sealing after {timeout:.0f} s "
                               f"(oldest pending {info.get('oldest_pending_s', 0):.0f} s)")
        time.sleep(poll)
