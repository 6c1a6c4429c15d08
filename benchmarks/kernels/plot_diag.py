"""A chart of ``diag_formats.py``'s times: one group of bars per format, one bar per
setting of :data:`diag_formats.SETTINGS` (the server's first), so a tile or warp change
reads at a glance. Reads the JSON a device run wrote; needs no GPU.

    python benchmarks/kernels/plot_diag.py benchmarks/results/h200x2_2026-11-30j/kernels/diag_formats_segment32.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETTING_KEYS = ("block_n", "pack_tokens", "wide_block_n", "num_warps", "prefetch_entries", "pack_sparse_keys",
                "prefetch_tiles", "unroll_group", "chunk_by_kind", "block_span", "pipeline_stages", "tile_starts")


def label(row: dict) -> str:
    """A setting as its knobs and programs per SM, e.g. ``n32 pack32 /8``."""
    parts = [f"n{row['block_n']}"]
    if row.get("pack_tokens"):
        parts.append(f"pack{row.get('wide_block_n') or 64}")  # MixedAttention's default wide tile: 64
    elif row.get("wide_block_n"):
        parts.append(f"wide{row['wide_block_n']}")
    if row.get("pack_sparse_keys"):
        parts.append("sparseK")
    if row.get("prefetch_entries"):
        parts.append("prefetch")
    if row.get("prefetch_tiles"):
        parts.append("prefetch_tiles")
    if row.get("block_span"):
        parts.append(f"span{row['block_span']}x{row.get('pipeline_stages') or 3}")  # default: 3 stages
    if row.get("tile_starts"):
        parts.append(f"starts x{row.get('pipeline_stages') or 3}")
    if row.get("unroll_group"):
        parts.append("unroll")
    if row.get("chunk_by_kind"):
        parts.append("cut")
    if row.get("num_warps"):
        parts.append(f"w{row['num_warps']}")
    return " ".join(parts) + f" /{row['programs_per_sm']}"


def plot(result: dict, path: Path) -> list[str]:
    """Writes the chart; returns the settings' labels in the order drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    formats = list(dict.fromkeys(r["format"] for r in rows))
    settings = list(dict.fromkeys((tuple((k, r.get(k)) for k in SETTING_KEYS), r["programs_per_sm"]) for r in rows))
    labels = [label({**dict(knobs), "programs_per_sm": per_sm}) for knobs, per_sm in settings]
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(formats)), 5))
    x = np.arange(len(formats))
    for i, (knobs, per_sm) in enumerate(settings):
        times = []
        for name in formats:
            hit = [r for r in rows if r["format"] == name and r["programs_per_sm"] == per_sm
                   and tuple((k, r.get(k)) for k in SETTING_KEYS) == knobs]
            times.append(hit[0]["time_s"] * 1e6 if hit else np.nan)
        ax.bar(x + (i - (len(settings) - 1) / 2) * width, times, width, label=f"{i}: {labels[i]}")
    ax.set_xticks(x, formats, fontsize=8)
    ax.set_ylabel("µs per decode step (median)")
    ax.set_title(f"{result['device']}: decode kernel by setting, {result['segment']}-token segments")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="a diag_formats.json")
    ap.add_argument("--png", type=Path, help="where the chart goes (default: beside the JSON, .png)")
    args = ap.parse_args(argv)
    result = json.loads(args.json.read_text())
    if not result.get("rows"):
        raise SystemExit(f"{args.json}: no timed rows (a --profile-once run times nothing)")
    out = args.png or args.json.with_suffix(".png")
    plot(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
