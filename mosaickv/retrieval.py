"""Offline retrieval accuracy over compressed caches, with the question inside or after.

A task's user message (context, then question) is rendered with the model's chat template
and tokenized in two pieces at the question's first character, so both modes read exactly
the same token ids:

- ``inside``: the whole prompt but its last token is prefilled and compressed (the
  question is part of what the scorers see, as when one request owns its prompt); the
  last token is fed to start the answer;
- ``after``: only the part before the question is compressed (as a shared prefix is,
  before any question exists); the question, the end of the user turn and the assistant
  header are fed uncompressed after it, and the answer follows.

One prefill serves both modes: attention is causal, so the keys, values and queries of
the part before the question are the same whether the question follows or not. The
uncompressed baseline goes through the same path (:func:`mosaickv.evaluate.dense_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from tqdm import tqdm

from mosaickv.compressor import CompressedCache, Compressor
from mosaickv.config import Policy, load_policy
from mosaickv.errors import PolicyError
from mosaickv.evaluate import dense_cache
from mosaickv.parts import Observation
from mosaickv.tasks import SEPARATOR, Task

MODES = ("inside", "after")
UNCOMPRESSED = "uncompressed"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


@dataclass
class Prompt:
    """A rendered task: token ids before the question, and from the question on."""

    before: torch.Tensor
    after: torch.Tensor

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([self.before, self.after])


def render(task: Task, tokenizer) -> Prompt:
    """Chat-template the task and split its ids where the question starts."""
    text = tokenizer.apply_chat_template(task.messages(), tokenize=False, add_generation_prompt=True)
    cut = text.rindex(SEPARATOR + task.question) + len(SEPARATOR)

    def ids(part: str) -> torch.Tensor:
        return torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long)

    return Prompt(ids(text[:cut]), ids(text[cut:]))


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the end of turn and end of text, where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    out = {vocab[t] for t in STOP_TOKENS if t in vocab}
    return out | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def view(observations: list[Observation], prompt: Prompt, mode: str) -> tuple[list[Observation], torch.Tensor]:
    """What a mode compresses and what it feeds after, from one prefill of ``prompt.ids[:-1]``."""
    if mode == "inside":
        return observations, prompt.ids[-1:]
    if mode == "after":
        return [o.upto(prompt.before.numel()) for o in observations], prompt.after
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def answer(runner, observations: list[Observation], fed: torch.Tensor, policy: Policy | None, max_new_tokens: int, stop: set[int], scope: str = "group") -> tuple[list[int], CompressedCache]:
    """Greedy answer after the span compressed by ``policy`` (None: the uncompressed cache)."""
    cache = dense_cache(observations) if policy is None else Compressor(policy, runner.head_dim).compress(observations, scope=scope)
    return runner.generate(cache, fed, max_new_tokens, stop), cache


def _label(policy: str | Mapping[str, Any]) -> str:
    return str(policy["name"]) if isinstance(policy, Mapping) and "name" in policy else str(policy)


def evaluate_retrieval(
    runner,
    tokenizer,
    tasks: list[Task],
    policies: list[str | Mapping[str, Any]],
    ratios: list[float],
    modes: tuple[str, ...] = MODES,
    scope: str = "group",
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_task: Callable[[dict], None] | None = None,
) -> dict:
    """Every task in every mode: uncompressed, then every policy at every ratio.

    ``overrides`` are passed to :func:`load_policy` (e.g. ``min_context`` for short tests).
    ``on_task`` gets the result so far after each task (a long run writes it as it goes).
    """
    stop = stop_ids(tokenizer)
    jobs: list[tuple[str, float, Policy | None, str | None]] = []
    for spec in policies:
        for ratio in ratios:
            try:
                jobs.append((_label(spec), ratio, load_policy(spec, ratio=ratio, **(overrides or {})), None))
            except PolicyError as err:  # a ratio a policy refuses is a row with its reason
                jobs.append((_label(spec), ratio, None, str(err)))
    records: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) * len(modes) * (1 + len(jobs)), desc="mosaickv retrieval", disable=not progress)
    for index, task in enumerate(tasks):
        prompt = render(task, tokenizer)
        observations, _ = runner.observe(prompt.ids[:-1])
        for mode in modes:
            obs, fed = view(observations, prompt, mode)
            for name, ratio, policy, error in [(UNCOMPRESSED, 1.0, None, None), *jobs]:
                rec = {"task": index, "kind": task.kind, "tokens": int(prompt.ids.numel()), "mode": mode, "policy": name, "target_ratio": ratio}
                if error is None:
                    try:
                        out, cache = answer(runner, obs, fed, policy, task.max_new_tokens, stop, scope)
                        text = tokenizer.decode(out, skip_special_tokens=True)
                        rec.update(ratio=round(cache.dense_nbytes() / cache.nbytes(), 3), score=task.score(text), output=text)
                    except PolicyError as err:
                        error = str(err)
                rec["error"] = error
                records.append(rec)
                bar.update(1)
        if on_task is not None:
            on_task(_result(tasks, index + 1, records, modes, scope, time.perf_counter() - start))
    bar.close()
    return _result(tasks, len(tasks), records, modes, scope, time.perf_counter() - start)


def _result(tasks: list[Task], done: int, records: list[dict], modes: tuple[str, ...], scope: str, seconds: float) -> dict:
    return {
        "tasks_done": done,
        "tasks_total": len(tasks),
        "modes": list(modes),
        "scope": scope,
        "seconds": round(seconds, 1),
        "tasks": [{"kind": t.kind, "answers": list(t.answers), **{k: v for k, v in t.meta.items() if k != "counts"}} for t in tasks[:done]],
        "rows": summarize(records),
        "records": records,
    }


def summarize(records: list[dict]) -> list[dict]:
    """Mean score per (mode, policy, target ratio, task kind), plus 'all' (mean over kinds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["mode"], r["policy"], r["target_ratio"], r["kind"]), []).append(r)
    rows = []
    for (mode, policy, target, kind), recs in groups.items():
        ok = [r for r in recs if r["error"] is None]
        rows.append({
            "mode": mode, "policy": policy, "target_ratio": target, "kind": kind, "n": len(ok),
            "accuracy": sum(r["score"] for r in ok) / len(ok) if ok else None,
            "ratio": sum(r["ratio"] for r in ok) / len(ok) if ok else None,
            "error": next((r["error"] for r in recs if r["error"]), None),
        })  # fmt: skip
    by_cell: dict[tuple, list[dict]] = {}
    for row in rows:
        by_cell.setdefault((row["mode"], row["policy"], row["target_ratio"]), []).append(row)
    for (mode, policy, target), cell in by_cell.items():
        scored = [r for r in cell if r["accuracy"] is not None]
        rows.append({
            "mode": mode, "policy": policy, "target_ratio": target, "kind": "all", "n": sum(r["n"] for r in cell),
            "accuracy": sum(r["accuracy"] for r in scored) / len(scored) if scored else None,
            "ratio": sum(r["ratio"] for r in scored) / len(scored) if scored else None,
            "error": next((r["error"] for r in cell if r["error"]), None),
        })  # fmt: skip
    return rows


