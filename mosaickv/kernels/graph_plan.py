"""Static plan buffers: a run step that one CUDA graph captures and every batch replays.

A captured launch keeps its grid and its pointers, and a plan changes every step. So a
:class:`GraphPlan` allocates, once, buffers sized for the largest batch it accepts, and
its layers' :class:`~mosaickv.kernels.layout.AttentionPlan` views launch every kernel
variant of a fixed menu (the policy's, :func:`~mosaickv.kernels.layout.launch_variants`)
with a fixed number of programs; each launch reads its item count from the device, so
variants a batch does not use exit at once. Before each replay :meth:`GraphPlan.load`
writes a batch's host plan (:func:`~mosaickv.kernels.layout.plan_host`) into those
buffers: its used parts in one host-to-device copy, then one scatter on the device
(sized for the worst batch, the buffers are tens to hundreds of MB, a batch's plan a few).
FlashInfer's ``plan`` outside the graph, ``run`` inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from mosaickv.kernels.layout import (
    GROUP_FIELDS,
    ITEM_FIELDS,
    REQUEST_FIELDS,
    SPARSE,
    AttentionPlan,
    HostLayer,
    HostPlan,
    Launch,
    TailSlots,
    aligned_counts,
    aligned_starts,
)



@dataclass(frozen=True)
class GraphCapacity:
    """The largest batch a :class:`GraphPlan` takes; a larger one is refused by name."""

    requests: int  # requests per batch
    blocks: int  # block indices, all layers together
    items: int  # items of one layer
    groups: int  # merge groups of one layer
    tail_rows: int  # dense tail tokens, all requests together
    tiles: int = 0  # packed tiles' starts, all layers together (MixedAttention(tile_starts=True)); 0: none

    def __post_init__(self) -> None:
        for f in fields(self):
            least = 0 if f.name == "tiles" else 1
            if getattr(self, f.name) < least:
                raise ValueError(f"GraphCapacity.{f.name}={getattr(self, f.name)} must be at least {least}")


class GraphPlan:
    """Static buffers for ``num_layers`` layers; ``plans[layer]`` is what a captured
    :func:`~mosaickv.kernels.decode.run_plan` reads and ``tail_rows`` its row map."""

    def __init__(
        self,
        variants: list[tuple[int, int, int]],
        capacity: GraphCapacity,
        num_layers: int,
        block_m: int,
        block_n: int,
        head_dim: int,
        max_programs: int,
        device: torch.device | str,
        max_q: int = 1,
    ) -> None:
        self.variants, self.capacity, self.max_programs = list(variants), capacity, max_programs
        self.max_q = max_q  # query tokens a request at most (decode: 1); launches are captured for it
        self.block_m, self.block_n = block_m, block_n
        dev = torch.device(device)
        cap, nv = capacity, len(self.variants)
        sizes = [cap.requests * len(REQUEST_FIELDS), cap.blocks, cap.tail_rows]
        sizes += [cap.items * len(ITEM_FIELDS), cap.groups * len(GROUP_FIELDS), cap.groups + 1, 4 * (nv + 1)]
        sizes += [cap.items] * nv
        self._layer_pieces = 4 + nv
        sizes = sizes[:3] + sizes[3:] * num_layers
        self._starts, total = aligned_starts(sizes)
        self._variant_of: dict[tuple[int, int, int], int] = {}  # (k_kind, v_kind, R_MAX) -> menu entry
        self._loaded: TailSlots | None = None  # the tail slots of the last plan load wrote in full
        self._tail_where = np.zeros(0, dtype=np.int64)  # where its tail items' ends are in the buffers
        self._pinned = dev.type == "cuda"
        self._host = torch.empty(0, dtype=torch.int64, pin_memory=self._pinned)  # grows to the largest load
        self._flat = torch.zeros(total, dtype=torch.int32, device=dev)
        self._staged = torch.cuda.Event() if self._pinned else None
        views = [self._flat[s : s + n] for s, n in zip(self._starts, sizes)]
        self.tail_rows = views[2]
        self.tiles = torch.zeros(max(cap.tiles, 1), dtype=torch.int32, device=dev)
        o_part = torch.zeros(cap.items, block_m, head_dim, dtype=torch.float32, device=dev)
        lse_part = torch.zeros(cap.items, block_m, dtype=torch.float32, device=dev)
        scratch_rows = max_programs if any(SPARSE in (k, v) for k, v, _ in self.variants) else 1
        scratch = torch.zeros(scratch_rows, 2, block_n, head_dim, dtype=torch.bfloat16, device=dev)
        self.plans = []
        for layer in range(num_layers):
            items, groups, merge_indptr, counts, *lists = views[3 + layer * self._layer_pieces :][: self._layer_pieces]
            self.plans.append(AttentionPlan(
                requests=views[0].view(-1, len(REQUEST_FIELDS)),
                items=items.view(-1, len(ITEM_FIELDS)),
                groups=groups.view(-1, len(GROUP_FIELDS)),
                merge_indptr=merge_indptr,
                num_groups=counts[4 * nv : 4 * nv + 1],
                block_indices=views[1],
                launches=[Launch(k, v, r, ids, counts[4 * i : 4 * i + 1], max_programs)
                          for i, ((k, v, r), ids) in enumerate(zip(self.variants, lists))],
                o_part=o_part,
                lse_part=lse_part,
                scratch=scratch,
                block_m=block_m,
                block_n=block_n,
                total_q=0,
                tiles=self.tiles if cap.tiles else None,
                max_q=max_q,
            ))

    def nbytes(self) -> int:
        """Device bytes of the static buffers (plan, partial outputs, scratch)."""
        p = self.plans[0]
        return sum(t.nbytes for t in (self._flat, p.o_part, p.lse_part, p.scratch, self.tiles))

    def _variant(self, k_kind: int, v_kind: int, r_max: int) -> int:
        """The menu's narrowest variant of this format pair that is at least ``r_max`` wide."""
        held = self._variant_of.get((k_kind, v_kind, r_max))
        if held is not None:
            return held
        fits = [(r, i) for i, (k, v, r) in enumerate(self.variants) if (k, v) == (k_kind, v_kind) and r >= r_max]
        if not fits:
            raise ValueError(f"launch (k_kind={k_kind}, v_kind={v_kind}, R_MAX={r_max}) is not in this graph's menu "
                             f"{self.variants}: plan it outside the graph")
        self._variant_of[(k_kind, v_kind, r_max)] = min(fits)[1]
        return min(fits)[1]

    def _layer_pieces_of(self, layer: HostLayer) -> list[np.ndarray]:
        cap = self.capacity
        for name, n, limit in (("items", len(layer.items), cap.items), ("groups", len(layer.groups), cap.groups)):
            if n > limit:
                raise ValueError(f"a layer of this batch has {n} {name}, above GraphCapacity.{name}={limit}")
        lists: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.variants)
        launches: list[tuple[int, int, int, np.ndarray]] = [(k, v, r, lists[i]) for i, (k, v, r) in enumerate(self.variants)]
        for k, v, r, ids in layer.launches:
            i = self._variant(k, v, r)  # one launch per format pair: distinct variants
            lists[i] = ids
            launches[i] = (k, v, self.variants[i][2], ids)
        counts = aligned_counts(HostLayer(layer.items, layer.groups, layer.merge_indptr, launches))
        return [layer.items.reshape(-1), layer.groups.reshape(-1), layer.merge_indptr, counts, *lists]

    def load(self, host: HostPlan, tail_rows: np.ndarray | None = None) -> None:
        """Write a batch's plan (and its tail row map) into the static buffers: one copy
        from the host, and the block indices from where the plan left them (the device),
        ordered on the current stream before whatever replays next."""
        cap = self.capacity
        if len(host.layers) != len(self.plans):
            raise ValueError(f"the plan has {len(host.layers)} layers, the graph {len(self.plans)}")
        if (host.block_m, host.block_n) != (self.block_m, self.block_n):
            raise ValueError(f"the plan's tiles (block_m={host.block_m}, block_n={host.block_n}) are not the graph's "
                             f"({self.block_m}, {self.block_n})")
        if host.max_q > self.max_q:
            raise ValueError(f"a request of this batch has {host.max_q} query tokens, the graph's launches were "
                             f"captured for {self.max_q} (GraphPlan max_q): plan it outside the graph")
        tail_rows = np.zeros(0, dtype=np.int64) if tail_rows is None else np.asarray(tail_rows)
        if cap.tiles and host.tiles is None:
            raise ValueError("this graph reads packed tiles' starts (GraphCapacity.tiles > 0) and the plan has none: "
                             "plan it with tile_shape=tuning.tile_shape()")
        tiles = 0 if host.tiles is None or not cap.tiles else len(host.tiles)
        for name, n, limit in (("requests", len(host.requests), cap.requests),
                               ("blocks", len(host.block_indices), cap.blocks),
                               ("tail_rows", len(tail_rows), cap.tail_rows), ("tiles", tiles, cap.tiles)):
            if n > limit:
                raise ValueError(f"this batch has {n} {name}, above GraphCapacity.{name}={limit}")
        if host.tails is not None and host.tails is self._loaded:
            # A copy of the loaded plan for other tails (HostPlan.with_tails shares its
            # TailSlots, and nothing else makes one): only the tail items' ends, the
            # request table and the row map change.
            ends = host.items[host.tails.ids, 6]
            self._ship(np.concatenate([[self._starts[0], self._starts[2]], self._tail_where]),
                       np.concatenate([[host.requests.size, len(tail_rows)], np.ones(len(ends), dtype=np.int64)]),
                       [host.requests.reshape(-1), tail_rows, ends])
            return
        pieces = [host.requests.reshape(-1), np.zeros(0, dtype=np.int64), tail_rows]
        for layer in host.layers:
            pieces += self._layer_pieces_of(layer)
        lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        self._loaded = None  # until this load is in the buffers
        self._ship(np.asarray(self._starts, dtype=np.int64), lens, pieces)
        self.plans[0].block_indices[: len(host.block_indices)].copy_(host.block_indices, non_blocking=True)
        if tiles:
            self.tiles[:tiles].copy_(host.tiles, non_blocking=True)
        self._loaded = host.tails
        if host.tails is not None:
            item_starts = np.asarray(self._starts[3 :: self._layer_pieces], dtype=np.int64)
            sizes = np.asarray([len(layer.items) for layer in host.layers], dtype=np.int64)
            first = np.cumsum(sizes) - sizes
            layer = np.searchsorted(first, host.tails.ids, side="right") - 1
            self._tail_where = item_starts[layer] + (host.tails.ids - first[layer]) * len(ITEM_FIELDS) + 6

    def _ship(self, starts: np.ndarray, lens: np.ndarray, pieces: list[np.ndarray]) -> None:
        """Only the used part of each piece crosses to the device (the buffers are sized
        for the worst batch: tens to hundreds of MB): ``lens[i]`` values of the pieces
        (back to back) go to ``starts[i]``, in one copy and one scatter on the device."""
        n, count = int(lens.sum()), len(lens)
        if self._staged is not None:
            self._staged.synchronize()  # the previous load's copy has left the pinned buffers
        if self._host.numel() < n + 2 * count:
            self._host = torch.empty(n + 2 * count, dtype=torch.int64, pin_memory=self._pinned)
        staging = self._host.numpy()
        staging[:count] = starts
        staging[count : 2 * count] = lens
        if n:
            np.concatenate(pieces, out=staging[2 * count : 2 * count + n], casting="unsafe")
        dev = self._host[: n + 2 * count].to(self._flat.device, non_blocking=self._pinned)
        starts_dev, lens_dev, data = dev[:count], dev[count : 2 * count], dev[2 * count :]
        piece = torch.repeat_interleave(torch.arange(count, device=dev.device), lens_dev, output_size=n)
        first = torch.cumsum(lens_dev, 0) - lens_dev  # where each piece starts in ``data``
        where = starts_dev[piece] + torch.arange(n, device=dev.device) - first[piece]
        self._flat.index_copy_(0, where, data.to(torch.int32))
        if self._staged is not None:
            self._staged.record()
