"""Built-in segment strategies: a fixed format, and MosaicKV's dynamic byte allocation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from mosaickv.errors import PolicyError, check
from mosaickv.formats import DENSE, FP8, WIDTHLESS, BlockFormat, FormatChoice, SideFormat, dense_block_bytes
from mosaickv.parts import BlockStats, ChannelSelector, SegmentStrategy
from mosaickv.registry import register_strategy
from mosaickv.uploads import upload

SIDE_SPEC_HELP = "'dense', 'fp8', 'channels:W' or 'lowrank:W' with W a channel count, a fraction of the head dim, or 'auto'"


def resolve_width(field_name: str, width: float, head_dim: int) -> int:
    """A width given as a channel count (int) or a fraction of the head dim (float < 1)."""
    channels = width * head_dim if isinstance(width, float) and 0 < width < 1 else width
    ok = float(channels).is_integer() and 0 < channels <= head_dim and head_dim % int(channels) == 0
    check(ok, field_name, width, f"a channel count that divides head dim {head_dim}, or a fraction giving one")
    return int(channels)


def _side_value(value: float | str, field_name: str) -> float | str:
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(field_name, value, SIDE_SPEC_HELP) from None
    check(number > 0, field_name, value, SIDE_SPEC_HELP)
    return int(number) if number >= 1 else number


def _parse_side(spec: str, field_name: str) -> tuple[str, float | str]:
    kind, _, width = str(spec).partition(":")
    check(kind in ("dense", "fp8", "channels", "lowrank") and (kind in WIDTHLESS) == (width == ""), field_name, spec,
          SIDE_SPEC_HELP)
    return kind, (_side_value(width, field_name) if width else 0)


@register_strategy("fixed")
@dataclass
class Fixed(SegmentStrategy):
    """The same format for every block; fields set to 'auto' share one level solved from the budget.

    ``tokens``: fraction of each segment's tokens kept (or 'auto'); ``k``/``v``: side specs.
    snapkv is ``tokens: auto``; think is ``k: channels:auto``; uniform2d sets all three to
    'auto', keeping the same fraction of tokens and of channels everywhere.
    """

    tokens: float | str = 1.0
    k: str = "dense"
    v: str = "dense"
    head_dim: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check(self.tokens == "auto" or (isinstance(self.tokens, (int, float)) and 0 <= self.tokens <= 1), "tokens", self.tokens, "a fraction in [0, 1] or 'auto'")
        self._sides = {s: _parse_side(getattr(self, s), s) for s in ("k", "v")}

    @property
    def follows_budget(self) -> bool:
        return self.has_auto

    @property
    def has_auto(self) -> bool:
        return self.tokens == "auto" or any(w == "auto" for _, w in self._sides.values())

    def check_ratio(self, ratio: float) -> None:
        if not self.has_auto and ratio != 1.0:
            dense = self.tokens == 1 and all(kind == "dense" for kind, _ in self._sides.values())
            check(not dense, "ratio", ratio, "1 for a fixed dense format (set a field to 'auto' to follow a ratio)")
        if self.tokens != "auto" and "dense" in (kind for kind, _ in self._sides.values()):
            # A dense side alone holds tokens x half the dense bytes.
            bound = 2.0 / float(self.tokens) if self.tokens else float("inf")
            check(ratio < bound, "ratio", ratio, f"below {bound:g}: this fixed format keeps {self.tokens:g} of the tokens with one side dense")

    def bind(self, head_dim: int) -> None:
        self.head_dim = head_dim
        for side, (kind, width) in self._sides.items():
            if kind not in WIDTHLESS and width != "auto":
                resolve_width(side, width, head_dim)

    def _format(self, x: float, n: int, channels: ChannelSelector) -> BlockFormat:
        d = self.head_dim

        def side(name: str) -> SideFormat:
            kind, width = self._sides[name]
            if kind in WIDTHLESS:
                return SideFormat(kind)
            r = max(1, round(x * d)) if width == "auto" else resolve_width(name, width, d)
            return channels.side_format(r) if kind == "channels" else SideFormat("lowrank", r)

        m = round(x * n) if self.tokens == "auto" else round(float(self.tokens) * n)
        return BlockFormat(m, side("k"), side("v"))

    def candidates(self, d: int, channels: ChannelSelector) -> list[SideFormat]:
        return []

    def plan(self, stats: BlockStats, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        blocks, n, d = stats.weight.shape[0], stats.n, stats.d
        if not self.has_auto:
            return [self._format(1.0, n, channels)] * blocks
        levels = sorted({m / n for m in range(n + 1)} | {r / d for r in range(1, d + 1)}, reverse=True)
        fits = [x for x in levels if self._format(x, n, channels).nbytes(d) * blocks <= budget]
        if not fits:
            floor = self._format(0.0, n, channels).nbytes(d) * blocks
            raise PolicyError("budget", budget, f"a budget of at least {floor} bytes for these {blocks} blocks: this fixed format cannot shrink further")
        low = self._format(fits[0], n, channels)
        higher = [self._format(x, n, channels) for x in levels if x > fits[0]]
        if not higher:
            return [low] * blocks
        # Spend what the level grid leaves over: the blocks that matter most go one level up.
        high = higher[-1]
        step = high.nbytes(d) - low.nbytes(d)
        ups = min(blocks, int((budget - low.nbytes(d) * blocks) // step)) if step > 0 else 0
        ranked = stats.drop_cost.sum(1).argsort(descending=True)[:ups].tolist()
        plan = [low] * blocks
        for b in ranked:
            plan[b] = high
        return plan


@register_strategy("dynamic")
@dataclass
class Dynamic(SegmentStrategy):
    """MosaicKV: per block, the format that removes the most attention error per byte.

    Options per block: keep a fraction of its tokens (or none); store each side dense,
    reduced to a channel width, or low rank. The cost of an option estimates the squared
    error it adds to the head's output (see :class:`BlockStats`): a kept token pays
    ``p^2 (min(key logit error, logit_cap) |v - o|^2 + value error)``, a dropped one
    ``p^2 |v - o|^2``. A multiple-choice knapsack, solved by Lagrangian relaxation
    (bisection on the price of a byte) and then filled greedily with the best remaining
    upgrades, keeps total cost lowest within the budget.
    """

    token_fractions: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    widths: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])
    ranks: list[float] = field(default_factory=lambda: [0.125, 0.25])
    # Channel widths for values; None: the same as keys. [] stores values dense or low
    # rank only: per-vector channels cost the decode kernel a densify per value tile.
    value_widths: list[float] | None = None
    logit_cap: float = 1.0
    drop: bool = True
    # Also offer every side in fp8 (e4m3, half the bytes of dense): FP8 composed with
    # MosaicKV, chosen per block where its rounding costs less than what else it buys.
    fp8: bool = False
    head_dim: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check(len(self.token_fractions) > 0 and all(0 < f <= 1 for f in self.token_fractions), "token_fractions", self.token_fractions, "a non-empty list of fractions in (0, 1]")
        check(self.logit_cap > 0, "logit_cap", self.logit_cap, "a positive number")
        for name in ("widths", "ranks", "value_widths"):
            check(getattr(self, name) is None or all(w > 0 for w in getattr(self, name)), name, getattr(self, name),
                  "positive channel counts or fractions of the head dim")

    def bind(self, head_dim: int) -> None:
        self.head_dim = head_dim
        self._widths = sorted({resolve_width("widths", w, head_dim) for w in self.widths} - {head_dim})
        self._ranks = sorted({resolve_width("ranks", r, head_dim) for r in self.ranks} - {head_dim})
        value_widths = self.widths if self.value_widths is None else self.value_widths
        self._value_widths = sorted({resolve_width("value_widths", w, head_dim) for w in value_widths} - {head_dim})

    def _sides(self, widths: list[int], channels: ChannelSelector) -> list[SideFormat]:
        whole = [DENSE, FP8] if self.fp8 else [DENSE]
        return [*whole, *(channels.side_format(w) for w in widths), *(SideFormat("lowrank", r) for r in self._ranks)]

    def candidates(self, d: int, channels: ChannelSelector) -> list[SideFormat]:
        keys, values = self.side_candidates(d, channels)
        return keys + [s for s in values if s not in keys]

    def side_candidates(self, d: int, channels: ChannelSelector) -> tuple[list[SideFormat], list[SideFormat]]:
        # Values without channel widths (the mosaic preset) need no per-vector channel sort.
        return self._sides(self._widths, channels), self._sides(self._value_widths, channels)

    def plan(self, stats: BlockStats, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        return self.plan_groups(stats, 1, budget, channels)

    def plan_groups(self, stats: BlockStats, groups: int, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        """One cost table for every span's blocks, one knapsack per span solved together."""
        formats, cost, nbytes = self._options(stats, channels)
        blocks = cost.shape[0]
        check(blocks % groups == 0, "groups", groups, f"a divisor of the {blocks} blocks planned together")
        value = -cost.double().view(blocks // groups, groups, -1).transpose(0, 1)  # [G, R, O]: span g's rows
        choice = knapsack(value, nbytes, float(budget)).transpose(0, 1).reshape(-1)
        return FormatChoice(formats, choice.cpu().numpy())

    def _options(self, stats: BlockStats, channels: ChannelSelector) -> tuple[list[BlockFormat], torch.Tensor, list[float]]:
        """Every block's options: their formats, costs [B, O] and bytes."""
        n, d = stats.n, stats.d
        sides, v_sides = self._sides(self._widths, channels), self._sides(self._value_widths, channels)
        counts = sorted({max(1, round(f * n)) for f in self.token_fractions})
        # Index by a tensor already on the device: a list is copied there from pageable
        # memory, a stream sync each (three a sealing call in the eleventh run's census).
        first = upload([m - 1 for m in counts], stats.drop_cost.device)

        def kept_cost(per_token: dict[SideFormat, torch.Tensor], scale: torch.Tensor,
                      options: list[SideFormat]) -> torch.Tensor:
            cost = torch.stack([scale * per_token[s] for s in options], dim=-1)  # [B, n, S]
            return cost.cumsum(dim=1)[:, first]  # [B, M, S]: cost of the top-m tokens

        k_cost = kept_cost({s: x.clamp(max=self.logit_cap) for s, x in stats.k_lost.items()}, stats.drop_cost, sides)
        v_cost = kept_cost(stats.v_lost, stats.weight, v_sides)
        dropped = stats.drop_cost.sum(1, keepdim=True) - stats.drop_cost.cumsum(1)[:, first]  # [B, M]
        cost = k_cost[:, :, :, None] + v_cost[:, :, None, :] + dropped[:, :, None, None]
        formats = [BlockFormat(m, k, v) for m in counts for k in sides for v in v_sides]
        cost = cost.reshape(cost.shape[0], -1)
        if self.drop:
            formats.append(BlockFormat(0))
            cost = torch.cat([cost, stats.drop_cost.sum(1, keepdim=True)], dim=1)
        return formats, cost, [float(f.nbytes(d)) for f in formats]


KNAPSACK_ENV = "MOSAICKV_KNAPSACK"  # kernel (the default) or ops: how a GPU solves it, to time one against the other
KNAPSACK_MODES = ("kernel", "ops")


def knapsack_on_gpu() -> str:
    """``kernel`` (:mod:`mosaickv.kernels.knapsack`, one launch) or ``ops`` (the PyTorch
    ops below), from ``MOSAICKV_KNAPSACK``; anything else is refused by name."""
    mode = os.environ.get(KNAPSACK_ENV, "kernel")
    if mode not in KNAPSACK_MODES:
        raise ValueError(f"{KNAPSACK_ENV}={mode!r} is not one of {', '.join(KNAPSACK_MODES)}")
    return mode


def knapsack(value: torch.Tensor, cost: list[float], budget: float, fill_passes: int = 4, ways: int = 16,
             rounds: int = 8) -> torch.Tensor:
    """For each of G independent problems, one option per row maximizing total value with
    total cost <= budget: ``value`` [G, R, O], ``cost`` [O] shared, returns [G, R].

    Lagrangian relaxation (a search for the price of a byte, every problem its own), then
    the best remaining upgrades by value per byte while bytes remain. The search tries
    ``ways - 1`` prices at once per round, so ``rounds`` of 16 ways narrow the price as 32
    halvings would, in a quarter of the launches. Each round is about 25 ops (launches
    on a GPU), and the knapsack is most of a sealing call's ops; at 8 rounds it picks what
    60 halvings of plain bisection pick on every problem of ``tests/test_strategies.py``
    (up to 80 options and 300 rows), where 13 rounds (float64's precision) were used
    before. Runs where
    ``value`` is, without reading anything back: on a GPU the G problems of a batch of
    segments are about two hundred launches in all, where a problem at a time read a total
    back at every step (hundreds of syncs per segment, most of a segment's 34 ms on an
    H200, benchmarks/results/h200x2_2026-11-30b). On a GPU the same search is one Triton
    launch (:mod:`mosaickv.kernels.knapsack`, the same picks under test) unless
    ``MOSAICKV_KNAPSACK=ops`` or a row has more options than its tiles hold (128). Every row's
    cheapest option is the fallback; raises if even those exceed the budget.
    """
    groups, rows, options = value.shape
    floor = min(cost)
    check(floor * rows <= budget, "budget", budget, f"a budget of at least {floor * rows:.0f} bytes for {rows} blocks")
    if rows == 0:
        return torch.zeros(groups, 0, dtype=torch.int64, device=value.device)
    price_of = upload(cost, value.device, value.dtype)
    dearer = [c - floor for c in cost if c > floor]
    if value.is_cuda and knapsack_on_gpu() == "kernel":  # the same search in one launch, where its tiles fit
        from mosaickv.kernels.knapsack import MAX_OPTIONS, knapsack_launch

        if options <= MAX_OPTIONS:
            return knapsack_launch(value, price_of, budget, cost.index(floor), max(min(dearer, default=1.0), 1.0),
                                   fill_passes, ways, rounds)

    def pick(price: torch.Tensor) -> torch.Tensor:
        return (value - price[:, None, None] * price_of).argmax(dim=-1)

    def spent(choice: torch.Tensor) -> torch.Tensor:
        return price_of[choice].sum(-1)

    free = pick(value.new_zeros(groups))
    span = (value.amax(dim=(1, 2)) - value.amin(dim=(1, 2))) + 1.0
    lo, hi = value.new_zeros(groups), span / max(min(dearer, default=1.0), 1.0)
    top = pick(hi)
    choice = torch.where((spent(top) <= budget)[:, None], top, torch.full_like(top, cost.index(floor)))
    cuts = torch.arange(1, ways, dtype=value.dtype, device=value.device) / ways
    for _ in range(rounds):
        prices = lo[:, None] + (hi - lo)[:, None] * cuts  # [G, W - 1], ascending
        trials = (value[:, None] - prices[:, :, None, None] * price_of).argmax(dim=-1)  # [G, W - 1, R]
        fits = spent(trials) <= budget
        # The cheapest price that fits (dearer prices pick cheaper options) bounds it above.
        first = fits.to(torch.int8).argmax(dim=-1)
        hit = fits.any(dim=-1)
        below = torch.where(first > 0, prices.gather(1, (first - 1).clamp_min(0)[:, None])[:, 0], lo)
        lo = torch.where(hit, below, prices[:, -1])
        hi = torch.where(hit, prices.gather(1, first[:, None])[:, 0], hi)
        choice = torch.where(hit[:, None], trials.gather(1, first[:, None, None].expand(-1, 1, rows))[:, 0], choice)
    choice = torch.where((spent(free) <= budget)[:, None], free, choice)
    for _ in range(fill_passes):
        # Each row's most efficient affordable upgrade, taken best-first while bytes remain.
        left = budget - spent(choice)
        gain = value - value.gather(-1, choice[..., None])
        extra = price_of - price_of[choice][..., None]
        ok = (extra > 0) & (extra <= left[:, None, None]) & (gain > 0)
        eff, col = torch.where(ok, gain / extra.clamp_min(1e-9), torch.full_like(gain, -1.0)).max(dim=-1)
        order = eff.argsort(dim=-1, descending=True)
        step = torch.where(eff >= 0, extra.gather(-1, col[..., None])[..., 0], 0.0).gather(-1, order)
        take = (eff.gather(-1, order) >= 0) & (step.cumsum(-1) <= left[:, None])
        choice = torch.where(torch.zeros_like(take).scatter(-1, order, take), col, choice)
    return choice


@register_strategy("headwise")
@dataclass
class HeadWise(SegmentStrategy):
    """Retrieval heads whole, the rest by an inner strategy: a query-agnostic split.

    ``heads`` is a per-model profile [layers][KV heads] (``mosaickv heads`` measures it:
    the attention the answer's queries pay a needle). The highest-scoring heads keep every
    token dense in every segment, because they are the ones a later question reads far
    back with; the ``inner`` strategy spends what is left of the budget on the other
    heads. How many: ``dense``, a head count, or a fraction below 1, the share of each
    plan's budget they take, so that one policy keeps more heads whole at 2x than at 6x
    (at 3x SmolLM2's 20 of 90 heads whole lost half what 10 did in the accuracy suite,
    and 20 cannot fit 6x). Blocks arrive ordered (layer, KV head, segment).
    """

    heads: list[list[float]] = field(default_factory=list)
    dense: float = 0
    inner: dict = field(default_factory=lambda: {"name": "dynamic"})
    # The other heads' errors cost 1 + graded * score / (their mean score): a dynamic inner
    # strategy then spends more on heads the profile saw retrieve, less on the rest. 0: as
    # the segment's own attention says, whatever the profile.
    graded: float = 0.0
    # How whole heads store every token: 'dense' (bf16) or 'fp8' (e4m3, half the bytes, so
    # the same share of the budget keeps twice as many heads whole).
    whole: str = "dense"

    def __post_init__(self) -> None:
        from mosaickv.config import build_part

        rows = len(self.heads)
        check(rows > 0 and all(len(r) == len(self.heads[0]) > 0 for r in self.heads), "heads", f"{rows} rows",
              "a non-empty [layers][kv heads] table of scores with rows of equal length")
        self._scores = torch.tensor(self.heads, dtype=torch.float64)
        heads = self._scores.numel()
        count = float(self.dense).is_integer() and 0 <= self.dense < heads
        check(count or 0 < self.dense < 1, "dense", self.dense,
              f"a head count from 0 to {heads - 1}, or a fraction below 1: the share of each plan's budget")
        check(self.graded >= 0, "graded", self.graded, "a number >= 0 (0: the profile does not weigh the other heads)")
        check(self.whole in WIDTHLESS, "whole", self.whole, f"one of {', '.join(WIDTHLESS)}")
        # Bytes of a whole head against dense (headers aside): what a share of the budget buys.
        self._whole_cost = SideFormat(self.whole).nbytes(1, 1) / DENSE.nbytes(1, 1)
        self._inner = build_part("strategy", self.inner)
        self._order = self._scores.flatten().argsort(descending=True)
        self._weights: dict[tuple[int, torch.device], torch.Tensor] = {}

    def head_weights(self, count: int, device: torch.device) -> torch.Tensor:
        """[heads] what an error costs in each head when ``count`` heads are whole (those: 1)."""
        key = (count, torch.device(device))
        if key not in self._weights:
            scores = self._scores.flatten().clone()
            scores[self._order[:count]] = 0
            mean = scores.sum() / max(scores.numel() - count, 1)
            w = 1 + self.graded * scores / mean if mean > 0 else torch.ones_like(scores)  # whole heads: 0 scored, 1
            self._weights[key] = upload(w.float(), device)
        return self._weights[key]

    def whole_heads(self, ratio: float) -> int:
        """Heads kept whole where a plan's budget is ``ratio`` times below dense."""
        if self.dense >= 1 or self.dense == 0:
            return int(self.dense)
        # The budget is a whole number of bytes: a hair below the share's exact count.
        return min(int(self.dense * self._scores.numel() / (ratio * self._whole_cost) + 1e-3), self._scores.numel() - 1)

    def check_ratio(self, ratio: float) -> None:
        whole = self.whole_heads(ratio)
        share = whole * self._whole_cost / self._scores.numel()
        check(share < 1.0 / ratio, "ratio", ratio,
              f"below {1 / share if share else math.inf:g}: {whole} whole heads of {self._scores.numel()} ({self.whole}) "
              f"alone take {share:.0%} of the dense bytes")
        if hasattr(self._inner, "check_ratio"):
            self._inner.check_ratio((1 - share) / (1 / ratio - share))

    def bind(self, head_dim: int) -> None:
        if hasattr(self._inner, "bind"):
            self._inner.bind(head_dim)

    def check_model(self, layers: int, kv_heads: int) -> None:
        """A profile is one model's (and one tensor-parallel split's): refuse another's."""
        shape = tuple(self._scores.shape)
        check(shape == (layers, kv_heads), "heads", f"{shape[0]} layers x {shape[1]} KV heads",
              f"this model's {layers} layers x {kv_heads} KV heads per rank (measure it with `mosaickv heads`)")

    def candidates(self, d: int, channels: ChannelSelector) -> list[SideFormat]:
        return self._inner.candidates(d, channels)

    def side_candidates(self, d: int, channels: ChannelSelector) -> tuple[list[SideFormat], list[SideFormat]]:
        return self._inner.side_candidates(d, channels)

    def plan(self, stats: BlockStats, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        return self.plan_groups(stats, 1, budget, channels)

    def plan_groups(self, stats: BlockStats, groups: int, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        """The same heads whole in every span; the spans' other blocks (still interleaved
        span by span) go to the inner strategy together."""
        blocks, heads = stats.weight.shape[0] // groups, self._scores.numel()
        check(blocks % heads == 0, "heads", f"{self._scores.shape[0]}x{self._scores.shape[1]}",
              f"a profile of this model's layers x KV heads ({blocks} blocks per plan is not a multiple of {heads})")
        per_head = blocks // heads
        count = self.whole_heads(blocks * dense_block_bytes(stats.n, stats.d) / budget if budget > 0 else math.inf)
        keep = torch.isin(torch.arange(blocks) // per_head, self._order[:count]).repeat_interleave(groups)
        side = SideFormat(self.whole)
        whole = BlockFormat(stats.n, side, side)
        rest = (~keep).nonzero()[:, 0]
        left = budget - int(keep.sum()) // groups * whole.nbytes(stats.d)
        if left < 0:
            raise PolicyError("budget", budget, f"at least {budget - left} bytes: the {count} dense heads alone need that")
        on_device = rest.to(stats.weight.device)
        rows = stats.rows(on_device)
        if self.graded and len(rest):
            head = torch.div(on_device, groups * per_head, rounding_mode="floor")
            rows = rows.scaled(self.head_weights(count, stats.weight.device)[head])
        planned = self._inner.plan_groups(rows, groups, left, channels) if len(rest) else []
        inner = iter(planned)
        return [whole if k else next(inner) for k in keep.tolist()]
