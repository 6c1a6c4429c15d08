"""Long-context accuracy through a server's OpenAI API, one method against another.

A *method* is whatever answers chat requests: an SGLang server started with some flags
(``--kv-compress mosaickv``, ``--kv-cache-dtype fp8_e4m3``, none) or any running
OpenAI-compatible server. Every method reads the same generated tasks
(:mod:`mosaickv.tasks`), greedily, so differences between methods are the methods' own.
The driver only needs a ``complete(messages, max_tokens) -> str | Completion`` callable per method,
so it runs (and is tested) without a server; :func:`openai_complete` binds one to a URL
and :func:`mosaickv.launch.launched` starts and stops a server for it.

With ``prime`` each task's context goes to the method first, alone, and the driver waits
until the server has compressed it (:class:`Client` ``settle``: a MosaicKV server's
background sealing) before the whole prompt, which reuses the cached context, is sent.
Without it a short answer is mostly decoded before sealing catches up, over a context
that is still dense: priming measures the compressed cache, as a shared document or
system prompt meets it.

A request that fails is a record with its error and no score: it is counted in the
summary's ``failed``, never averaged in as a wrong answer.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from mosaickv.launch import NO_PROXY, ServerError, launched, server_command
from mosaickv.server_info import Settled, wait_sealed
from mosaickv.tasks import TOLERANCE, Task, TokenCounter, suite

@dataclass(frozen=True)
class Completion:
    """A server's answer and why it stopped (``"length"``: the budget of new tokens ran out)."""

    text: str
    finish_reason: str | None = None


Complete = Callable[[list[dict], int], "str | Completion"]
DEFAULT_LENGTHS = (1024, 2048, 4096, 7168)  # SmolLM2's context is 8192: the longest leaves room for template and answer


class RequestError(RuntimeError):
    """A request the server refused or never answered (the message names the URL)."""


@dataclass(frozen=True)
class Client:
    """A method's ``complete`` and its ``settle``: wait until the server has compressed
    what it was sent (nothing to wait for by default)."""

    complete: Complete
    settle: Callable[[], Settled] = lambda: Settled(0.0, 0)


@dataclass(frozen=True)
class Method:
    """A named way of serving: a running server's ``url``, or ``flags`` to launch one with."""

    name: str
    url: str | None = None
    flags: str | None = None


# ---------------------------------------------------------------- tasks


def build_tasks(kinds: Mapping[str, int], lengths: Sequence[int], count: TokenCounter, seed: int = 0) -> list[tuple[int, Task]]:
    """:func:`mosaickv.tasks.suite`'s tasks, each with the target length it was made for.

    A task lands within TOLERANCE of its target, so the nearest target is its own; lengths
    closer than that could not be told apart and are refused.
    """
    ordered = sorted(set(lengths))
    for a, b in zip(ordered, ordered[1:]):
        if b - a <= 2 * TOLERANCE * b:
            raise ValueError(f"lengths {a} and {b} are within {2 * TOLERANCE:.0%} of each other: give lengths further apart")
    tasks = suite(dict(kinds), list(ordered), count, seed=seed)
    return [(min(ordered, key=lambda n: abs(n - t.meta["tokens"])), t) for t in tasks]


# ---------------------------------------------------------------- the OpenAI API


