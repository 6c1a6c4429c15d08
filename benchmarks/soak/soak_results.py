"""What came back, as plain data: one Outcome per request and the summaries the checks read.

Pure (no I/O), so the soak's bookkeeping is tested on the CPU. SGLang serializes NaN and
inf with orjson/pydantic as ``null``, so a missing logprob counts as non-finite too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Outcome:
    """One request's fate. ``status`` None: no HTTP answer (see ``error``) or not sent."""

    index: int
    kind: str
    endpoint: str
    stream: bool
    probe: int = -1
    sent: bool = False
    status: Optional[int] = None
    error: Optional[str] = None  # transport error, or the server's error message
    stream_error_code: Optional[int] = None  # code of an error event inside a 200 stream
    completed: bool = False  # every choice ended with a finish_reason (a stream also saw [DONE])
    aborted: bool = False  # the client closed the stream on purpose before its end
    cut: bool = False  # still running at the client's deadline, closed by it
    choices: int = 0
    logprob_values: int = 0
    nonfinite_choices: int = 0
    cached_tokens: Optional[int] = None
    prompt_tokens: Optional[int] = None
    tokens: Optional[list[str]] = None  # output tokens of probes (greedy)
    seconds: float = 0.0

    def row(self) -> dict:
        """Compact form for the JSON: the request's fate, probe tokens only for probes."""
        keys = ("index", "kind", "endpoint", "stream", "status", "completed", "aborted", "cut", "error",
                "stream_error_code", "nonfinite_choices", "cached_tokens", "seconds")
        row = {k: getattr(self, k) for k in keys}
        if self.probe >= 0:
            row.update(probe=self.probe, tokens=self.tokens)
        return row


def choice_logprobs(choice: dict) -> list:
    """Every logprob number in a choice (chat or completions layout, chunk or whole)."""
    lp = choice.get("logprobs")
    if not lp:
        return []
    if "content" in lp:  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        values = []
        for entry in lp.get("content") or []:
            values.append(entry.get("logprob"))
            values += [top.get("logprob") for top in entry.get("top_logprobs") or []]
        return values
    values = list(lp.get("token_logprobs") or [])  # completions
    for top in lp.get("top_logprobs") or []:
        values += list((top or {}).values())
    return values


