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

from mosaickv.sglang_patch.radix import decode_seal_hook, idle_drain_hook  # noqa: E402
from seal_compressors import SEG, CountingCompressor  # noqa: E402
from test_sglang_radix import WINDOW, make_cache, prefill  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _published_server_args():
    """A scheduler process has its ServerArgs published (Req reads serving settings)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy"), role="test")


class Serving:
    """Requests through the scheduler's steps on one tree: prefill (inserted as SGLang does
    after it), then decode steps (a slot and KV for each token fed, the outputs appended,
    the plugin's hook once for the batch), then finish (SGLang's cache_finished_req).
    ``req`` and ``slots`` are the first request's."""

    def __init__(self, prompt_len: int, requests: int = 1, **cache_kw) -> None:
        self.comp = CountingCompressor()
        self.tree, self.pool, self.alloc = make_cache(self.comp, **cache_kw)
        tree = self.tree
        self.reqs, self.all_slots = [], []
        for r in range(requests):
            req = Req(f"r{r}", "", array("q", range(r * 1000, r * 1000 + prompt_len)), SamplingParams(max_new_tokens=1000))
            tree.req_to_token_pool.alloc([req])
            slots = prefill(self.pool, self.alloc, prompt_len)
            tree.req_to_token_pool.write((req.req_pool_idx, slice(0, prompt_len)), slots.int())
            req.kv_committed_len = prompt_len
            req.last_node, req.prefix_indices, req.cache_protected_len = tree.root_node, torch.empty(0, dtype=torch.int64), 0
            req.set_extend_range(0, prompt_len)
            req._refresh_fill_ids()
            maybe_cache_unfinished_req(req, tree)
            req.output_ids.append(10_000)
            self.reqs.append(req)
            self.all_slots.append(slots)

    @property
    def req(self) -> Req:
        return self.reqs[0]

    @property
    def slots(self) -> torch.Tensor:
        return self.all_slots[0]

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            for i, req in enumerate(self.reqs):
                slot = prefill(self.pool, self.alloc, 1)
                self.tree.req_to_token_pool.write((req.req_pool_idx, req.kv_committed_len), slot.int())
                self.all_slots[i] = torch.cat([self.all_slots[i], slot])
                req.kv_committed_len += 1
                req.output_ids.append(10_000 + len(req.output_ids))
            decode_seal_hook(None, SimpleNamespace(tree_cache=self.tree), SimpleNamespace(reqs=self.reqs))
            for req in self.reqs:  # under the overlap scheduler the newest token's write may still be in flight
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


def test_segments_closed_while_decoding_seal_together_or_after_half_a_segment():
    """With ``decode_batch``, the segments requests close while decoding wait and seal in
    one submission: once that many wait, once the oldest waited half a segment's steps, or
    at once when the dense rows run short."""
    run = Serving(40, requests=3, decode_batch=4)
    submitted = []
    submit = run.tree._submit
    run.tree._submit = lambda due: (submitted.append(len(due)) if due else None, submit(due))[1]
    after_prefill = run.comp.calls
    run.decode(9)  # 48 tokens written at step 9: each request's segment 1 comes out of the window...
    assert run.comp.calls == after_prefill and submitted == []  # ...and 3 < 4 wait
    run.decode(SEG // 2 - 1)
    assert submitted == []
    run.decode(1)  # half a segment's steps after the one that closed them
    assert submitted == [3] and run.comp.calls == after_prefill + 3
    assert run.pool.stats()["decode_inserts"] == 3

    run = Serving(40, requests=2, decode_batch=2)
    run.tree._submit = lambda due, submit=run.tree._submit: (submitted.append(("pair", len(due))), submit(due))[1]
    run.decode(9)
    assert submitted[-1] == ("pair", 2)  # two waiting: sealed together at once

    run = Serving(40, requests=1, decode_batch=4)
    calls = run.comp.calls
    run.decode(9)
    assert run.comp.calls == calls  # waiting...
    idle_drain_hook(SimpleNamespace(tree_cache=run.tree))
    assert run.comp.calls == calls + 1  # ...until the server goes idle

    run = Serving(40, requests=1, decode_batch=4, defer_margin=1 << 30)  # never enough dense rows free
    calls = run.comp.calls
    run.decode(9)
    assert run.comp.calls == calls + 1  # sealed at the step that closed it


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


def test_segments_closed_at_one_step_seal_a_call_s_worth_a_step():
    """Requests decoding in step close their segments at the same step: a sealing call's
    worth (``decode_batch``) seals at each step, oldest first; fewer than that wait (half
    a segment's steps), or seal at once when the server goes idle."""
    for batch, want in ((2, [2, 2]), (3, [3])):
        run = Serving(40, requests=4, decode_batch=batch)
        submitted = []
        submit = run.tree._submit
        run.tree._submit = lambda due, submit=submit, submitted=submitted: (
            submitted.append(len(due)) if due else None, submit(due))[1]
        run.decode(9)  # all four close segment 1 at this step
        assert submitted == want[:1]
        run.decode(2)
        assert submitted == want
        idle_drain_hook(SimpleNamespace(tree_cache=run.tree))
        assert sum(submitted) == 4 and run.pool.stats()["sealed_segments"] == run.comp.calls


def test_segments_closed_at_one_step_are_inserted_a_few_a_step(monkeypatch):
    """Requests decoding in step close segments at the same step; inserting them all there
    was one step's spike (decode_hook_host.py): at most DECODE_INSERTS_PER_STEP a step
    (or enough for every request within half a segment's steps), the rest at the next
    steps, every one in the end; all at once when dense rows run short."""
    monkeypatch.setattr("mosaickv.sglang_patch.radix.DECODE_INSERTS_PER_STEP", 1)
    run = Serving(40, requests=4)
    counted = lambda: run.pool.stats()["decode_inserts"]  # noqa: E731
    run.decode(8)
    assert counted() == 0
    inserted = []
    for _ in range(4):  # from 48 tokens written on, all four have closed segment 1
        run.decode(1)
        inserted.append(counted())
    assert inserted == [1, 2, 3, 4]
    assert all(req.cache_protected_len == 48 for req in run.reqs)

    run = Serving(40, requests=4, defer_margin=1 << 30)  # never enough dense rows free
    run.decode(9)
    assert run.pool.stats()["decode_inserts"] == 4
