"""How many tokens the scheduler may admit when sealed segments are compressed.

Pure arithmetic, no SGLang import, so the sizing can be checked anywhere. The KV budget
splits into two parts:

* a **dense tail pool**: every running request keeps its sink segments, its recent
  window and two segments being filled / sealed (double buffering) dense, and one
  prefill batch's new tokens (a chunk of a long prompt is all dense until its segments
  seal) fit on top;
* a **segment arena** of fixed-size slabs, one slab per sealed segment (all layers and
  KV heads): the compressor's byte budget (``1/ratio`` of the dense bytes plus the
  per-block headers it counts), laid out for the attention kernels (every tensor 16-byte
  aligned, no headers: their information sits in the block table) and one 72-byte block
  table row per (layer, KV head) beside it.

Logical capacity = dense tail tokens + slabs x segment size. Slabs are fixed-size so the
arena never fragments; a segment packed under its budget leaves the rest of its slab
unused, which :class:`CapacityPlan` reports rather than hides.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from mosaickv.formats import HEADER_BYTES

# Default share of the KV budget reserved for dense tails when the user sets no
# --max-running-requests: large enough for a busy batch, small enough to keep the gain.
DEFAULT_TAIL_FRACTION = 0.1
PAGE_TABLE_ENTRY_BYTES = 16  # two int64 per logical page: its dense page and its slab
ALIGN_BYTES = 16  # every tensor of a stored block starts at a multiple of this
# Most padding one block's tensors need in the kernel layout (mosaickv.kernels.layout):
# up to four bf16 tensors rounded up to 8 elements, two uint8 index tensors to 16 bytes.
BLOCK_PAD_BYTES = 4 * (ALIGN_BYTES - 2) + 2 * (ALIGN_BYTES - 1)
TABLE_ROW_BYTES = 72  # one int64 [9] block table row per (segment, layer, KV head)


@dataclass(frozen=True)
class KVShape:
    """KV geometry of the layers this rank stores."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "v_head_dim", "dtype_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVShape.{name} = {value!r} is not allowed: a positive integer")

    @property
    def dense_bytes_per_token(self) -> int:
        """What SGLang's MHATokenToKVPool spends per token (its ``cell_size``)."""
        return self.num_layers * self.num_kv_heads * (self.head_dim + self.v_head_dim) * self.dtype_bytes


@dataclass(frozen=True)
class CapacityPlan:
    """The split of one KV budget; every field in tokens or bytes."""

    max_total_num_tokens: int  # logical tokens the scheduler may admit
    dense_tail_tokens: int  # rows of the dense pool
    tail_tokens_per_request: int
    max_running_requests: int  # requests whose tails fit the dense pool
    num_slabs: int  # sealed segments the arena holds
    slab_bytes: int  # bytes of one sealed segment's slab (all layers, KV heads), aligned layout
    segment_budget_bytes: int  # what the compressor may spend on one segment (PackedBlock.nbytes)
    table_bytes_per_slab: int  # its block table rows
    segment_size: int
    page_size: int
    dense_bytes_per_token: int
    budget_bytes: int
    used_bytes: int

    @property
    def bytes_per_token(self) -> float:
        """Budget bytes per admitted token, tails, headers and page table included."""
        return self.used_bytes / max(self.max_total_num_tokens, 1)

    @property
    def sealed_bytes_per_token(self) -> float:
        return (self.slab_bytes + self.table_bytes_per_slab) / self.segment_size

    @property
    def capacity_gain(self) -> float:
        """Admitted tokens over what the dense pool would admit from the same budget."""
        dense_tokens = self.budget_bytes // self.dense_bytes_per_token // self.page_size * self.page_size
        return self.max_total_num_tokens / max(dense_tokens, 1)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(bytes_per_token=self.bytes_per_token, sealed_bytes_per_token=self.sealed_bytes_per_token,
                   capacity_gain=self.capacity_gain)
        return out


