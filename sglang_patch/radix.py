"""Radix cache whose nodes own sealed, compressed segments.

Built on SGLang's RadixCache: the tree's page granularity is the policy's segment size,
so every node starts and ends on a segment boundary and owns whole segments; a split
hands each side its own segments, eviction frees a node's slabs with its tokens. After
each insert the path is walked and every full segment that is neither a sink nor inside
the recent window is sealed once: a prefix shared by many requests is compressed once,
from its own keys, values and queries (nothing from any one request's suffix).

A decode step never waits for compression: at insert (between forwards) the scheduler
thread snapshots a due segment's dense K/V and query statistics to the host, reserves
its slab, marks it PENDING (still served from its dense rows) and hands it to worker
processes (:class:`mosaickv.sealer.SealWorkers`, which says why not threads); they
touch no pool, tree or device state and return the slab's bytes and table rows. Finished results are swapped in only at step
boundaries (the start of ``insert`` and ``match_prefix``, an idle scheduler's ``on_idle``,
or ``drain``); a result whose node was evicted meanwhile is discarded.

The snapshot (and with ``--kv-compress-sealing device`` the inline sealing) runs on a
CUDA stream of its own, so that its reads to the host do not wait for the forward in
flight; a due segment whose slot values that forward's stream has not copied into the
tree yet waits for a later drain (:meth:`MosaicRadixCache._mark_written`).

Sealing never takes the request down with it: a policy part that fails, or any other
error in the worker, leaves that segment dense for good (logged once, counted), and a
full arena leaves it dense until eviction frees a slab (the next insert on its path retries).
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, wait as wait_all
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import maybe_cache_unfinished_req
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from mosaickv.compressor import PartFailure, prices_lowrank
from mosaickv.kernels.channel_pricing import warm_channel_pricing
from mosaickv.kernels.knapsack import warm_knapsack
from mosaickv.kernels.layout import Region
from mosaickv.packed_sealing import PackedSealer
from mosaickv.policies.strategies import knapsack_on_gpu
from mosaickv.uploads import upload
from mosaickv.sealer import CompressFn, PolicyCompressor, SealWorkers, SegmentInputs, seal_segment
from mosaickv.sglang_patch.args import DEVICE_SEALING
from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool
from mosaickv.sglang_patch.seal_thread import SealThread
from mosaickv.sglang_patch.sizing import prefill_batch_tokens

logger = logging.getLogger(__name__)

# node.mosaic_slabs entry of a segment whose compression failed: it stays dense, never retried.
LEFT_DENSE = -2
# node.mosaic_slabs entry of a segment whose compression is in flight: served dense until applied.
PENDING = -3


@dataclass
class _SealJob:
    """A segment handed to the workers; ``node``/``index`` follow it through splits."""

    node: TreeNode
    index: int
    pages: list[int]
    slab: int  # reserved at submit; the region is laid out for it
    future: Future


# Segments one inline seal_many call takes by default (--kv-compress-seal-batch). On an H200,
# 8B-shaped segments: 863/s at 32 per call, 990 at 64, 984 at 128, with 4.4, 8.4 and 16.4
# GiB of workspace (benchmarks/results/h200x2_2026-11-30e/sealing_batched.json). In a server
# (eleventh run, 8B shape, random 8k) 64 a call served 449.2 tok/s against 406.8 at 32, but
# it takes twice the workspace outside the KV pool, which a smaller GPU may not have.
SEAL_BATCH = 32
# A call's workspace grows with its segments' K/V elements, so smaller models seal more per
# call in the workspace of SEAL_BATCH 8B-shaped ones (32 layers x 8 KV heads x 128 x 32
# tokens), at most MAX_SEAL_BATCH. At 32 a call SmolLM2-135M sealed 60,720 segments in
# 62.7 s on an H200, about 1 ms a segment as for the 8B: bound by the call, not the bytes
# (h200x2_2026-11-30g/summary.json). Larger models keep SEAL_BATCH.
REFERENCE_SEGMENT_ELEMENTS = 32 * 8 * 128 * 32
MAX_SEAL_BATCH = 256
# A policy without low-rank options prices no block by its Gram eigenvalues, and its call
# needs about a quarter of the workspace a segment: 8B-shaped, 32 a call, 1,215 MiB against
# 4,067 with `mosaic`'s, 128 a call 3,835 against 15,240; 2,513 segments/s against 1,069 at
# 32 a call and 2,755 at 128 (twentieth run, h200_2026-12-02c, calls 16-17). So it seals
# this many times the segments a call in the same workspace.
LOWRANK_FREE_WORKSPACE_SHARE = 4
# Segments closed while decoding that seal together (MosaicRadixCache.seal_decoded) when
# worker processes seal them: on an H200 a call for one 8B-shaped segment took 30 ms (33.2
# segments/s) and one for eight about 57 ms (139.7/s, the session before), and requests
# close segments at different steps. Sealing on the device takes a whole sealing call's
# worth (the seal batch): at 240 requests SmolLM2 closed about 7 segments a step, so eight
# a call sealed at nearly every step, and its ITL p50 was 57.4 ms against none's 9.9
# (h200x2_2026-11-30g). The oldest waits at most half a segment's steps either way.
DECODE_SEAL_BATCH = 8
# Decoded segments inserted a step at least (more with many requests: see
# MosaicRadixCache.cache_decoded). Requests that decode in step close their segments at the
# same step, and inserting all 512 of a shared-prefix workload's there took 173 ms of one
# step's bookkeeping on a 2-core CPU (decode_hook_host.py, 0.34 ms an insert).
DECODE_INSERTS_PER_STEP = 32


def _run_now(seal: Callable[[SegmentInputs], Region], inputs: SegmentInputs) -> Future:
    """``seal`` on the calling thread, as a finished future (inline sealing)."""
    future: Future = Future()
    future.set_running_or_notify_cancel()
    try:
        future.set_result(seal(inputs))
    except Exception as err:  # noqa: BLE001 - reported when the job is applied
        future.set_exception(err)
    return future


class MosaicRadixCache(RadixCache):
    """RadixCache + per-node sealed segments in the pool's arena."""

    def __init__(self, params: CacheInitParams, *, compress: CompressFn, segment_size: int,
                 sink_segments: int, window: int, background: bool = True, workers: int = 1,
                 on_device: bool = False, seal_inline: Optional[Callable[[SegmentInputs], Region]] = None,
                 defer_margin: int = 0, decode_batch: int = 1, seal_batch: int = SEAL_BATCH,
                 seal_thread: bool = False) -> None:
        """``background``: compress in ``workers`` processes (False: inline in ``insert``,
        on the host, or with ``on_device`` where the pool is, K/V never leaving it).
        ``seal_inline``: what inline sealing runs (default: ``seal_segment`` of ``compress``;
        on the device, the packer's one launch). ``defer_margin`` > 0: a prompt's segments
        stay dense until its last prefill chunk while at least that many dense rows stay
        free (see :meth:`insert`); 0 seals after every chunk. ``decode_batch`` > 1: the
        segments running requests close while decoding wait to seal together, up to that
        many (see :meth:`seal_decoded`). ``seal_batch``: segments per call of a sealer that
        takes many (see :meth:`_seal_now`). ``seal_thread``: sealing on the device runs on a
        thread beside the scheduler (:class:`~mosaickv.sglang_patch.seal_thread.SealThread`),
        not inline."""
        if on_device and background:
            raise ValueError("sealing on the device runs inline: background must be False")
        if seal_thread and not on_device:
            raise ValueError("seal_thread=True seals on the device on a thread: it needs on_device=True")
        pool = params.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(pool, MosaicKVPool):
            raise TypeError(f"MosaicRadixCache needs a MosaicKVPool, got {type(pool).__name__}")
        if segment_size % params.page_size:
            raise ValueError(f"page_size {params.page_size} must divide segment_size {segment_size}")
        self.pool = pool
        self.compress = compress
        self._seal_inline = seal_inline or partial(seal_segment, compress)
        self.segment_size = segment_size
        self.sink_segments = sink_segments
        self.window = window
        self._workers = SealWorkers(compress, workers) if background else None
        self.on_device = on_device
        self._thread = SealThread(pool.device, pool.counters) if seal_thread else None
        self.defer_margin = defer_margin
        self.decode_batch = decode_batch
        if seal_batch < 1:
            raise ValueError(f"seal_batch={seal_batch} must be at least 1")
        self.seal_batch = seal_batch
        self._decoding = False  # an insert from cache_decoded_segments is under way
        self._decoded: list[tuple[int, RadixKey]] = []  # (decode step, key) of inserts waiting to seal
        self._decode_steps = 0
        self._jobs: dict[int, _SealJob] = {}  # first slot of each PENDING segment -> its job
        # Due segments whose slot values the device has not written yet (see _written), by
        # (id(node), index): sealed at a later drain, once it has.
        self._unwritten: dict[tuple[int, int], tuple[TreeNode, int]] = {}
        self._seal_stream: Optional[torch.cuda.Stream] = None  # sealing's own (see _sealing)
        self.allocator_page_size = params.page_size
        params.page_size = segment_size  # tree granularity: nodes hold whole segments
        super().__init__(params)
        pool.dense_reclaimer = self.reclaim_dense

    # -- node bookkeeping ------------------------------------------------------------
    def _slabs(self, node: TreeNode) -> list[int]:
        """Slab id per segment of ``node`` (UNMAPPED while still dense)."""
        if not hasattr(node, "mosaic_slabs"):
            node.mosaic_slabs = [UNMAPPED] * (len(node.value) // self.segment_size)
        return node.mosaic_slabs

    def _split_node(self, key, child: TreeNode, split_len: int) -> TreeNode:
        slabs = self._slabs(child)
        new_node = super()._split_node(key, child, split_len)
        cut = split_len // self.segment_size
        new_node.mosaic_slabs, child.mosaic_slabs = slabs[:cut], slabs[cut:]
        if hasattr(child, "mosaic_written"):  # its values are a view of the child's: the same copy made them
            new_node.mosaic_written = child.mosaic_written
        for key, (node, j) in list(self._unwritten.items()):
            if node is child:
                del self._unwritten[key]
                self._wait_for_slots(*((new_node, j) if j < cut else (child, j - cut)))
        for node in (new_node, child):
            for j, slab in enumerate(node.mosaic_slabs):
                if slab == PENDING:
                    job = self._jobs[self._first_slot(node, j)]
                    job.node, job.index = node, j
        return new_node

    def _first_slot(self, node: TreeNode, index: int) -> int:
        """Key of a segment's job and query statistics (the slot of its first token)."""
        return int(node.value[index * self.segment_size])

    def _release(self, node: TreeNode) -> None:
        """Free ``node``'s slabs and cancel its pending jobs (their late results are discarded)."""
        for j, slab in enumerate(getattr(node, "mosaic_slabs", [])):
            if slab >= 0:
                self.pool.free_slab(slab)
            elif slab == PENDING:
                job = self._forget(self._first_slot(node, j))
                job.future.cancel()
                self.pool.arena.free(job.slab)
        node.mosaic_slabs = []
        if self._unwritten:  # most evictions find none waiting
            for j in range(len(node.value) // self.segment_size):
                self._unwritten.pop((id(node), j), None)
            self.pool.counters.waiting_for_slots = len(self._unwritten)

    def _delete_leaf(self, node: TreeNode) -> None:
        self._release(node)
        super()._delete_leaf(node)

    def reset(self) -> None:
        if hasattr(self, "root_node"):
            stack = [self.root_node]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                self._release(node)
        super().reset()

    # -- sealing ----------------------------------------------------------------------
    def insert(self, params: InsertParams) -> InsertResult:
        """Insert, then seal the path's due segments. Two inserts wait while
        ``defer_margin`` dense rows stay free:

        * after a middle prefill chunk (``params.chunked``): the request's later chunks then
          attend to its earlier ones dense, through SGLang's own extend kernel (on an H200,
          2.4x faster than ours over the same prefix sealed:
          benchmarks/results/h200x2_2026-11-30d/extend_h200.json), and its last chunk's
          insert seals the whole prompt;
        * a running request's decoded segment, with ``decode_batch`` > 1 (:meth:`seal_decoded`).

        With fewer rows free they seal as any insert does, so a long prompt never waits on
        rows only its own sealing would free."""
        self.drain(wait=False)
        result = super().insert(params)
        if self.disable:
            return result
        room = self.pool.free_dense_tokens() >= self.defer_margin
        if self._decoding and self.decode_batch > 1 and room:
            self._decoded.append((self._decode_steps, params.key))
            return result
        if params.chunked and self.defer_margin and room:
            self.pool.counters.seal_deferrals += 1
            return result
        self._seal(self._due(params.key))
        return result

    def cache_decoded(self, reqs: list) -> None:
        """After a decode step, for its running requests: insert the segments they closed
        (:meth:`cache_decoded_segments`), at most ``DECODE_INSERTS_PER_STEP`` a step, or
        as many as lets every request insert within half a segment's steps, unless dense
        rows run short; then seal what is due (:meth:`seal_decoded`). A request not
        reached inserts at a later step: its closed segment stays dense until then."""
        budget = max(DECODE_INSERTS_PER_STEP, -(-len(reqs) // max(1, self.segment_size // 2)))
        for req in reqs:
            if budget <= 0 and self.pool.free_dense_tokens() >= self.defer_margin:
                break
            budget -= self.cache_decoded_segments(req)
        self.seal_decoded()

    def cache_decoded_segments(self, req) -> bool:
        """Insert a decoding request's tokens up to its last whole segment, as
        ``cache_unfinished_req`` does after a prefill chunk, so that its segments seal
        during decode (SGLang inserts a decoding request only when it finishes, and its
        dense rows are sized for a window, not a generation). Acts when the tokens whose
        KV is written, less the newest one (under the overlap scheduler its write may still
        be in flight), close a segment not yet in the tree; SGLang's insert takes whole
        segments (the tree's pages). Whether it inserted."""
        written = req.effective_kv_committed_len() - 1
        if self.disable or written - written % self.segment_size <= req.cache_protected_len:
            return False
        req._refresh_fill_ids()  # origin + output ids, which decoding leaves stale
        req.set_extend_range(written - 1, written)  # what get_fill_ids (and so the insert) reads
        self._decoding = True
        try:
            maybe_cache_unfinished_req(req, self)
        finally:
            self._decoding = False
        self.pool.counters.decode_inserts += 1
        return True

    def seal_decoded(self, force: bool = False) -> None:
        """After each decode step: seal the segments that running requests closed, together,
        once ``decode_batch`` of them wait, the oldest has waited half a segment's decode
        steps, fewer than ``defer_margin`` dense rows are free, or ``force`` (an idle
        server); at most ``decode_batch`` a step unless idle or short of dense rows. A
        sealing call's cost grows far slower than its segments (see
        :data:`DECODE_SEAL_BATCH`), and requests close segments at different steps; a
        request closes its next segment only ``segment_size`` steps later, so it holds at
        most one segment waiting, within the two its dense tail allows."""
        waited = self._decode_steps - self._decoded[0][0] if self._decoded else 0  # steps since the oldest's
        self._decode_steps += 1
        short = self.pool.free_dense_tokens() < self.defer_margin
        if not self._decoded or not (force or short or len(self._decoded) >= self.decode_batch
                                     or waited >= self.segment_size // 2):
            return
        # One sealing call's worth a step, oldest first, unless idle or short of dense rows:
        # requests that decode in step close their segments at the same step (512 at once
        # on a shared-prefix workload), and sealing them all there stalls that one step.
        limit = None if force or short else self.decode_batch
        due, seen, taken = [], set(), 0
        for _, key in self._decoded:
            taken += 1
            for node, j in self._due(key):  # paths may share nodes: each segment once
                if (id(node), j) not in seen:
                    seen.add((id(node), j))
                    due.append((node, j))
            if limit is not None and len(due) >= limit:
                break
        self._decoded = self._decoded[taken:]
        self._seal(due)

    def reclaim_dense(self, tokens: int) -> None:
        """Evict least recently used cached paths until ``tokens`` dense rows are free or
        nothing is evictable. A cached path keeps its sinks and last window in dense rows,
        so enough of them fill the dense pool while the arena still has slabs, and
        SGLang's own eviction, driven by free logical slots, would not start."""
        pool = self.pool
        pool.counters.dense_reclaims += self._evict_while(lambda: max(0, tokens - pool.free_dense_tokens()))

    def reclaim_slabs(self, segments: int) -> None:
        """Evict least recently used cached paths until ``segments`` slabs are free (at most
        the arena's) or nothing is evictable. Sealed cached paths hold the slabs while dense
        rows stay free, so SGLang's eviction would not start, and new prompts' segments
        would stay dense (``arena_full``): less compressed than the policy's budget, while
        stale prefixes kept theirs (the fourteenth GPU run's accuracy servers, 12 s in)."""
        arena = self.pool.arena
        segments = min(segments, arena.num_slabs)
        self.pool.counters.slab_reclaims += self._evict_while(
            lambda: max(0, segments - arena.free_slabs) * self.segment_size)

    def _evict_while(self, short: Callable[[], int]) -> bool:
        """SGLang's LRU eviction while ``short()`` tokens are still wanted (at least a
        segment a round); whether it evicted anything."""
        reclaimed = False
        while short() > 0 and self.evictable_size() > 0:
            result = self.evict(EvictParams(num_tokens=max(short(), self.segment_size)))
            reclaimed = True
            if not result.num_tokens_evicted:
                break
        return reclaimed

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        # Finished results only: the scheduler matches prefixes while it builds the next
        # batch, before launching it, and sealing there (inline on the device) would keep
        # the GPU waiting for that launch. Segments waiting for their slots seal when
        # results are processed (insert) or the server is idle.
        self.drain(wait=False, submit=False)
        return super().match_prefix(params)

    def drain(self, wait: bool, submit: bool = True) -> None:
        """Swap in finished compressions (on the scheduler thread, between forwards);
        ``wait`` blocks on the pending ones first (tests, flush), nothing else ever does.
        ``submit``: also hand over the due segments whose slot values are now written."""
        if submit:
            self._submit_written(wait)
        if wait:
            wait_all([job.future for job in self._jobs.values()])
        done = [(first, job) for first, job in self._jobs.items() if job.future.done()]
        for first, _ in done:
            self._forget(first)
        for (_, job), slab in zip(done, self._apply(done)):
            job.node.mosaic_slabs[job.index] = slab

    def _due(self, key) -> list[tuple[TreeNode, int]]:
        """Every full, unsealed segment on ``key``'s path outside sinks and window."""
        match = super().match_prefix(MatchPrefixParams(key=key))
        node, chain = match.last_device_node, []
        while node is not None and node is not self.root_node:
            chain.append(node)
            node = node.parent
        self._mark_written(chain)
        total = sum(len(n.value) for n in chain)
        offset, due = 0, []
        for node in reversed(chain):
            slabs = self._slabs(node)
            for j in range(len(slabs)):
                start = offset + j * self.segment_size
                index = start // self.segment_size
                if slabs[j] == UNMAPPED and index >= self.sink_segments and start + self.segment_size <= total - self.window:
                    due.append((node, j))
            offset += len(node.value)
        return due

    def _mark_written(self, chain: list[TreeNode]) -> None:
        """Give the nodes of ``chain`` that have none an event recorded behind the copy that
        made their slot values: SGLang's insert copies them on the scheduler's stream
        (which waits for the whole forward in flight after an extend's launch) before this
        runs on it. Sealing reads a node's values only once its event has passed
        (:meth:`_written`). Marked here, when a path's segments are first due, rather than
        at every insert: one tree walk less per insert (a decode step's bookkeeping at 512
        requests, 4.28 -> 4.06 ms on average on a 2-core CPU, decode_hook_host.py)."""
        new = [node for node in chain if not hasattr(node, "mosaic_written")]
        event = self._values_copied(new[0].value) if new else None
        for node in new:
            node.mosaic_written = event

    def _values_copied(self, value: torch.Tensor):
        """An event behind the copy that made ``value``, on the current stream (None on the
        host: there is nothing to wait for)."""
        if not value.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _written(self, node: TreeNode, wait: bool = False) -> bool:
        """Whether the device has written ``node``'s slot values (``wait``: it has, once this
        returns). Read before that, they would wait for the forward in flight."""
        event = getattr(node, "mosaic_written", None)
        if event is not None:
            if not event.query():
                if not wait:
                    return False
                event.synchronize()
            node.mosaic_written = None
        return True

    def _wait_for_slots(self, node: TreeNode, index: int) -> None:
        self._unwritten[(id(node), index)] = (node, index)
        self.pool.counters.waiting_for_slots = len(self._unwritten)

    def _seal(self, due: list[tuple[TreeNode, int]]) -> None:
        """Submit ``due``'s segments whose slot values are written (the rest wait for a
        later drain); inline sealing has finished them by then: swap them in now. Short of
        dense rows (fewer than ``defer_margin`` free), it waits for the values instead:
        sealing then frees the rows before the next batch is built, as it did before
        segments waited (the next chunk would otherwise be cut to the rows left)."""
        short = self.pool.free_dense_tokens() < self.defer_margin
        ready = []
        for node, j in due:
            if self._written(node, wait=short):
                ready.append((node, j))
            else:
                self._wait_for_slots(node, j)
        self._submit(ready)
        if self._workers is None:  # inline sealing is done; a sealing thread's is waited for when rows are short
            self.drain(wait=short and self._thread is not None)

    def _submit_written(self, wait: bool) -> None:
        """Submit the waiting segments whose slot values are now written (``wait``: all),
        those still in the tree and unsealed."""
        if not self._unwritten:
            return
        ready = [(node, j) for node, j in self._unwritten.values() if self._written(node, wait)]
        for node, j in ready:
            del self._unwritten[(id(node), j)]
        self.pool.counters.waiting_for_slots = len(self._unwritten)
        self._submit([(node, j) for node, j in ready if j < len(self._slabs(node)) and self._slabs(node)[j] == UNMAPPED])

    @contextlib.contextmanager
    def _sealing(self):
        """Sealing's snapshot (and, sealing on the device, its work) on a CUDA stream of its
        own. On the scheduler's stream they would queue behind the forward in flight
        (SGLang's barrier after an extend's launch), and their reads to the host (slots,
        the segment copied for the worker processes, the plan's statistics) would wait for
        it, the GPU idle while the host then worked. Results are installed on the
        scheduler's stream after it waits for this one (:meth:`_apply`)."""
        if torch.device(self.pool.device).type != "cuda":
            yield
            return
        if self._seal_stream is None:
            self._seal_stream = torch.cuda.Stream(self.pool.device)
        with torch.cuda.stream(self._seal_stream):
            yield

    def _submit(self, due: list[tuple[TreeNode, int]]) -> None:
        """Snapshot the due segments' dense KV (all layers, one gather and one host copy
        for all of them) and query statistics, reserve their slabs and hand them to the
        workers; they become PENDING. Segments beyond the free slabs stay UNMAPPED (a
        later insert on their path retries)."""
        if not due:
            return
        pool, counters = self.pool, self.pool.counters
        free = pool.arena.free_slabs
        if len(due) > free:
            # No over-allocation: those segments keep their dense rows, and the allocator
            # (whose logical capacity counts those rows) makes SGLang evict.
            if counters.arena_full == 0:
                logger.warning("MosaicKV segment arena is full (%d slabs): new segments stay dense until "
                               "eviction frees slabs", pool.arena.num_slabs)
            counters.arena_full += len(due) - free
            due = due[:free]
            if not due:
                return
        with self._sealing():
            self._submit_on_stream(due)

    def _submit_on_stream(self, due: list[tuple[TreeNode, int]]) -> None:
        pool, counters = self.pool, self.pool.counters
        s = self.segment_size
        slots_host = torch.stack([node.value[j * s : (j + 1) * s] for node, j in due]).cpu().long()  # [n, S]
        rows = upload(pool.dense_rows(slots_host.reshape(-1)), pool.device)
        n, layers = len(due), pool.layer_num

        where = torch.device(pool.device) if self.on_device else torch.device("cpu")

        def snapshot(buffers) -> torch.Tensor:  # [n, layers, kv_heads, S, d] where sealing runs
            x = torch.stack([buffers[i][rows] for i in range(layers)]).view(layers, n, s, pool.head_num, -1)
            return x.permute(1, 0, 3, 2, 4).to(where)

        def observed(many) -> list[torch.Tensor | None]:  # every segment's statistics in one gather and one copy
            values, ok = many(firsts)
            values = values.to(where)
            return [values[g] if ok[g] else None for g in range(n)]

        k, v = snapshot(pool.k_buffer), snapshot(pool.v_buffer)
        firsts = slots_host[:, 0].tolist()
        slabs = [pool.arena.alloc() for _ in range(n)]
        batch = [SegmentInputs(k[g], v[g], pool.plan.segment_budget_bytes, rms, attention, pool.arena.base(slab))
                 for g, (slab, rms, attention) in enumerate(zip(slabs, observed(pool.query_stats.rms_many),
                                                                 observed(pool.query_stats.attention_many)))]
        if self._workers is not None:
            futures = [self._workers.submit(x) for x in batch]
        elif self._thread is not None:
            futures = self._thread.submit(self._seal_now, batch)
        else:  # the scheduler waits: its share of a prefill's time is counted
            start = time.perf_counter()
            futures = self._seal_now(batch)
            counters.inline_seal_seconds += time.perf_counter() - start
        for g, ((node, j), first, slab, future) in enumerate(zip(due, firsts, slabs, futures)):
            pages = torch.unique(slots_host[g] // self.allocator_page_size).tolist()
            self._jobs[first] = _SealJob(node, j, pages, slab, future)
            counters.pending_since[first] = time.monotonic()
            counters.compression_calls += 1
            node.mosaic_slabs[j] = PENDING

    def _seal_now(self, batch: list[SegmentInputs]) -> list[Future]:
        """Inline sealing, as finished futures: a sealer that takes many segments at once
        (the device's :meth:`~mosaickv.packed_sealing.PackedSealer.seal_many`) gets them
        ``seal_batch`` at a time; a batch that fails is sealed again one segment at a
        time, so that only a failing segment stays dense."""
        many = getattr(self._seal_inline, "seal_many", None)
        if many is None:
            return [_run_now(self._seal_inline, x) for x in batch]
        futures: list[Future] = []
        for lo in range(0, len(batch), self.seal_batch):
            chunk = batch[lo : lo + self.seal_batch]
            try:
                regions = many(chunk)
            except Exception:  # noqa: BLE001 - which segment failed is found alone
                futures += [_run_now(self._seal_inline, x) for x in chunk]
                continue
            for region in regions:
                future: Future = Future()
                future.set_running_or_notify_cancel()
                future.set_result(region)
                futures.append(future)
        return futures

    def _forget(self, first: int) -> _SealJob:
        """Untrack a job (applied or cancelled); it no longer holds a slab or counts as pending."""
        self.pool.counters.pending_since.pop(first)
        return self._jobs.pop(first)

    def _apply(self, done: list[tuple[int, _SealJob]]) -> list[int]:
        """The slab of each finished job's segment, or LEFT_DENSE (its slab freed) where
        sealing failed. The sealed ones are installed together (one fused copy of their
        bytes and one scatter of their table rows, :meth:`MosaicKVPool.install_many`); if
        that raises, each alone, so that only a failing segment stays dense."""
        pool = self.pool
        results = [self._result(job) for _, job in done]
        sealed = [(job, region) for (_, job), region in zip(done, results) if region is not None]
        if self._seal_stream is not None and done:  # what sealing wrote there (the regions' bytes) comes first
            here = torch.cuda.current_stream(self._seal_stream.device)
            if self._thread is None:  # a sealing thread finishes its regions' writes before their futures
                here.wait_stream(self._seal_stream)
            for _, region in sealed:
                if region.data.is_cuda:
                    region.data.record_stream(here)
        try:
            pool.install_many([job.slab for job, _ in sealed], [job.pages for job, _ in sealed],
                              [region for _, region in sealed])
            installed = {id(job) for job, _ in sealed}
        except Exception:  # noqa: BLE001 - which segment fails is found alone
            installed = {id(job) for job, region in sealed if self._installed(job, region)}
        slabs = []
        for _, job in done:
            if id(job) in installed:
                slabs.append(job.slab)
            else:
                pool.arena.free(job.slab)
                slabs.append(LEFT_DENSE)
        pool.query_stats.drop_many([first for first, _ in done])
        return slabs

    def _result(self, job: _SealJob) -> Region | None:
        """A finished job's region, or None if sealing failed (counted and logged once)."""
        try:
            return job.future.result()
        except PartFailure as err:
            self._failed(err)
        except Exception:  # noqa: BLE001 - a broken compressor must not take the scheduler down
            self._failed(None)
        return None

    def _installed(self, job: _SealJob, region: Region) -> bool:
        try:
            self.pool.install_many([job.slab], [job.pages], [region])
            return True
        except Exception:  # noqa: BLE001 - a region the pool refuses leaves its segment dense
            self._failed(None)
            return False

    def _failed(self, err: PartFailure | None) -> None:
        """Count a segment left dense: a policy part that failed on it (``err``), or an
        error of the compressor or the pool (logged with its traceback once)."""
        counters = self.pool.counters
        if err is not None:
            failures = counters.part_failures
            if err.part_name not in failures:
                logger.error("MosaicKV: %s; segments it fails on stay dense (logged once per part, counted in "
                             "server info: kv_compress_info.part_failures)", err)
            failures[err.part_name] = failures.get(err.part_name, 0) + 1
            return
        if counters.worker_errors == 0:
            logger.exception("MosaicKV: the compressor raised; segments it fails on stay dense (logged once, "
                             "counted in server info: kv_compress_info.worker_errors)")
        counters.worker_errors += 1

    def sealed_bytes(self) -> int:
        return self.pool.arena.used_bytes


def mosaic_radix_factory(ctx) -> RadixCache:
    """``register_radix_cache_backend`` factory: falls back to SGLang's chain when the
    radix cache is disabled (sealed segments then belong to one request)."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if ctx.disable_radix_cache:
        return default_radix_cache_factory(ctx)
    policy = ctx.server_args.mosaic_policy
    on_device = ctx.server_args.kv_compress_sealing in DEVICE_SEALING
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    seal_batch = ctx.server_args.kv_compress_seal_batch or default_seal_batch(
        pool, policy.segment_size, prices_lowrank(policy, ctx.model_config.head_dim))
    if on_device and torch.device(pool.device).type == "cuda":  # compiled before the first prefill's sealing call waits on them
        warm_channel_pricing(pool.device, pool.head_dim)
        if knapsack_on_gpu() == "kernel":
            warm_knapsack(pool.device)
    return MosaicRadixCache(
        ctx.params,
        compress=PolicyCompressor(policy, ctx.model_config.head_dim),
        segment_size=policy.segment_size,
        sink_segments=policy.sink_segments,
        window=policy.window,
        background=not on_device,
        workers=ctx.server_args.kv_compress_workers,
        on_device=on_device,
        seal_inline=PackedSealer(policy, ctx.model_config.head_dim) if on_device else None,
        defer_margin=prefill_batch_tokens(ctx.server_args),  # room for the next chunk
        decode_batch=seal_batch if on_device else DECODE_SEAL_BATCH,
        seal_batch=seal_batch,
        seal_thread=ctx.server_args.kv_compress_sealing == "device-thread",
    )


def default_seal_batch(pool, segment_size: int, lowrank: bool = True) -> int:
    """Segments per device sealing call without --kv-compress-seal-batch: SEAL_BATCH
    8B-shaped segments' workspace, in this pool's segments (SEAL_BATCH to MAX_SEAL_BATCH);
    ``lowrank`` False (the policy has no low-rank option, :func:`~mosaickv.compressor.prices_lowrank`): in that
    workspace, LOWRANK_FREE_WORKSPACE_SHARE times as many."""
    elements = pool.layer_num * pool.head_num * pool.head_dim * segment_size
    workspace = SEAL_BATCH * REFERENCE_SEGMENT_ELEMENTS * (1 if lowrank else LOWRANK_FREE_WORKSPACE_SHARE)
    return max(SEAL_BATCH, min(MAX_SEAL_BATCH, workspace // elements))


def idle_drain_hook(scheduler, *args, **kwargs) -> None:
    """BEFORE hook on ``Scheduler.on_idle``: an idle server swaps in finished sealing too
    (otherwise results wait for the next request's prefix match)."""
    tree = getattr(scheduler, "tree_cache", None)
    if isinstance(tree, MosaicRadixCache):
        tree.seal_decoded(force=True)
        tree.drain(wait=False)


def decode_seal_hook(result, processor, batch, *args, **kwargs) -> None:
    """AFTER hook on ``process_batch_result_decode``: the batch's running requests insert
    their decoded segments (:meth:`MosaicRadixCache.cache_decoded`)."""
    tree = getattr(processor, "tree_cache", None)
    if not isinstance(tree, MosaicRadixCache):
        return
    tree.cache_decoded([req for req in batch.reqs
                        if not (req.finished() or req.is_retracted or req.req_pool_idx is None)])


def register_backend() -> None:
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends, register_radix_cache_backend

    if "mosaickv" not in registered_radix_cache_backends():
        register_radix_cache_backend("mosaickv", mosaic_radix_factory)

