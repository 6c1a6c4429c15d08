"""Bank conflicts of a compiled kernel's reads from shared memory, found in its TTGIR.

Triton's pipeliner stores a load it makes asynchronous in a shared buffer laid out for
the copy, and the loop reads it back (``ttg.local_load``) in whatever register layout the
loop's arithmetic was given. When that layout runs a warp's lanes down the buffer's rows
and the buffer is not swizzled, every lane hits the same banks: the twenty-second device
run found the packed sparse-key launch at 204 µs against 115 (H200, Nsight Compute) after
its channel loads became vector async copies, read back one token a lane from rows 64 and
128 bytes apart (16- and 32-way conflicts). This counts, offline, how many times slower
than conflict-free each such read is, so a change that moves a load into shared memory is
checked before it reaches a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BANKS, BANK_BYTES, WAVEFRONT_BYTES = 32, 4, 128
ELEMENT_BYTES = {"i1": 1, "i8": 1, "i16": 2, "bf16": 2, "f16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8}


@dataclass(frozen=True)
class Blocked:
    size_per_thread: tuple[int, ...]
    threads_per_warp: tuple[int, ...]
    order: tuple[int, ...]


@dataclass(frozen=True)
class Swizzled:
    vec: int
    per_phase: int
    max_phase: int
    order: tuple[int, ...]


@dataclass(frozen=True)
class SharedRead:
    """One ``local_load``: the buffer's shape and element type, and the wavefronts a
    warp's first access takes over the fewest it could take (1: conflict-free)."""

    shape: tuple[int, ...]
    dtype: str
    layout: str
    ways: float

    def __str__(self) -> str:
        return f"{'x'.join(map(str, self.shape))}x{self.dtype} as {self.layout}: {self.ways:g}-way"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"-?\d+", text))


def _field(body: str, name: str) -> str:
    m = re.search(rf"{name}\s*=\s*(\[[^\]]*\]|\d+)", body)
    if m is None:
        raise ValueError(f"layout {body!r} has no field {name!r}")
    return m[1]


def layouts(ttgir: str) -> dict[str, Blocked | Swizzled]:
    """The module's blocked and swizzled-shared layout aliases by name (``#blocked6``)."""
    found: dict[str, Blocked | Swizzled] = {}
    for name, kind, body in re.findall(r"^(#\w+) = #ttg\.(blocked|swizzled_shared)<\{([^}]*)\}>", ttgir, re.M):
        if kind == "blocked":
            found[name] = Blocked(_ints(_field(body, "sizePerThread")), _ints(_field(body, "threadsPerWarp")),
                                  _ints(_field(body, "order")))
        else:
            found[name] = Swizzled(int(_field(body, "vec")), int(_field(body, "perPhase")),
                                   int(_field(body, "maxPhase")), _ints(_field(body, "order")))
    return found


def _offset(coord: tuple[int, ...], shape: tuple[int, ...], shared: Swizzled) -> int:
    """Element offset of ``coord`` in the buffer: rows of its fastest dimension, the
    vectors of a row permuted by the row's phase (Triton's swizzle)."""
    coord = list(coord)
    if len(shape) >= 2:
        col, row = shared.order[0], shared.order[1]
        phase = (coord[row] // shared.per_phase) % shared.max_phase
        coord[col] = ((coord[col] // shared.vec) ^ phase) * shared.vec + coord[col] % shared.vec
    offset, stride = 0, 1
    for dim in shared.order:
        offset += coord[dim] * stride
        stride *= shape[dim]
    return offset


def read_ways(shape: tuple[int, ...], dtype: str, shared: Swizzled, regs: Blocked) -> float:
    """Wavefronts of a warp's first read of a buffer laid out as ``shared`` into registers
    laid out as ``regs``, over the fewest that many bytes could take. A lane reads its
    run of elements along the registers' fastest dimension in one access when that is also
    the buffer's contiguous dimension (up to 16 bytes); the hardware serves 128 bytes a
    wavefront, and lanes reading distinct 4-byte words of one bank take one each."""
    size = ELEMENT_BYTES[dtype]
    fast = regs.order[0]
    run = regs.size_per_thread[fast] if fast == shared.order[0] else 1
    width = min(max(run * size, 1), 16)
    lanes: list[tuple[int, int]] = []
    for lane in range(32):
        coord, rest = [0] * len(shape), lane
        for dim in regs.order:
            coord[dim] = (rest % regs.threads_per_warp[dim]) * regs.size_per_thread[dim] % shape[dim]
            rest //= regs.threads_per_warp[dim]
        start = _offset(tuple(coord), shape, shared) * size
        lanes.append((start, start + width))
    per_phase = max(WAVEFRONT_BYTES // max(width, BANK_BYTES), 1)
    wavefronts = 0
    for first in range(0, 32, per_phase):
        words_by_bank: dict[int, set[int]] = {}
        for lo, hi in lanes[first:first + per_phase]:
            for word in range(lo // BANK_BYTES, (hi - 1) // BANK_BYTES + 1):
                words_by_bank.setdefault(word % BANKS, set()).add(word)
        wavefronts += max(len(words) for words in words_by_bank.values())
    ideal = -(-32 * width // WAVEFRONT_BYTES) if width >= BANK_BYTES else 1
    return wavefronts / max(ideal, 1)


LOCAL_LOAD = re.compile(r"ttg\.local_load [^:]*: !ttg\.memdesc<([0-9x]+)x(\w+), (#\w+)[^>]*> -> tensor<[0-9x]+x\w+, (#\w+)>")


def shared_reads(ttgir: str) -> list[SharedRead]:
    """Every ``local_load`` from a swizzled-shared buffer into a blocked layout (reads
    into tensor-core operand layouts go through ``ldmatrix`` on buffers swizzled for it,
    and are left out)."""
    known = layouts(ttgir)
    reads = []
    for shape, dtype, src, dst in LOCAL_LOAD.findall(ttgir):
        shared, regs = known.get(src), known.get(dst)
        if isinstance(shared, Swizzled) and isinstance(regs, Blocked) and dtype in ELEMENT_BYTES:
            dims = _ints(shape.replace("x", " "))
            reads.append(SharedRead(dims, dtype, dst, read_ways(dims, dtype, shared, regs)))
    return reads


def worst_read(ttgir: str) -> dict[str, object]:
    """The census's summary: the most wavefronts over the fewest of any read, and which."""
    reads = shared_reads(ttgir)
    worst = max(reads, key=lambda r: r.ways, default=None)
    return {"shared_read_ways": worst.ways if worst else 1.0, "worst_shared_read": str(worst) if worst else ""}