def segment_budget_bytes(shape: KVShape, segment_size: int, ratio: float) -> int:
    """What the compressor may spend on one segment: each block's share of the dense bytes
    plus its header, as ``PackedBlock.nbytes`` counts them."""
    block_dense = segment_size * (shape.head_dim + shape.v_head_dim) * shape.dtype_bytes
    per_block = HEADER_BYTES + math.ceil(block_dense / ratio)
    return shape.num_layers * shape.num_kv_heads * per_block


def slab_bytes(shape: KVShape, segment_size: int, ratio: float) -> int:
    """Bytes of a slab: a segment within its budget stored in the kernel layout (headers
    dropped, every tensor aligned, the index region aligned after the values) always fits."""
    blocks = shape.num_layers * shape.num_kv_heads
    raw = segment_budget_bytes(shape, segment_size, ratio) + blocks * (BLOCK_PAD_BYTES - HEADER_BYTES) + ALIGN_BYTES
    return -(-raw // ALIGN_BYTES) * ALIGN_BYTES


def tail_tokens_per_request(segment_size: int, sinks: int, window: int, page_size: int) -> int:
    """Dense tokens one request may hold: sink segments, window, two filling segments."""
    sink_tokens = math.ceil(sinks / segment_size) * segment_size
    tokens = sink_tokens + window + 2 * segment_size
    return math.ceil(tokens / page_size) * page_size


def prefill_batch_tokens(server_args) -> int:
    """New tokens one prefill batch may write: the chunk size, or without chunking the
    prefill budget (``--max-prefill-tokens``)."""
    chunk = server_args.chunked_prefill_size
    return chunk if chunk is not None and chunk > 0 else server_args.max_prefill_tokens


def token_cap_problem(max_total_tokens: int, *, per_request: int, max_running_requests: int,
                      prefill_tokens: int, segment_size: int) -> str | None:
    """Why a ``--max-total-tokens`` cap leaves no sealed segment, or ``None`` if it leaves one.

    Dense tails and one prefill batch are reserved before any slab; a cap at or below
    them would serve with nothing ever compressed, which is the opposite of what was asked.
    """
    prefill = math.ceil(prefill_tokens / segment_size) * segment_size
    dense = per_request * max_running_requests + prefill
    if max_total_tokens >= dense + segment_size:
        return None
    fit = (max_total_tokens - prefill - segment_size) // per_request
    lower = (f"lower --max-running-requests to at most {fit}" if fit >= 1 else
             "lower --chunked-prefill-size")
    return (f"--max-total-tokens {max_total_tokens} leaves no room for sealed segments: the dense tails of "
            f"{max_running_requests} running requests ({per_request} tokens each) and one {prefill_tokens}-token "
            f"prefill batch take {dense} tokens; allow at least {dense + segment_size} tokens, or {lower}.")


def plan_capacity(
    shape: KVShape,
    budget_bytes: int,
    *,
    segment_size: int,
    ratio: float,
    sinks: int,
    window: int,
    page_size: int = 1,
    max_running_requests: int | None = None,
    tail_fraction: float = DEFAULT_TAIL_FRACTION,
    prefill_tokens: int = 0,
) -> CapacityPlan:
    """Split ``budget_bytes`` into dense tails and arena slabs; see the module docstring.

    Tails are reserved for ``max_running_requests`` if given, else for as many requests
    as ``tail_fraction`` of the budget holds (at least one); ``prefill_tokens`` (the
    server's prefill chunk) more dense rows hold one prefill batch.
    """
    if segment_size < 1 or page_size < 1 or segment_size % page_size:
        raise ValueError(f"page_size {page_size} must divide segment_size {segment_size}")
    if not ratio >= 1.0:
        raise ValueError(f"ratio = {ratio!r} is not allowed: a number >= 1")
    if not 0.0 < tail_fraction < 1.0:
        raise ValueError(f"tail_fraction = {tail_fraction!r} is not allowed: a number in (0, 1)")
    cell = shape.dense_bytes_per_token
    per_req = tail_tokens_per_request(segment_size, sinks, window, page_size)
    if max_running_requests is None:
        max_running_requests = max(1, int(budget_bytes * tail_fraction) // (per_req * cell))
    if max_running_requests < 1:
        raise ValueError(f"max_running_requests = {max_running_requests!r} is not allowed: at least 1")
    if prefill_tokens < 0:
        raise ValueError(f"prefill_tokens = {prefill_tokens!r} is not allowed: 0 or more")
    dense_tail = per_req * max_running_requests + math.ceil(prefill_tokens / page_size) * page_size
    tail_bytes = _tail_bytes(dense_tail, page_size, cell)
    if tail_bytes > budget_bytes:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes cannot hold the dense tails of {max_running_requests} requests "
            f"({per_req} tokens each) and a {prefill_tokens}-token prefill batch ({tail_bytes} bytes); lower "
            "--max-running-requests or --chunked-prefill-size, or raise --mem-fraction-static"
        )
    slab = slab_bytes(shape, segment_size, ratio)
    table = shape.num_layers * shape.num_kv_heads * TABLE_ROW_BYTES
    num_slabs = (budget_bytes - tail_bytes) // _per_slab_bytes(slab, table, segment_size, page_size)
    total = dense_tail + num_slabs * segment_size
    used = tail_bytes + num_slabs * _per_slab_bytes(slab, table, segment_size, page_size)
    return CapacityPlan(
        max_total_num_tokens=total,
        dense_tail_tokens=dense_tail,
        tail_tokens_per_request=per_req,
        max_running_requests=max_running_requests,
        num_slabs=num_slabs,
        slab_bytes=slab,
        segment_budget_bytes=segment_budget_bytes(shape, segment_size, ratio),
        table_bytes_per_slab=table,
        segment_size=segment_size,
        page_size=page_size,
        dense_bytes_per_token=cell,
        budget_bytes=budget_bytes,
        used_bytes=used,
    )


def cap_plan(plan: CapacityPlan, max_total_tokens: int, *, running_fixed: bool) -> CapacityPlan:
    """The plan under a ``--max-total-tokens`` cap: fewer slabs and, where
    ``--max-running-requests`` was left unset, as many dense tails as
    ``DEFAULT_TAIL_FRACTION`` of the cap holds (the budget's own count would fill it).

    Raises ValueError (:func:`token_cap_problem`'s sentence) when no slab is left.
    """
    per_req, seg = plan.tail_tokens_per_request, plan.segment_size
    prefill = plan.dense_tail_tokens - per_req * plan.max_running_requests
    running = plan.max_running_requests
    if not running_fixed:
        running = max(1, min(running, int(max_total_tokens * DEFAULT_TAIL_FRACTION) // per_req))
    problem = token_cap_problem(max_total_tokens, per_request=per_req, max_running_requests=running,
                                prefill_tokens=prefill, segment_size=seg)
    if problem is not None:
        raise ValueError(problem)
    dense = per_req * running + prefill
    slabs = min(plan.num_slabs, (max_total_tokens - dense) // seg)
    per_slab = _per_slab_bytes(plan.slab_bytes, plan.table_bytes_per_slab, seg, plan.page_size)
    return replace(plan, max_total_num_tokens=dense + slabs * seg, dense_tail_tokens=dense,
                   max_running_requests=running, num_slabs=slabs,
                   used_bytes=_tail_bytes(dense, plan.page_size, plan.dense_bytes_per_token) + slabs * per_slab)


def _tail_bytes(dense_tail: int, page_size: int, cell: int) -> int:
    # As MHATokenToKVPool does, one extra page (slot 0's) absorbs padded writes.
    return (dense_tail + page_size) * cell + (dense_tail // page_size + 1) * PAGE_TABLE_ENTRY_BYTES


def _per_slab_bytes(slab: int, table: int, segment_size: int, page_size: int) -> int:
    return slab + table + segment_size // page_size * PAGE_TABLE_ENTRY_BYTES
