"""The serving suite's tables, plots and goal verdicts, from the JSON the device calls returned.

Reads every ``benchmarks/results/suite_*.json`` (one per call of run_comparison.sh), keeps
one record per (model, workload, method), and writes the result between the markers of
``benchmarks/README.md``. Every figure printed is a field of those files or a ratio of two
of them; with no files the block says that no runs have been made.

    python benchmarks/suite/report.py [--results benchmarks/results] [--readme benchmarks/README.md]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

BEGIN, END = "<!-- suite:results:begin -->", "<!-- suite:results:end -->"
METHOD_ORDER = ("none", "fp8", "mosaic3", "mosaic3_nolr", "mosaic6")
MOSAIC = ("mosaic3", "mosaic6")  # issue 5's goals name these; a variant (mosaic3_nolr) is judged where it ran
VARIANTS = ("mosaic3_nolr",)
COLORS = {"none": "#777777", "fp8": "#4c72b0", "mosaic3": "#dd8452", "mosaic3_nolr": "#e6a86e", "mosaic6": "#c44e52"}
# Issue 5, section 3: the goals hold on the 8B-shaped model at 32k input.
GOAL_MODEL = "llama8b-random"
GOAL_WORKLOAD = "random32k"  # no --max-concurrency: the scheduler admits what fits
GOAL_EQ_WORKLOAD = "random32k_eq"  # --max-concurrency: the same batch for every method
FULL_POOL = 0.9  # token usage from which a timed-out run's peak counts as bounded by memory
STATUS_TEXT = {
    "ok": "ok",
    "bench_timed_out": "bench timed out",
    "bench_failed": "bench failed",
    "server_failed": "server failed",
    "server_died": "server died in the bench",
    "skipped": "skipped (no time)",
}

Record = dict[str, Any]
Groups = dict[tuple[str, str], dict[str, Record]]


def _newer(a: Record, b: Record) -> bool:
    """Whether ``a`` should replace ``b``: a finished run beats a failed one, then the later wins."""
    return (a.get("status") == "ok", a.get("finished_at") or "") > (b.get("status") == "ok", b.get("finished_at") or "")


def load_results(paths: Iterable[Path]) -> Groups:
    groups: Groups = {}
    for path in sorted(paths):
        call = json.loads(path.read_text())
        for method, record in call["methods"].items():
            record = {**record, "source": path.name}
            slot = groups.setdefault((call["model"], call["workload"]), {})
            if method not in slot or _newer(record, slot[method]):
                slot[method] = record
    return groups


def admitted(record: Record) -> tuple[int | None, str]:
    """Peak ``#running-req`` in the server log, and what bounded it when KV memory did not
    ("" if memory did): every prompt (or --max-concurrency) was in, or bench_serving hit the
    call's time limit before the pool filled. Either way the figure is a lower bound."""
    if record.get("status") not in ("ok", "bench_timed_out"):
        return None, ""
    log = record.get("log") or {}
    peak = log.get("max_running_req")
    if peak is None:
        return None, ""
    if peak >= min(x for x in (record.get("num_prompts"), record.get("max_concurrency")) if x):
        return peak, "all prompts"
    usage = log.get("max_token_usage")
    if record["status"] == "bench_timed_out" and (usage is None or usage < FULL_POOL):
        return peak, f"time limit, pool {usage or 0:.0%} full"
    return peak, ""


def bench(record: Record | None, key: str) -> float | None:
    if not record or record.get("status") != "ok":
        return None
    return (record.get("bench") or {}).get(key)


def prefill_ceiling(record: Record) -> float | None:
    """The most output tok/s the row's prefill pace allows: ``output_len / prefill s per
    prompt``. SGLang runs a prefill batch and a decode batch one after the other, so a
    run of N random prompts lasts at least N times the pace, however fast it decodes.
    None for shared-prefix prompts (the pace is taken over uncached prompts only)."""
    pace = (record.get("log") or {}).get("prefill_s_per_prompt")
    if not pace or "random-ids" not in (record.get("bench_command") or ""):
        return None
    return record["output_len"] / pace


def settings(record: Record) -> tuple:
    """What must match for two rows to be compared: prompts, lengths, batch cap, static memory."""
    mem = (record.get("server") or {}).get("mem_fraction_static")
    return tuple(record.get(k) for k in ("num_prompts", "input_len", "output_len", "max_concurrency")) + (mem,)


@dataclass(frozen=True)
class Ratio:
    value: float | None
    lower_bound: bool = False  # the method's admitted figure is a lower bound (see admitted)
    why: str = ""  # why there is no value

    def text(self) -> str:
        if self.value is None:
            return "—"
        return f"{'≥' if self.lower_bound else ''}{self.value:.2f}x"


def incomparable(record: Record, base: Record) -> str:
    """Why two rows' figures may not be divided, or "" if they may."""
    if record.get("device") != base.get("device"):
        return f"devices differ ({record.get('device')} vs {base.get('device')})"
    if settings(record) != settings(base):
        return f"workload settings differ ({settings(record)} vs {settings(base)})"
    return ""


