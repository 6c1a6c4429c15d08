"""Sealing during decode, on SGLang's real Req, radix cache, pools and allocator (CPU):
SGLang inserts a decoding request into the tree only when it finishes, so the plugin's
hook after each decode step inserts its whole segments, and they seal while it runs."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor  # noqa: E402
from sglang.srt.mem_cache.common import maybe_cache_unfinished_req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from mosaickv.sglang_patch.radix import decode_seal_hook  # noqa: E402
from seal_compressors import SEG, CountingCompressor  # noqa: E402
from test_sglang_radix import WINDOW, make_cache, prefill  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _published_server_args():
    """A scheduler process has its ServerArgs published (Req reads serving settings)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy"), role="test")


class Serving:
    """One request through the scheduler's steps: prefill (inserted as SGLang does after
    it), then decode steps (a slot and KV for the token fed, the output appended, the
    plugin's hook), then finish (SGLang's cache_finished_req)."""

    def __init__(self, prompt_len: int) -> None:
        self.comp = CountingCompressor()
        self.tree, self.pool, self.alloc = make_cache(self.comp)
        self.req = Req("r", "", array("q", range(prompt_len)), SamplingParams(max_new_tokens=1000))
        req, tree = self.req, self.tree
        tree.req_to_token_pool.alloc([req])
        self.slots = prefill(self.pool, self.alloc, prompt_len)
        tree.req_to_token_pool.write((req.req_pool_idx, slice(0, prompt_len)), self.slots.int())
        req.kv_committed_len = prompt_len
        req.last_node, req.prefix_indices, req.cache_protected_len = tree.root_node, torch.empty(0, dtype=torch.int64), 0
        req.set_extend_range(0, prompt_len)
        req._refresh_fill_ids()
        maybe_cache_unfinished_req(req, tree)
        req.output_ids.append(10_000)

    def decode(self, steps: int) -> None:
        req = self.req
        for _ in range(steps):
            slot = prefill(self.pool, self.alloc, 1)
            self.tree.req_to_token_pool.write((req.req_pool_idx, req.kv_committed_len), slot.int())
            self.slots = torch.cat([self.slots, slot])
            req.kv_committed_len += 1
            req.output_ids.append(10_000 + len(req.output_ids))
            decode_seal_hook(None, SimpleNamespace(tree_cache=self.tree), SimpleNamespace(reqs=[req]))
            # Under the overlap scheduler the newest token's write may still be in flight.
            assert req.cache_protected_len < req.kv_committed_len, "the newest token went into the tree"

    def dense_in_use(self) -> int:
        return self.pool.stats()["dense_tail_tokens_in_use"]


def test_the_hook_is_installed_on_sglangs_decode_result_processing():
    assert hasattr(SchedulerBatchResultProcessor.process_batch_result_decode, "__wrapped__")


def test_decoded_segments_seal_while_the_request_runs():
    """40 prompt tokens then 100 decoded: every segment that ends before the last written
    token's window seals during decode, dense rows stay bounded by the window and two
    segments, and the request reads its own slots back in order."""
    run = Serving(40)
    assert run.comp.calls == 1  # after prefill: segment 0 (segment 1 reaches into the window)
    run.decode(100)
    written = run.req.kv_committed_len - 1  # the newest token's write may be in flight
    inserted = written // SEG * SEG
    assert run.req.cache_protected_len == inserted == 128
    assert run.comp.calls == (inserted - WINDOW) // SEG == 7
    assert run.pool.stats()["sealed_segments"] == 7
    # One insert per segment the decoded tokens closed: 48, 64, ..., 128 written tokens.
    assert run.pool.stats()["decode_inserts"] == (inserted - 40 // SEG * SEG) // SEG == 6
    assert run.dense_in_use() == run.req.kv_committed_len - 7 * SEG <= WINDOW + 2 * SEG
    row = run.tree.req_to_token_pool.req_to_token[run.req.req_pool_idx, : run.req.kv_committed_len].long()
    assert torch.equal(row, run.slots)
    assert run.req.last_node.lock_ref > 0 and run.tree.protected_size() == inserted


def test_a_finished_request_leaves_every_slot_free_or_in_the_tree():
    """After decode-time inserts, SGLang's own cache_finished_req takes the request out:
    nothing stays protected, and free plus evictable slots are the whole pool (no leak)."""
    run = Serving(40)
    run.decode(61)
    tree, req = run.tree, run.req
    tree.cache_finished_req(req, kv_len_to_handle=req.kv_committed_len)
    tree.req_to_token_pool.free(req)
    tree.drain(wait=True)
    assert tree.protected_size() == 0
    assert run.alloc.available_size() + tree.evictable_size() == run.pool.size


def test_the_hook_skips_finished_retracted_and_unplaced_requests_and_other_trees():
    run = Serving(40)
    before = run.req.cache_protected_len
    run.req.kv_committed_len += 2 * SEG  # as if two segments were written
    for change in ({"finished_reason": "stop"}, {"is_retracted": True}, {"req_pool_idx": None}):
        saved = {k: getattr(run.req, k) for k in change}
        for k, v in change.items():
            setattr(run.req, k, v)
        decode_seal_hook(None, SimpleNamespace(tree_cache=run.tree), SimpleNamespace(reqs=[run.req]))
        for k, v in saved.items():
            setattr(run.req, k, v)
    decode_seal_hook(None, SimpleNamespace(tree_cache=object()), SimpleNamespace(reqs=[run.req]))
    assert run.req.cache_protected_len == before