def _kinds(result: dict) -> list[str]:
    return list(dict.fromkeys(t["kind"] for t in result["tasks"]))


def format_tables(result: dict) -> str:
    """Markdown: one table per mode, a row per policy and ratio, a column per task kind.

    Cells are accuracy in percent; 'all' is the mean over kinds; 'vs unc.' is 'all' as a
    share of the uncompressed baseline's.
    """
    kinds = _kinds(result)
    index = {(r["mode"], r["policy"], r["target_ratio"], r["kind"]): r for r in result["rows"]}
    counts = {k: sum(t["kind"] == k for t in result["tasks"]) for k in kinds}
    lines = []
    for mode in result["modes"]:
        base = index.get((mode, UNCOMPRESSED, 1.0, "all"))
        lines += [
            f"**question {mode}** ({result['tasks_done']} tasks; samples per kind: {', '.join(f'{k} {n}' for k, n in counts.items())})",
            "",
            "| policy | target | ratio | " + " | ".join(kinds) + " | all | vs unc. |",
            "|---|---:|---:|" + "---:|" * (len(kinds) + 2),
        ]
        cells = sorted({(r["policy"], r["target_ratio"]) for r in result["rows"] if r["mode"] == mode}, key=lambda c: (c[0] != UNCOMPRESSED, c[0], c[1]))
        for policy, target in cells:
            allrow = index[(mode, policy, target, "all")]
            if allrow["accuracy"] is None:
                lines.append(f"| {policy} | {target:g}x | - | " + " | ".join("-" for _ in kinds) + f" | refused | {allrow['error']} |")
                continue
            accs = [index.get((mode, policy, target, k)) for k in kinds]
            rel = allrow["accuracy"] / base["accuracy"] if base and base["accuracy"] else float("nan")
            lines.append(
                f"| {policy} | {target:g}x | {allrow['ratio']:.2f}x | "
                + " | ".join("-" if a is None or a["accuracy"] is None else f"{100 * a['accuracy']:.0f}" for a in accs)
                + f" | {100 * allrow['accuracy']:.0f} | {100 * rel:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_retrieval(result: dict, path: str) -> None:
    """Accuracy against target ratio, a line per policy; a column per mode, a row for the mean
    over kinds and one per kind. The uncompressed baseline is the dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["all", *_kinds(result)]
    modes = result["modes"]
    fig, axes = plt.subplots(len(kinds), len(modes), figsize=(5.2 * len(modes), 2.6 * len(kinds)), squeeze=False, sharex=True, sharey=True)
    policies = sorted({r["policy"] for r in result["rows"]} - {UNCOMPRESSED})
    for i, kind in enumerate(kinds):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for name in policies:
                rows = sorted((r for r in result["rows"] if r["mode"] == mode and r["kind"] == kind and r["policy"] == name and r["accuracy"] is not None), key=lambda r: r["target_ratio"])
                ax.plot([r["target_ratio"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=name)
            base = [r for r in result["rows"] if r["mode"] == mode and r["kind"] == kind and r["policy"] == UNCOMPRESSED]
            if base and base[0]["accuracy"] is not None:
                ax.axhline(100 * base[0]["accuracy"], color="grey", linestyle=":", label=UNCOMPRESSED)
            ax.set_title(f"{kind}, question {mode}", fontsize=9)
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            if i == len(kinds) - 1:
                ax.set_xlabel("target compression ratio")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Retrieval accuracy, {result.get('model', '')} ({result['tasks_done']} tasks, {result['scope']} scope)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