def ratio(record: Record, base: Record | None, metric: str) -> Ratio:
    """``metric`` of ``record`` over the same of ``base``: "admitted" or a bench_serving key."""
    if base is None:
        return Ratio(None, why="no baseline row")
    if why := incomparable(record, base):
        return Ratio(None, why=why)
    if metric == "admitted":
        (a, a_bound), (b, b_bound) = admitted(record), admitted(base)
        if a is None or b is None:
            return Ratio(None, why="admitted concurrency not measured")
        if b_bound:
            return Ratio(None, why=f"the baseline's {b} is bounded by {b_bound}, not by memory")
        return Ratio(a / b, lower_bound=bool(a_bound))
    a, b = bench(record, metric), bench(base, metric)
    if a is None or b is None or not b:
        return Ratio(None, why=f"{metric} not measured")
    return Ratio(a / b)


def _num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _pair(record: Record, p50: str, p99: str) -> str:
    a, b = bench(record, p50), bench(record, p99)
    return "—" if a is None else f"{a:,.1f} / {_num(b)}"


def _admitted_text(record: Record) -> str:
    n, bound = admitted(record)
    return "—" if n is None else f"≥{n} ({bound})" if bound else str(n)


def _status_text(record: Record) -> str:
    text = STATUS_TEXT.get(record.get("status", ""), record.get("status", "?"))
    done, n = bench(record, "completed"), record.get("num_prompts")
    if done is not None and n and done < n:
        text += f", {done}/{n} completed"
    return text