def _root(base_url: str) -> str:
    """The server's root whether the user gave it or the OpenAI-style ``.../v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        raise RequestError(f"POST {url} returned HTTP {err.code}: {err.read()[:500].decode(errors='replace')}") from None
    except OSError as err:  # refused, reset, timed out (URLError is an OSError)
        raise RequestError(f"POST {url} failed: {getattr(err, 'reason', err)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise RequestError(f"POST {url} answered with something that is not JSON: {text[:300]!r}") from None


def openai_complete(base_url: str, model: str = "default", timeout: float = 600.0) -> Complete:
    """A ``complete`` that sends greedy chat requests to ``base_url``'s ``/v1/chat/completions``.

    ``model`` is the served model name (SGLang answers to any). Errors raise
    :class:`RequestError` naming the URL and the HTTP status.
    """
    url = _root(base_url) + "/v1/chat/completions"

    def complete(messages: list[dict], max_tokens: int) -> Completion:
        data = _post(url, {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}, timeout)
        try:
            choice = data["choices"][0]
            return Completion(choice["message"]["content"] or "", choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError):
            raise RequestError(f"POST {url}: no choices[0].message.content in the response {json.dumps(data)[:300]}") from None

    return complete


# ---------------------------------------------------------------- launching a server


@contextmanager
def connect(
    method: Method,
    model_path: str | Path | None = None,
    port: int = 30000,
    log_path: Path | None = None,
    startup_timeout: float = 900.0,
    request_timeout: float = 600.0,
    model: str = "default",
) -> Iterator[Complete]:
    """The method's ``complete``: its running server, or one launched on ``port`` (log to
    ``log_path``, default ``NAME.server.log``) for as long as the context lasts."""
    if method.url is not None:
        yield openai_client(method.url, model, request_timeout)
        return
    if model_path is None:
        raise ValueError(f"method {method.name!r} is launched, which needs a model path")
    command = server_command(model_path, port, method.flags or "")
    with launched(command, port, log_path or Path(f"{method.name}.server.log"), startup_timeout) as root:
        yield openai_client(root, model, request_timeout)


def openai_client(base_url: str, model: str = "default", timeout: float = 600.0) -> Client:
    """:func:`openai_complete` and, to settle, :func:`mosaickv.server_info.wait_sealed`."""
    root = _root(base_url)

    def settle() -> Settled:
        try:
            return wait_sealed(root, timeout)
        except OSError as err:
            raise RequestError(f"GET {root}/get_server_info failed: {getattr(err, 'reason', err)}") from None

    return Client(openai_complete(base_url, model, timeout), settle)


# ---------------------------------------------------------------- the driver


def ask(method: str, client: Client | Complete, length: int, task: Task, max_tokens: int | None = None,
        prime: bool = False) -> dict:
    """One request and its record; any failure of the method is the record's error, never a
    score. With ``prime`` the context goes first and the server settles (``prime_s``)."""
    client = client if isinstance(client, Client) else Client(client)
    start = time.perf_counter()
    settled = None
    try:
        if prime:
            client.complete([{"role": "user", "content": task.context}], 1)
            settled = client.settle()
        answer = client.complete(task.messages(), max_tokens or task.max_new_tokens)
    except Exception as err:  # the method failed, not the answer: recorded, counted, not scored
        return record(method, length, task, None, f"{type(err).__name__}: {err}", time.perf_counter() - start, settled,
                      max_tokens)
    if not isinstance(answer, Completion):
        answer = Completion(answer)
    return record(method, length, task, answer.text, None, time.perf_counter() - start, settled, max_tokens,
                  answer.finish_reason)


def record(method: str, length: int, task: Task, output: str | None, error: str | None, seconds: float = 0.0,
           settled: Settled | None = None, max_tokens: int | None = None, finish_reason: str | None = None) -> dict:
    """What the report keeps of one request: the task's identity (with the new tokens it
    allowed: a shorter budget cuts answers, so it is another task), the answer, why the
    server stopped it (None where unknown) and its score (None if it failed), and with
    priming the seconds the server took to settle and its ``arena_full`` count then
    (segments left dense so far for want of a slab)."""
    return {
        "method": method, "kind": task.kind, "length": length, "tokens": task.meta["tokens"], "seed": task.meta["seed"],
        "depth": task.meta.get("depth"), "new_tokens": max_tokens or task.max_new_tokens,
        "score": None if error is not None else task.score(output or ""), "output": output, "finish_reason": finish_reason,
        "answers": list(task.answers), "seconds": round(seconds, 3), "error": error,
        "prime_s": None if settled is None else round(settled.seconds, 3),
        "arena_full": None if settled is None else settled.arena_full,
    }  # fmt: skip


def evaluate(
    tasks: Sequence[tuple[int, Task]],
    methods: Mapping[str, Client | Complete | AbstractContextManager[Client | Complete]],
    max_tokens: int | None = None,
    progress: bool = True,
    save: Callable[[list[dict]], None] | None = None,
    every: int = 10,
    prime: bool = False,
    concurrent: bool = False,
    parallel: int = 1,
) -> list[dict]:
    """Every task (with its target length, as :func:`build_tasks` gives them) through every method.

    A method is a ``complete`` callable, or a context manager that gives one (a server
    started on enter and stopped on exit). Methods run one after the other, or with
    ``concurrent`` all at once, a thread each (each method's tasks still in order, the
    records still grouped by method): servers that share a GPU then answer side by side.
    ``parallel`` keeps that many of a method's tasks in flight (a thread each), as a
    server's users would; its records still come in task order. A server that does not
    start is a failure of each of its tasks. ``max_tokens`` (None:
    each task's own budget) caps the answer. ``save`` gets the records every ``every``
    requests, after each method and on the way out of an interrupted run. ``prime``: see
    the module.
    """
    if parallel < 1:
        raise ValueError(f"parallel is the number of a method's requests in flight: at least 1, got {parallel}")
    per_method: dict[str, list[dict]] = {name: [] for name in methods}
    lock = threading.Lock()
    bar = tqdm(total=len(tasks) * len(methods), desc="mosaickv accuracy", disable=not progress)

    def records() -> list[dict]:
        with lock:
            return [r for recs in per_method.values() for r in recs]

    def add(rec: dict) -> None:
        with lock:
            per_method[rec["method"]].append(rec)
            done = sum(len(recs) for recs in per_method.values())
        bar.update(1)
        if save is not None and done % every == 0:
            save(records())

    def in_flight(name: str, complete: Client | Complete) -> list[dict]:
        """The method's tasks, ``parallel`` at a time; their records in task order."""
        done: list[dict] = [{} for _ in tasks]

        def finished(i: int, future: Future) -> None:
            done[i] = future.result()
            add(done[i])

        pool = ThreadPoolExecutor(max_workers=parallel)
        try:
            futures = [pool.submit(ask, name, complete, length, task, max_tokens, prime) for length, task in tasks]
            for i, future in enumerate(futures):
                future.add_done_callback(partial(finished, i))
            wait(futures)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # an interrupted run stops asking
            raise
        pool.shutdown()
        return done

    def run(name: str) -> None:
        method = methods[name]
        context = method if isinstance(method, AbstractContextManager) else nullcontext(method)
        try:
            with context as complete:
                if parallel == 1:
                    for length, task in tasks:
                        add(ask(name, complete, length, task, max_tokens, prime))
                else:
                    in_order = in_flight(name, complete)
                    with lock:
                        per_method[name] = in_order
        except ServerError as err:
            bar.write(f"mosaickv accuracy: method {name}: {err}")
            for length, task in tasks[len(per_method[name]) :]:
                add(record(name, length, task, None, f"ServerError: {err}", max_tokens=max_tokens))
        if save is not None:
            save(records())

    try:
        if concurrent:
            with ThreadPoolExecutor(max_workers=max(1, len(methods))) as pool:
                for future in [pool.submit(run, name) for name in methods]:
                    future.result()
        else:
            for name in methods:
                bar.set_postfix_str(name)
                run(name)
    except BaseException:
        if save is not None:  # an interrupted run keeps what it has
            save(records())
        raise
    finally:
        bar.close()
    return records()


def _points(scores: list[float]) -> float | None:
    return 100 * sum(scores) / len(scores) if scores else None


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per method, in points (0-100): accuracy per kind, per length (the mean over kinds at that
    length) and ``average`` (the mean over kinds); failed requests are counted, not scored."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        recs = [r for r in records if r["method"] == method]
        ok = [r for r in recs if r["error"] is None]
        kinds = list(dict.fromkeys(r["kind"] for r in recs))
        lengths = sorted({r["length"] for r in recs})
        by_kind = {k: _points([r["score"] for r in ok if r["kind"] == k]) for k in kinds}
        by_length = {}
        for n in lengths:
            cells = [_points([r["score"] for r in ok if r["kind"] == k and r["length"] == n]) for k in kinds]
            by_length[str(n)] = _mean([c for c in cells if c is not None])
        deferred = [r["arena_full"] for r in recs if r.get("arena_full") is not None]
        out[method] = {
            "requests": len(recs), "failed": len(recs) - len(ok),
            "cut": sum(ends_inside_an_answer(r.get("output") or "", r.get("answers") or ()) for r in ok),
            "stopped_by_length": sum(r.get("finish_reason") == "length" for r in ok),
            "average": _mean([v for v in by_kind.values() if v is not None]), "by_kind": by_kind, "by_length": by_length,
            "arena_full": max(deferred) if deferred else None,
        }  # fmt: skip
    return out


def ends_inside_an_answer(output: str, answers: Sequence[str], least: int = 3) -> bool:
    """Whether ``output`` stops partway through one of ``answers`` (ends with a proper prefix
    of it, ``least`` characters or more): the mark of a budget of new tokens that cut the
    answer, since a model that copies wrong goes on, it does not stop inside the value."""
    out = output.rstrip()
    return any(out.endswith(a[:i]) for a in answers for i in range(least, len(a)))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- report


def task_key(rec: Mapping) -> tuple:
    """A task's identity in any method's record: kind, target length, tokens, seed, depth,
    answers, the new tokens it allowed (absent before the thirtieth run's budgets), and in a
    pooled report the run that asked it (:func:`pool_results`)."""
    return (rec["kind"], rec["length"], rec.get("tokens"), rec.get("seed"), rec.get("depth"), tuple(rec.get("answers") or ()),
            rec.get("new_tokens"), rec.get("run"))


def common_records(records: list[dict]) -> list[dict] | None:
    """The scored records of the tasks that every method answered, or None when they all
    answered the same tasks. A run cut short (or a method whose requests failed) leaves the
    methods with different tasks, and averages over different tasks do not compare. A method
    that answered nothing (its server never started) is left out rather than emptying the set."""
    answered: dict[str, set] = {}
    for r in records:
        keys = answered.setdefault(r["method"], set())
        if r["error"] is None:
            keys.add(task_key(r))
    sets = [keys for keys in answered.values() if keys]
    if len({frozenset(keys) for keys in sets}) <= 1:
        return None
    common = set.intersection(*sets)
    return [r for r in records if r["error"] is None and task_key(r) in common]


DEFAULT_REFERENCE = "none"  # the method others are compared with, where a run has it
RESAMPLES = 2000
CONFIDENCE = 0.95


def paired_differences(records: list[dict], reference: str, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0) -> dict:
    """Each method's average minus ``reference``'s, in points, over the tasks both answered,
    with a bootstrap confidence interval: tasks are resampled within each kind, paired (a
    task's two scores move together), and the average is the mean over kinds as in
    :func:`summarize`. The suite's cells are small (a few tasks a kind and length), so a
    difference of a few points can be noise; the interval says how much. ``tasks_for_1_point``
    projects how many paired tasks would narrow the interval to +-1 point at this spread."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not in the run; its methods are {', '.join(methods)}")
    scored = {m: {task_key(r): r for r in records if r["method"] == m and r["error"] is None} for m in methods}
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for method in methods:
        if method == reference:
            continue
        shared = [k for k in scored[reference] if k in scored[method]]
        by_kind: dict[str, list[float]] = {}
        for k in shared:
            by_kind.setdefault(k[0], []).append(100 * (scored[method][k]["score"] - scored[reference][k]["score"]))
        if not by_kind:
            out[method] = {"tasks": 0, "average": None, "low": None, "high": None, "tasks_for_1_point": None}
            continue
        diffs = [np.asarray(v) for v in by_kind.values()]
        boot = np.mean([d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1) for d in diffs], axis=0)
        low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        half = (high - low) / 2
        out[method] = {
            "tasks": len(shared), "average": float(np.mean([d.mean() for d in diffs])), "low": float(low), "high": float(high),
            "tasks_for_1_point": int(np.ceil(len(shared) * half**2)) if half > 0 else len(shared),
        }  # fmt: skip
    return {"reference": reference, "confidence": confidence, "resamples": resamples, "by_method": out}


def make_result(header: Mapping, records: list[dict], reference: str | None = None) -> dict:
    """The report: the run's header (command, date, device, methods...), records and summary;
    with ``common`` (the summary over the tasks every method answered) where methods differ,
    and ``differences`` to ``reference`` (by default ``none``, where the run has it)."""
    result = {**header, "records": records, "summary": summarize(records)}
    common = common_records(records)
    if common is not None:
        result["common"] = {"tasks": len({task_key(r) for r in common}), "summary": summarize(common)}
    methods = set(result["summary"])
    if reference is None and DEFAULT_REFERENCE in methods and len(methods) > 1:
        reference = DEFAULT_REFERENCE
    if reference is not None:
        result["differences"] = paired_differences(records, reference)
    return result


DERIVED = ("records", "summary", "common", "differences", "plot")  # what make_result and the plot add to a header
SAME_TASKS = ("kinds", "lengths", "samples", "seed", "max_tokens", "prime_context")  # what makes two runs' rows comparable


def merge_results(results: Sequence[Mapping], names: Sequence[str] = (), reference: str | None = None) -> dict:
    """One report from runs that asked the same tasks of different methods (servers on
    two GPUs, or two machines): their records side by side, the summary recomputed.
    Refuses runs whose tasks differ (``SAME_TASKS``) or that share a method name. One run
    alone is summarized again under its own header (a report written before ``common`` or
    ``differences`` existed gains them)."""
    if not results:
        raise ValueError("no runs to merge")
    if len(results) == 1:
        header = {k: v for k, v in results[0].items() if k not in DERIVED}
        return make_result(header, list(results[0]["records"]), reference)
    names = list(names) or [f"run {i + 1}" for i in range(len(results))]
    first = results[0]
    for name, other in zip(names[1:], results[1:]):
        for key in SAME_TASKS:
            if other.get(key) != first.get(key):
                raise ValueError(f"{name} asked other tasks than {names[0]}: {key} is {other.get(key)!r}, not {first.get(key)!r}")
    seen: dict[str, str] = {}
    for name, result in zip(names, results):
        for method in dict.fromkeys(r["method"] for r in result["records"]):
            if method in seen:
                raise ValueError(f"method {method!r} is in both {seen[method]} and {name}: rename one before merging")
            seen[method] = name
    header = {key: first.get(key) for key in ("date_utc", "device", "model_path", "tokenizer", *SAME_TASKS, "concurrent", "requests_per_method")}
    header["command"] = [r.get("command") for r in results]
    header["merged_from"] = names
    header["devices"] = [r.get("device") for r in results]
    header["methods"] = [m for r in results for m in r.get("methods", [])]
    return make_result(header, [rec for r in results for rec in r["records"]], reference)


def pool_results(results: Sequence[Mapping], names: Sequence[str] = (), reference: str | None = None) -> dict:
    """One report from runs that asked other tasks (other samples, lengths or seeds) of the
    same methods: more tasks behind each difference, its interval narrower. A record gains
    ``run``, its run's index, so a task pairs only within its run (two runs' tasks may look
    alike: ``samples`` moves the depths, not the seeds). Refuses runs that asked the same
    tasks of a method (a repeat: ``mosaickv accuracy-repeat``; other methods: merge them)."""
    if len(results) < 2:
        raise ValueError("pooling needs two runs or more")
    names = list(names) or [f"run {i + 1}" for i in range(len(results))]
    asked = [{key: r.get(key) for key in SAME_TASKS} for r in results]
    methods = [set(rec["method"] for rec in r["records"]) for r in results]
    for i in range(len(results)):
        for j in range(i):
            if asked[i] == asked[j] and methods[i] & methods[j]:
                raise ValueError(f"{names[i]} asked {names[j]}'s tasks again of {', '.join(sorted(methods[i] & methods[j]))}: "
                                 "a repeat, not more tasks (compare them with accuracy-repeat)")
    first = results[0]
    header = {key: first.get(key) for key in ("date_utc", "device", "model_path", "tokenizer", "max_tokens", "prime_context")}
    header.update(command=[r.get("command") for r in results], pooled_from=names, asked=asked,
                  devices=[r.get("device") for r in results],
                  methods=[m for r in results for m in r.get("methods", [])])
    records = [{**rec, "run": i} for i, r in enumerate(results) for rec in r["records"]]
    return make_result(header, records, reference)


def repeat_report(first: Mapping, second: Mapping, names: Sequence[str] = ("first", "second"),
                  reference: str | None = None) -> dict:
    """How far asking the same tasks again moved each method's scores. Greedy serving is
    not deterministic from run to run (other batches, other reduction orders), so this is
    the noise under any difference between methods. For each method both runs asked, over
    the tasks both answered: how many scored differently, each run's average, and the
    second's minus the first's, paired per task with a bootstrap interval; with a
    ``reference`` (``none`` where both runs have it) each run's difference to it over the
    tasks all four answered."""
    runs = [list(first["records"]), list(second["records"])]
    methods = [list(dict.fromkeys(r["method"] for r in recs)) for recs in runs]
    shared_methods = [m for m in methods[0] if m in methods[1]]
    if not shared_methods:
        raise ValueError(f"{names[0]} and {names[1]} share no method: {', '.join(methods[0])} against {', '.join(methods[1])}")
    if reference is None and DEFAULT_REFERENCE in shared_methods and len(shared_methods) > 1:
        reference = DEFAULT_REFERENCE
    if reference is not None and reference not in shared_methods:
        raise ValueError(f"reference method {reference!r} is not in both runs; they share {', '.join(shared_methods)}")
    answered = [{m: {task_key(r): r for r in recs if r["method"] == m and r["error"] is None} for m in shared_methods}
                for recs in runs]
    by_method: dict[str, dict] = {}
    for m in shared_methods:
        keys = [k for k in answered[0][m] if k in answered[1][m]]
        pair = [[answered[i][m][k] for k in keys] for i in (0, 1)]
        both = [{**r, "method": name} for name, recs in zip(names, pair) for r in recs]
        averages = summarize(both) if keys else {}
        row = {
            "tasks": len(keys),
            "changed": sum(a["score"] != b["score"] for a, b in zip(*pair)),
            names[0]: averages.get(names[0], {}).get("average"),
            names[1]: averages.get(names[1], {}).get("average"),
            "change": paired_differences(both, names[0])["by_method"][names[1]] if keys else None,
        }
        if reference is not None and m != reference:
            common = [k for k in keys if k in answered[0][reference] and k in answered[1][reference]]
            row["difference_to_reference"] = {
                name: paired_differences([answered[i][x][k] for x in (reference, m) for k in common], reference)["by_method"][m]
                for i, name in enumerate(names)
            }
        by_method[m] = row
    return {"runs": list(names), "commands": [first.get("command"), second.get("command")], "reference": reference,
            "confidence": CONFIDENCE, "by_method": by_method}


def format_repeat(report: Mapping) -> str:
    """Markdown: a row per method, what asking again changed; then, with a reference, each
    run's difference to it over the same tasks."""
    a, b = report["runs"]

    def interval(d: Mapping | None) -> str:
        return "-" if not d or d["low"] is None else f"{d['average']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"

    lines = [f"the same tasks asked twice ({a}, then {b}); points, average over kinds; {b} minus {a} paired per task, "
             f"{100 * report['confidence']:.0f}% bootstrap interval:", "",
             f"| method | tasks | scores changed | {a} | {b} | {b} - {a} |", "|---|---:|---:|---:|---:|---:|"]
    for m, row in report["by_method"].items():
        lines.append(f"| {m} | {row['tasks']} | {row['changed']} | {_cell(row[a])} | {_cell(row[b])} | {interval(row['change'])} |")
    ref = report["reference"]
    if ref is not None:
        lines += ["", f"difference to {ref} over the tasks both runs answered with both methods:", "",
                  f"| method | {a} | {b} |", "|---|---:|---:|"]
        for m, row in report["by_method"].items():
            if "difference_to_reference" in row:
                d = row["difference_to_reference"]
                lines.append(f"| {m} | {interval(d[a])} | {interval(d[b])} |")
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> None:
    """Write through a temporary file, so a run killed mid-write keeps the previous save."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _kinds(result: dict) -> list[str]:
    return list(dict.fromkeys(k for s in result["summary"].values() for k in s["by_kind"]))


def format_table(result: dict) -> str:
    """Markdown: a row per method, a column per kind, the average over kinds and the failed count;
    where the methods answered different tasks, the same again over the tasks they all answered."""
    kinds = _kinds(result)
    lengths = sorted({n for s in result["summary"].values() for n in map(int, s["by_length"])})
    lines = [
        f"accuracy in points (0-100), lengths {', '.join(map(str, lengths))} tokens; average = mean over kinds; failed requests are not scored",
        "",
        *_table(result["summary"], kinds),
    ]
    short = {name: s["arena_full"] for name, s in result["summary"].items() if s.get("arena_full")}
    if short:
        lines += ["", *(f"{name}: arena_full = {n}: its server left that many segments dense for want of a free slab by "
                        "the last task settled, so some prompts were read less compressed than the method's budget"
                        for name, n in short.items())]
    cut = {name: s["cut"] for name, s in result["summary"].items() if s.get("cut")}
    if cut:
        lines += ["", "answers that stop inside an answer value (cut by the new-token budget, most likely): "
                  + ", ".join(f"{name} {n}" for name, n in cut.items())]
    stopped = {name: s["stopped_by_length"] for name, s in result["summary"].items() if s.get("stopped_by_length")}
    if stopped:
        lines += ["", "answers the server stopped at the new-token budget (finish_reason length): "
                  + ", ".join(f"{name} {n}" for name, n in stopped.items())]
    if "common" in result:
        lines += [
            "",
            f"the methods answered different tasks (a run cut short, or failed requests): over the {result['common']['tasks']} "
            "tasks that every method answered, where the averages compare:",
            "",
            *_table(result["common"]["summary"], kinds),
        ]
    if "differences" in result:
        diff = result["differences"]
        lines += [
            "",
            f"difference to {diff['reference']} in points (average over kinds), paired over the tasks both answered, with a "
            f"{100 * diff['confidence']:.0f}% bootstrap interval:",
            "",
            "| method | difference | interval | tasks | tasks for +-1 point |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, d in diff["by_method"].items():
            interval = "-" if d["low"] is None else f"[{d['low']:+.1f}, {d['high']:+.1f}]"
            lines.append(f"| {name} | {'-' if d['average'] is None else format(d['average'], '+.1f')} | {interval} | {d['tasks']} | "
                         f"{'-' if d['tasks_for_1_point'] is None else d['tasks_for_1_point']} |")
    return "\n".join(lines)


def _table(summary: Mapping[str, dict], kinds: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(kinds) + " | average | failed |", "|---|" + "---:|" * (len(kinds) + 2)]
    for name, s in summary.items():
        cells = [_cell(s["by_kind"].get(k)) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(s['average'])} | {s['failed']}/{s['requests']} |")
    return lines


def plot_accuracy(result: dict, path: str | Path) -> None:
    """Left: accuracy (mean over kinds) against prompt length, a line per method. Right: accuracy
    per kind and the average, a bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    common = result.get("common")
    summary = common["summary"] if common else result["summary"]  # where methods answered different tasks, those all answered
    kinds = [*_kinds(result), "average"]
    diff = result.get("differences")
    ratios = [1, 1.8, 0.9] if diff else [1, 1.8]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.4 * sum(ratios) / 0.95, 4.4), gridspec_kw={"width_ratios": ratios})
    left, right = axes[:2]
    width = 0.8 / max(1, len(summary))
    colors = plt.get_cmap("tab10" if len(summary) <= 10 else "tab20").colors  # one color per method
    for j, (name, s) in enumerate(summary.items()):
        color = colors[j % len(colors)]
        points = sorted((int(n), v) for n, v in s["by_length"].items() if v is not None)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="os^Dv<>p*h"[j % 10], color=color, label=name)
        values = [s["by_kind"].get(k) for k in kinds[:-1]] + [s["average"]]
        right.bar([i + (j - (len(summary) - 1) / 2) * width for i in range(len(kinds))], [float("nan") if v is None else v for v in values], width,
                  color=color, label=name)
    lengths = sorted({int(n) for s in summary.values() for n in s["by_length"]})
    left.set_xscale("log", base=2)
    left.set_xticks(lengths, [str(n) for n in lengths])
    left.minorticks_off()
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel("accuracy (points, mean over kinds)")
    right.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("accuracy (points)")
    left.set_title("mean over kinds", fontsize=9)
    right.set_title("per kind, all lengths", fontsize=9)
    for ax in (left, right):
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2 if len(summary) > 6 else 1)
    if diff:
        _plot_differences(axes[2], diff, {name: colors[j % len(colors)] for j, name in enumerate(summary)})
    model = Path(result.get("model_path") or result.get("tokenizer") or "").name
    only = f", on the {common['tasks']} tasks every method answered" if common else ""
    fig.suptitle(f"Accuracy through the OpenAI API, {model} ({result.get('device') or 'device not given'}){only}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_differences(ax, diff: Mapping, colors: Mapping[str, tuple]) -> None:
    """Each method's difference to the reference with its interval, a row each."""
    rows = [(name, d) for name, d in diff["by_method"].items() if d["average"] is not None]
    for i, (name, d) in enumerate(rows):
        ax.errorbar(d["average"], i, xerr=[[d["average"] - d["low"]], [d["high"] - d["average"]]], fmt="o", capsize=3,
                    color=colors.get(name, "k"))
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"points against {diff['reference']}")
    ax.set_title(f"difference, {100 * diff['confidence']:.0f}% interval (paired)", fontsize=9)
    ax.grid(alpha=0.3)
