"""Decode under CUDA graphs: the static state the mosaickv backend's captured steps read.

SGLang's decode graph runner calls the backend's ``init_forward_metadata_out_graph``
before capturing each batch size and before every replay, and a captured forward must
not touch the host. So whatever a decode step decides on the host is written here, into
buffers whose addresses the graphs keep:

* the kernels' plan: a :class:`~mosaickv.kernels.graph_plan.GraphPlan` whose launches
  cover the policy's kernel menu and read their item counts from the device;
* the dense rows the step's new tokens are written to (the pool's ``prepare_writes``);
* where each query's statistics go: per layer, the channel energies (and, with a window,
  the attention each query pays its own segment) land in device buffers, deferred to the
  pool's :class:`~mosaickv.sglang_patch.query_stats.SegmentQueryStats` and added to its
  tables on this stream at the next step.

Capacity is the worst batch the runner can replay: ``max_bs`` requests, each as long as
the model's context, every segment of it sealed or every token of it dense.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton

from mosaickv.kernels.decode import MixedAttention, run_plan
from mosaickv.kernels.graph_plan import GraphCapacity, GraphPlan
from mosaickv.kernels.layout import default_max_programs
from mosaickv.uploads import upload
from mosaickv.sglang_patch.forward_inputs import WHOLE_RUNS, RequestKV, host_plan, stat_inputs

logger = logging.getLogger(__name__)


class DecodeGraph:
    """Static buffers for decode batches of up to ``max_bs`` requests; ``prepare`` fills
    them on the host, ``attend``/``record`` are what the captured layers run."""

    def __init__(self, pool, num_q_heads: int, max_bs: int, menu: list[tuple[int, int, int]], aligned: bool,
                 tuning: MixedAttention, max_context: int) -> None:
        self.pool, self.tuning, self.aligned = pool, tuning, aligned
        hkv, layers, d = pool.head_num, pool.layer_num, pool.head_dim
        self.group = num_q_heads // hkv
        seg = pool.plan.segment_size
        dev = torch.device(pool.device)
        self.max_programs = default_max_programs(dev)
        blocks = max_bs * hkv * layers * -(-max_context // seg)
        # A packed run of n blocks keeps at most n * seg tokens, so it takes at most
        # n * ceil(seg / width) tiles of the narrowest width (a tile capped at fewer lanes
        # ends at a block's end: no more of them).
        shape = tuning.tile_shape()
        tiles = 0 if shape is None else blocks * -(-seg // int(shape.widths[shape.widths > 0].min(initial=seg)))
        capacity = GraphCapacity(requests=max_bs, blocks=blocks, items=max_bs * hkv * (len(menu) + 2),
                                 groups=max_bs * hkv, tail_rows=max_bs * max_context, tiles=tiles)
        block_m = max(tuning.block_m, triton.next_power_of_2(self.group))
        self.plan = GraphPlan(menu, capacity, layers, block_m, tuning.block_n, d, self.max_programs, dev)
        self.write_rows = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        window = pool.query_stats.window
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.in_window = torch.zeros(max_bs, dtype=torch.bool, device=dev)
        self.key_rows = torch.zeros(max_bs, seg, dtype=torch.int64, device=dev)
        self.energy = torch.zeros(layers, max_bs, hkv, d, dtype=torch.float64, device=dev)
        self.attn = torch.zeros(layers, max_bs, hkv, seg, dtype=torch.float64, device=dev) if window else None
        logger.info("MosaicKV: decode CUDA graphs for up to %d requests of %d tokens, %.1f MiB of static buffers",
                    max_bs, max_context, self.nbytes() / 2**20)

    def nbytes(self) -> int:
        mine = [self.write_rows, self.positions, self.in_window, self.key_rows, self.energy]
        return self.plan.nbytes() + sum(t.nbytes for t in mine) + (0 if self.attn is None else self.attn.nbytes)

    def prepare(self, reqs: list[RequestKV], bs: int) -> None:
        """Fill the buffers for ``reqs`` (the batch's real requests, padded by the runner to
        ``bs``): their plan, the dense rows of their new tokens (padding rows write to the
        pool's padding row), their statistics' inputs; and defer those statistics.
        Capture passes no requests: an empty plan, every write to padding. Nothing here
        waits for the GPU: the previous replay may still run, and every copy is queued on
        this stream behind it."""
        pool, n = self.pool, len(reqs)
        pool.query_stats.flush()  # queues the previous replay's sums before this one overwrites them
        cap = self.plan.capacity.items
        host, tail_rows = host_plan(pool, reqs, self.group, self.tuning, self.max_programs, max_items=cap)
        if any(len(layer.items) > cap for layer in host.layers):
            # Whole runs: every (request, head, format pair) one item, which the capacity
            # holds (a run per menu entry and group).
            host, tail_rows = host_plan(pool, reqs, self.group, self.tuning, self.max_programs, WHOLE_RUNS)
            if any(len(layer.items) > cap for layer in host.layers):
                raise RuntimeError(f"a decode batch of {n} requests needs more than {cap} kernel items per layer "
                                   "even in whole runs")
        self.plan.load(host, tail_rows.numpy())
        rows = torch.zeros(bs, dtype=torch.int64)
        if n:
            rows[:n] = pool.dense_rows(torch.cat([req.slots[-1:] for req in reqs]))
        self.write_rows[:bs].copy_(upload(rows, self.write_rows.device))
        if not n:
            return
        inputs = stat_inputs(pool, reqs)
        stats = pool.query_stats
        in_window = inputs.positions >= stats.segment_size - stats.window
        self.positions[:n].copy_(upload(inputs.positions, self.positions.device))
        self.in_window[:n].copy_(upload(in_window, self.in_window.device))
        if inputs.rows is not None:
            self.key_rows[:n].copy_(inputs.rows)
        for layer in range(pool.layer_num):
            stats.defer_decode(layer, self.energy[layer, :n], None if self.attn is None else self.attn[layer, :n],
                               inputs.firsts, in_window.tolist(), self.group)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
               k_buf: torch.Tensor, v_buf: torch.Tensor, scale: float) -> None:
        """One layer's attention through the static plan (local ``layer``)."""
        pool = self.pool
        run_plan(self.plan.plans[layer], pool.arena.values, pool.arena.data, pool.block_table, self.aligned, k_buf,
                 v_buf, self.plan.tail_rows, q, out, scale, self.group, self.tuning, lse)

    def record(self, layer: int, q: torch.Tensor, lse: Optional[torch.Tensor], k_buf: torch.Tensor,
               scale: float) -> None:
        """One layer's query statistics into the static buffers (all ``bs`` rows; only the
        real requests' are deferred)."""
        stats, bs = self.pool.query_stats, q.shape[0]
        self.energy[layer, :bs].copy_(stats.query_energy(q))
        if self.attn is not None:
            attn = stats.paid_attention(q[:, None], lse[:, None], k_buf[self.key_rows[:bs]], self.positions[:bs, None],
                                        self.in_window[:bs, None], scale)
            self.attn[layer, :bs].copy_(attn)