def ordered(methods: dict[str, Record]) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def table(methods: dict[str, Record], first_note: int) -> tuple[list[str], list[str]]:
    """Markdown rows and the numbered footnotes holding each row's commands."""
    head = ("| method | status | admitted | out tok/s | TPOT p50 / p99 ms | ITL p50 ms | TTFT p50 / p99 ms | "
            "prefill s/prompt | "
            "tok/s cap of prefill | KV B/token | "
            "achieved ratio | admitted vs none | tok/s vs none | admitted vs fp8 | tok/s vs fp8 | device | date | run |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    notes = []
    none, fp8 = methods.get("none"), methods.get("fp8")
    for i, m in enumerate(ordered(methods), first_note):
        r = methods[m]
        kv = r.get("kv") or {}
        vs = [ratio(r, base, metric).text() if base is not r else "—"
              for base in (none, fp8) for metric in ("admitted", "output_throughput")]
        cells = [m, _status_text(r), _admitted_text(r), _num(bench(r, "output_throughput")),
                 _pair(r, "median_tpot_ms", "p99_tpot_ms"), _num(bench(r, "median_itl_ms")),
                 _pair(r, "median_ttft_ms", "p99_ttft_ms"),
                 _num((r.get("log") or {}).get("prefill_s_per_prompt"), 2), _num(prefill_ceiling(r)),
                 _num(kv.get("bytes_per_token"), 0), _num(kv.get("achieved_ratio"), 2), *vs,
                 r.get("device") or "—", r.get("date") or "—", f"[{i}]"]
        rows.append("| " + " | ".join(cells) + " |")
        why = f" ({r['reason']})" if r.get("reason") else ""
        ran = f"server `{r['server_command']}`; bench `{r.get('bench_command')}`" if r.get("server_command") else "not started"
        notes.append(f"[{i}] {m}{why}: {ran}; call `{r.get('call_command')}`; file `{r.get('source')}`")
    return rows, notes


def goal_lines(groups: Groups) -> list[str]:
    """One line per (mosaic method, goal): the two figures, their ratio, met / missed / open."""
    runs = groups.get((GOAL_MODEL, GOAL_WORKLOAD), {})
    eq = groups.get((GOAL_MODEL, GOAL_EQ_WORKLOAD), {})
    goals = [
        ("admitted concurrency", "none", "admitted", 3.0, runs),
        ("output tok/s", "none", "output_throughput", 3.0, runs),
        ("admitted concurrency", "fp8", "admitted", 1.5, runs),
        ("output tok/s", "fp8", "output_throughput", 1.5, runs),
    ]
    lines = []
    for m in MOSAIC + tuple(v for v in VARIANTS if v in runs or v in eq):
        for label, base, metric, need, group in goals:
            r = group.get(m)
            got = ratio(r, group.get(base), metric) if r else Ratio(None, why=f"no {m} row")
            cap = _cap_note(r, group.get(base)) if metric == "output_throughput" and (got.value or 0) < need else ""
            lines.append(f"- {m}, {label} vs {base} at 32k (≥{need:g}x): {_verdict(got, need)}{cap}")
        lines.append(f"- {m}, TPOT p50 at equal batch vs none at 32k (≤0.5x): {_tpot_verdict(eq.get(m), eq.get('none'))}")
    return lines


def _verdict(got: Ratio, need: float) -> str:
    if got.value is None:
        return f"not measured ({got.why})"
    if got.value >= need:
        return f"**met**, {got.text()}"
    if got.lower_bound:
        return f"open, {got.text()}: a lower bound (prompt count or time limit), so the true ratio may be higher"
    return f"**missed**, {got.text()}"


def _cap_note(record: Record | None, base: Record | None) -> str:
    """What the method's prefill pace alone allows against the baseline's measured tok/s."""
    cap, theirs = (prefill_ceiling(record) if record else None), bench(base, "output_throughput")
    if cap is None or not theirs or incomparable(record, base):
        return ""
    pace = record["log"]["prefill_s_per_prompt"]
    return f"; its prefill pace ({pace:.2f} s a prompt) alone caps it at {cap:,.1f} tok/s, {cap / theirs:.2f}x"


def _tpot_verdict(record: Record | None, none: Record | None) -> str:
    if record is None or none is None:
        return f"not measured (no {'row' if record is None else 'none row'} for {GOAL_EQ_WORKLOAD})"
    (a, _), (b, _) = admitted(record), admitted(none)
    if a is None or b is None or a != b:
        return f"not comparable: batches {a} vs {b}"
    got = ratio(record, none, "median_tpot_ms")
    if got.value is None:
        return f"not measured ({got.why})"
    figures = f"{bench(record, 'median_tpot_ms'):.1f} vs {bench(none, 'median_tpot_ms'):.1f} ms at batch {a}, {got.text()}"
    return f"**met**, {figures}" if got.value <= 0.5 else f"**missed**, {figures}"


def plot(methods: dict[str, Record], title: str, path: Path) -> None:
    """Admitted concurrency, output tok/s and TPOT p50 (bar) / p99 (tick) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ordered(methods)
    panels = [
        ("admitted concurrency", [admitted(methods[m])[0] for m in names], None),
        ("output tok/s", [bench(methods[m], "output_throughput") for m in names], None),
        ("TPOT ms (p50 bar, p99 tick)", [bench(methods[m], "median_tpot_ms") for m in names],
         [bench(methods[m], "p99_tpot_ms") for m in names]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (label, values, ticks) in zip(axes, panels):
        xs = range(len(names))
        ax.bar(xs, [v or 0 for v in values], color=[COLORS.get(m, "#999999") for m in names])
        for x, v in zip(xs, values):
            ax.annotate("n/a" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2f}", (x, v or 0),
                        ha="center", va="bottom", fontsize=8)
        if ticks:
            ax.scatter([x for x, t in zip(xs, ticks) if t is not None], [t for t in ticks if t is not None],
                       marker="_", s=300, color="black")
        ax.set_xticks(list(xs), names)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_key(item: tuple[tuple[str, str], dict[str, Record]]) -> tuple:
    """Goal model first; random prompts by length, free admission before equal batch; the agent workload last."""
    (model, _), methods = item
    r = methods[ordered(methods)[0]]
    agent = "generated-shared-prefix" in (r.get("bench_command") or "")
    return (model != GOAL_MODEL, model, agent, r.get("input_len") or 0, r.get("max_concurrency") or 0)


def render(groups: Groups, plots_dir: Path, readme_dir: Path) -> str:
    if not groups:
        return ("No serving-suite runs have been made yet: `benchmarks/results/` holds no `suite_*.json`, so there "
                "are no tables, plots or goal verdicts. They appear here when `python benchmarks/suite/report.py` "
                "finds the JSON of the device calls described above.")
    out = ["Generated by `python benchmarks/suite/report.py` from " + ", ".join(
        f"`{s}`" for s in sorted({r["source"] for ms in groups.values() for r in ms.values()})) + ".", "",
        "TPOT counts the stalls other prompts' prefills put between a request's tokens; ITL p50, the median gap "
        "between two of its tokens, is about one decode step. The tok/s cap of prefill is `output_len` over the "
        "prefill pace: SGLang runs prefill and decode batches one after the other.", "",
        "### Goals (issue 5, section 3: 8B-shaped model, 32k input)", "", *goal_lines(groups), ""]
    note = 1
    for (model, workload), methods in sorted(groups.items(), key=_group_key):
        r = methods[ordered(methods)[0]]
        conc = f", --max-concurrency {r['max_concurrency']}" if r.get("max_concurrency") else ""
        out += [f"### {model} · {workload} (input {r.get('input_len')}, output {r.get('output_len')}, "
                f"{r.get('num_prompts')} prompts{conc})", ""]
        rows, notes = table(methods, note)
        note += len(notes)
        png = plots_dir / f"suite_{model}_{workload}.png"
        plot(methods, f"{model} · {workload}", png)
        out += [*rows, "", *[n + "  " for n in notes], "", f"![{model} {workload}]({os.path.relpath(png, readme_dir)})", ""]
    return "\n".join(out).rstrip()


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``; the rest untouched."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"the README lacks the markers {BEGIN} ... {END}")
    return text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--readme", type=Path, default=Path("benchmarks/README.md"))
    p.add_argument("--plots-dir", type=Path, help="default: the results folder")
    a = p.parse_args(argv)
    groups = load_results(a.results.glob("suite_*.json"))
    block = render(groups, a.plots_dir or a.results, a.readme.parent)
    a.readme.write_text(replace_block(a.readme.read_text(), block))
    print(f"{a.readme}: {sum(len(m) for m in groups.values())} records in {len(groups)} tables")


if __name__ == "__main__":
    main()