def choice_tokens(choice: dict) -> list[str]:
    lp = choice.get("logprobs") or {}
    if "content" in lp:
        return [entry.get("token") for entry in lp.get("content") or []]
    return list(lp.get("tokens") or [])


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Collected:
    """Choices of a response, fed whole (non-streaming) or chunk by chunk (streaming)."""

    finish: dict[int, str] = field(default_factory=dict)
    values: dict[int, list] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    usage: Optional[dict] = None
    error_code: Optional[int] = None

    def add(self, obj: dict) -> None:
        if isinstance(obj.get("error"), dict):  # an error event inside a stream
            code = obj["error"].get("code")
            self.error_code = code if isinstance(code, int) else 500
            return
        for choice in obj.get("choices") or []:
            i = choice.get("index", 0)
            self.values.setdefault(i, []).extend(choice_logprobs(choice))
            self.tokens.setdefault(i, []).extend(choice_tokens(choice))
            if choice.get("finish_reason") is not None:
                self.finish[i] = choice["finish_reason"]
        if obj.get("usage"):
            self.usage = obj["usage"]

    def fill(self, out: Outcome, done: bool = True) -> Outcome:
        """Write the collected figures into ``out``; ``done``: the stream saw [DONE]."""
        out.choices = len(self.values)
        out.completed = done and self.error_code is None and out.choices > 0 and set(self.finish) == set(self.values)
        out.stream_error_code = self.error_code
        out.logprob_values = sum(len(v) for v in self.values.values())
        out.nonfinite_choices = sum(not all(map(finite, v)) for v in self.values.values())
        if self.usage:
            out.prompt_tokens = self.usage.get("prompt_tokens")
            out.cached_tokens = (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if out.probe >= 0:
            out.tokens = self.tokens.get(0, [])
        return out


def first_divergence(a: list, b: list) -> Optional[int]:
    """Index of the first differing token (the shorter length if one is a prefix of the
    other), or None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize_requests(outcomes: list[Outcome], target: int) -> dict:
    """Counts the checks read: sent, completed, aborted, statuses, errors by kind."""
    sent = [o for o in outcomes if o.sent]
    status = Counter(str(o.status) for o in sent if o.status is not None)
    by_kind: dict[str, dict] = {}
    for o in sent:
        k = by_kind.setdefault(o.kind, {"sent": 0, "completed": 0, "aborted": 0, "cut": 0, "status": Counter()})
        k["sent"] += 1
        k["completed"] += o.completed
        k["aborted"] += o.aborted
        k["cut"] += o.cut
        k["status"][f"{o.endpoint}:{o.status}"] += 1
    return {
        "target": target,
        "sent": len(sent),
        "completed": sum(o.completed for o in sent),
        "aborted": sum(o.aborted for o in sent),
        "cut_at_deadline": sum(o.cut for o in sent),
        "http_status": dict(status),
        "errors_5xx": sum(o.status is not None and o.status >= 500 for o in sent)
        + sum(o.stream_error_code is not None and o.stream_error_code >= 500 for o in sent),
        "stream_error_events": sum(o.stream_error_code is not None for o in sent),
        "transport_errors": sum(o.status is None and not o.aborted and not o.cut for o in sent),
        "transport_error_examples": sorted({o.error for o in sent if o.status is None and o.error})[:5],
        "outputs": sum(o.choices for o in sent),
        "outputs_with_logprobs": sum(o.logprob_values > 0 for o in sent),
        "outputs_nonfinite_logprobs": sum(o.nonfinite_choices for o in sent),
        "by_kind": {k: {**v, "status": dict(v["status"])} for k, v in sorted(by_kind.items())},
    }


def summarize_greedy(cold: list[Outcome], warm: list[Outcome], loaded: list[Outcome]) -> dict:
    """Each in-mix probe send against the same probe sent alone: ``cold`` (first, fully
    prefilled) and ``warm`` (again, once its prefix was cached and sealed). An in-mix send
    may find its prefix cached (then it should equal warm) or evicted (cold), so it is
    consistent when it equals either; where it equals neither, the first divergence from
    warm is reported. Cold against warm is what compression alone changed."""
    ref_cold = {o.probe: o.tokens for o in cold if o.completed}
    ref_warm = {o.probe: o.tokens for o in warm if o.completed}
    rows = []
    for o in loaded:
        if not o.completed:
            rows.append({"probe": o.probe, "completed": False})
            continue
        w, c = ref_warm.get(o.probe), ref_cold.get(o.probe)
        rows.append({"probe": o.probe, "completed": True, "equal_warm": w is not None and o.tokens == w,
                     "equal_cold": c is not None and o.tokens == c,
                     "first_divergence_from_warm": None if w is None else first_divergence(o.tokens, w),
                     "cached_tokens": o.cached_tokens})
    done = [r for r in rows if r["completed"]]
    return {
        "probes": len(ref_warm),
        "alone_completed": len(ref_cold) + len(ref_warm),
        "alone_sent": len(cold) + len(warm),
        "cold_equal_warm": sum(ref_cold.get(p) == t for p, t in ref_warm.items()),
        "cold_vs_warm_first_divergence": {str(p): first_divergence(ref_cold[p], t) for p, t in ref_warm.items()
                                          if p in ref_cold},
        "loaded_sent": len(rows),
        "loaded_completed": len(done),
        "loaded_equal_warm": sum(r["equal_warm"] for r in done),
        "loaded_equal_cold": sum(r["equal_cold"] for r in done),
        "loaded_inconsistent": sum(not (r["equal_warm"] or r["equal_cold"]) for r in done),
        "warm_cached_tokens": {str(o.probe): o.cached_tokens for o in warm},
        "loaded": rows,
    }


def evictions(series: list[dict], greedy: dict) -> dict:
    """Evidence that the radix cache evicted: sealed segments falling between two polls
    (only eviction frees a sealed segment before the flush), and probes sent in the mix
    that found less of their prefix cached than their warm send did."""
    sealed = [s["sealed_segments"] for s in series if s.get("sealed_segments") is not None]
    drops = [a - b for a, b in zip(sealed, sealed[1:]) if b < a]
    warm = greedy.get("warm_cached_tokens", {})
    lost = [r for r in greedy.get("loaded", []) if r.get("completed") and r.get("cached_tokens") is not None
            and warm.get(str(r["probe"])) is not None and r["cached_tokens"] < warm[str(r["probe"])]]
    return {"sealed_drops": len(drops), "sealed_segments_dropped": sum(drops),
            "probe_cache_losses": len(lost), "seen": bool(drops or lost)}
