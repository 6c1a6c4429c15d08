"""An agent-style workload against SGLang with MosaicKV and a custom policy file.

Agents send one long system prompt (instructions plus tool descriptions) with every
request, and each conversation grows by the assistant's answer and a tool result per
turn. SGLang's radix cache shares that prefix across requests; with ``--kv-compress
mosaickv`` the shared segments are sealed (compressed) once and every later request reads
the sealed copy. This script shows it: it launches the server with
``examples/agent_policy.yaml``, primes the system prompt with one request, runs G
conversations of T turns concurrently, and prints per-turn latency, prompt and cached
tokens, and the server's ``kv_compress_info`` (sealed segments, achieved ratio) before the
prime, after it and after the workload.

On a GPU machine with the package and ``sglang==0.5.17`` installed (``pip install -e
.[serve]``), from the repository root::

    python examples/agent_workload.py --model-path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --output agent_results.json -- --sampling-backend pytorch --mem-fraction-static 0.5

A local model folder works as well. Flags after ``--`` go to ``sglang.launch_server``
unchanged (add ``--kv-compress-cuda-graph`` to decode under CUDA graphs).
``--url http://127.0.0.1:30000`` uses a running server instead (start it with
``--enable-cache-report`` to get cached tokens). On an H200 with
``-- --kv-compress-cuda-graph --sampling-backend pytorch --mem-fraction-static 0.5`` it
answered 24 of 24 requests in 3.0 s, the 3,360-token system prompt cached for every turn
and sealed once (``benchmarks/results/h200x2_2026-11-30/agent.txt``). Latencies are
reported to compare turns and to catch stalls; the serving benchmarks measure speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from openai import OpenAI
from tqdm import tqdm

from mosaickv import launch

POLICY = Path(__file__).resolve().parent / "agent_policy.yaml"

TOOLS = ["search_orders", "get_invoice", "refund_payment", "update_address", "list_shipments",
         "cancel_subscription", "lookup_customer", "create_ticket", "escalate_ticket", "check_inventory",
         "reserve_stock", "schedule_callback", "send_email", "apply_coupon", "verify_identity",
         "get_exchange_rate", "compute_tax", "track_parcel", "merge_accounts", "export_report"]
NOUNS = ["customer", "order", "invoice", "payment", "address", "parcel", "ticket", "account", "coupon",
         "warehouse", "currency", "region", "carrier", "subscription", "report", "record"]
TYPES = ["string", "integer", "boolean", "ISO-8601 date", "decimal amount", "list of strings"]
RULES = [
    "Think about which tool answers the question before calling any tool.",
    "Call at most one tool per step and wait for its result before the next step.",
    "Never invent identifiers; copy them exactly from earlier tool results or from the user.",
    "If a tool returns an error, explain the error and propose the next step instead of retrying blindly.",
    "Quote amounts with their currency and round them to two decimals.",
    "Ask the user for confirmation before any tool that moves money or deletes data.",
    "Keep answers short: one sentence of reasoning, then the tool call or the final answer.",
    "When the user's question is answered, say so and stop calling tools.",
]
QUESTIONS = [
    "Which tool should be called next, and with which arguments?",
    "Is the request complete, or is another step needed?",
    "Summarize what we know so far in one sentence.",
    "Which identifier from the result matters for the next call?",
]


@dataclass(frozen=True)
class Conversation:
    """One agent conversation: the shared system prompt and the user message of each turn."""

    system: str
    users: tuple[str, ...]

    def messages(self, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
        """Chat messages for ``turn``, given the assistant's answers to the earlier turns.

        Turn t is turn t-1 plus its answer and one user message, so the prompt of every
        turn extends the previous one: that is what lets the radix cache reuse it.
        """
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs the {turn} earlier answers, got {len(answers)}")
        msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": self.users[0]}]
        for t in range(1, turn + 1):
            msgs += [{"role": "assistant", "content": answers[t - 1]}, {"role": "user", "content": self.users[t]}]
        return msgs


def system_prompt(words: int, seed: int = 0) -> str:
    """Agent instructions plus generated tool descriptions, at least ``words`` words long.

    Deterministic, so that every conversation (and every run) sends the identical prefix.
    """
    rng = random.Random(seed)
    parts = ["You are an operations agent for an online shop. You solve the user's request by calling tools.",
             "Rules:", *(f"{i + 1}. {rule}" for i, rule in enumerate(RULES)), "Tools:"]
    count = sum(len(p.split()) for p in parts)
    i = 0
    while count < words:
        name = TOOLS[i % len(TOOLS)] + ("" if i < len(TOOLS) else f"_v{i // len(TOOLS) + 1}")
        subject, other = rng.sample(NOUNS, 2)
        params = "; ".join(
            f"{noun}_{field} ({rng.choice(TYPES)}, {'required' if j == 0 else 'optional'}): the {field} of the {noun}"
            for j, (noun, field) in enumerate((rng.choice(NOUNS), rng.choice(["id", "name", "date", "status", "amount"]))
                                              for _ in range(rng.randint(2, 4))))
        tool = (f"- {name}: works on the {subject} and returns the matching {other} records as JSON. "
                f"Parameters: {params}. Errors: NOT_FOUND when no {subject} matches, "
                f"FORBIDDEN when the caller may not see the {other}.")
        parts.append(tool)
        count += len(tool.split())
        i += 1
    return "\n".join(parts)


def build_conversations(conversations: int = 8, turns: int = 3, system_words: int = 2000,
                        seed: int = 0) -> list[Conversation]:
    """The workload: every conversation shares one system prompt; user turns differ.

    Turn 0 states a task, later turns carry a tool result and a question. Pure and
    deterministic in its arguments, so runs are comparable.
    """
    if conversations < 1 or turns < 1 or system_words < 1:
        raise ValueError("conversations, turns and system_words must be >= 1")
    system = system_prompt(system_words, seed)
    out = []
    for g in range(conversations):
        rng = random.Random(seed * 1_000_003 + g + 1)
        order = rng.randint(10_000, 99_999)
        users = [f"Task {g}: customer C{rng.randint(100, 999)} asks about order O{order}: "
                 f"{rng.choice(['it has not arrived', 'the invoice is wrong', 'they want a refund', 'the address changed'])}. "
                 f"{QUESTIONS[0]}"]
        for t in range(1, turns):
            tool = rng.choice(TOOLS)
            result = {"tool": tool, "status": rng.choice(["ok", "ok", "NOT_FOUND"]), "order": f"O{order}",
                      "amount": f"{rng.randint(5, 500)}.{rng.randint(0, 99):02d} EUR", "step": t}
            users.append(f"Tool result: {json.dumps(result)}\n{QUESTIONS[t % len(QUESTIONS)]}")
        out.append(Conversation(system, tuple(users)))
    return out


def server_command(model_path: str, port: int, policy: str | os.PathLike = POLICY,
                   extra: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The launch command; the policy path is made absolute so the server's cwd does not matter.

    ``--enable-cache-report`` makes responses carry ``prompt_tokens_details.cached_tokens``.
    """
    flags = ["--kv-compress", "mosaickv", "--kv-compress-config", str(Path(policy).resolve()),
             "--host", "127.0.0.1", "--enable-cache-report", *extra]
    return launch.server_command(model_path, port, shlex.join(flags), python=python)


def kv_compress_info(base: str) -> dict:
    """``max_total_num_tokens`` and each DP rank's ``kv_compress_info`` from ``/server_info``."""
    with urllib.request.urlopen(f"{base}/server_info", timeout=60) as r:
        info = json.loads(r.read().decode())
    states = info.get("internal_states") or []
    return {"max_total_num_tokens": info.get("max_total_num_tokens"),
            "kv_compress_info": [s.get("kv_compress_info") for s in states]}


@dataclass
class TurnResult:
    """One request: latency to the first content token and to the end, and its token usage."""

    conversation: int
    turn: int
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""


def send(client: OpenAI, conversation: int, turn: int, messages: list[dict[str, str]], max_tokens: int) -> TurnResult:
    """One greedy, streamed chat request (``conversation`` -1: the prime); errors are
    recorded, not raised, so one failure does not hide the others."""
    start = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage = None
    try:
        stream = client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    pieces.append(choice.delta.content)
    except Exception as exc:  # a failed request is a result of the run, not a crash of it
        return TurnResult(conversation, turn, False, f"{type(exc).__name__}: {exc}",
                          latency_s=time.perf_counter() - start)
    end = time.perf_counter()
    details = getattr(usage, "prompt_tokens_details", None)
    return TurnResult(conversation, turn, True, ttft_s=None if first is None else first - start,
                      latency_s=end - start, prompt_tokens=getattr(usage, "prompt_tokens", None),
                      completion_tokens=getattr(usage, "completion_tokens", None),
                      cached_tokens=getattr(details, "cached_tokens", None), text="".join(pieces))


def run_conversation(client: OpenAI, index: int, conv: Conversation, max_tokens: int,
                     advance: Callable[[int], None]) -> list[TurnResult]:
    """Turns in order (each needs the previous answer); a failed turn ends the conversation,
    and ``advance`` then also counts the turns that will not be sent."""
    results: list[TurnResult] = []
    answers: list[str] = []
    for turn in range(len(conv.users)):
        res = send(client, index, turn, conv.messages(turn, answers), max_tokens)
        results.append(res)
        if not res.ok:
            advance(len(conv.users) - turn)
            break
        advance(1)
        answers.append(res.text)
    return results


def summarize(results: list[TurnResult], turns: int, conversations: int) -> list[dict]:
    """Per turn: requests, failures, conversations cut short, median TTFT and latency, tokens."""

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def mean(xs: list[int]) -> float | None:
        return statistics.fmean(xs) if xs else None

    rows = []
    for t in range(turns):
        done = [r for r in results if r.turn == t]
        ok = [r for r in done if r.ok]
        rows.append({
            "turn": t, "ok": len(ok), "failed": len(done) - len(ok), "not_sent": conversations - len(done),
            "ttft_median_s": med([r.ttft_s for r in ok if r.ttft_s is not None]),
            "latency_median_s": med([r.latency_s for r in ok]),
            "latency_max_s": max((r.latency_s for r in ok), default=None),
            "prompt_tokens_mean": mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
            "cached_tokens_mean": mean([r.cached_tokens for r in ok if r.cached_tokens is not None]),
        })
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(prime: TurnResult | None, rows: list[dict], infos: dict[str, dict]) -> None:
    """The table a user reads: per-turn numbers, then the sealing counters at each stage."""
    print("\nturn  ok  failed  not_sent  ttft_med_s  lat_med_s  lat_max_s  prompt_tok  cached_tok")
    for r in rows:
        print(f"{r['turn']:>4}  {r['ok']:>2}  {r['failed']:>6}  {r['not_sent']:>8}  {_fmt(r['ttft_median_s'], '10.3f')}  "
              f"{_fmt(r['latency_median_s'], '9.3f')}  {_fmt(r['latency_max_s'], '9.3f')}  "
              f"{_fmt(r['prompt_tokens_mean'], '10.0f')}  {_fmt(r['cached_tokens_mean'], '10.0f')}")
    if prime is not None:
        state = "ok" if prime.ok else f"failed: {prime.error}"
        print(f"\nprime request (the system prompt and a one-line user message): {state}, prompt tokens {prime.prompt_tokens}, "
              f"cached tokens {prime.cached_tokens}")
    print("\nkv_compress_info (rank 0):")
    keys = ("sealed_segments", "sealed_tokens", "achieved_ratio", "compression_calls", "capacity_gain",
            "part_failures", "arena_full")
    for stage, info in infos.items():
        kv = (info.get("kv_compress_info") or [None])[0]
        if kv is None:
            print(f"  {stage:>14}: no kv_compress_info (is the server running with --kv-compress mosaickv?)")
            continue
        print(f"  {stage:>14}: " + ", ".join(f"{k}={kv.get(k)}" for k in keys)
              + f", max_total_num_tokens={info.get('max_total_num_tokens')}")
    print("The system prompt is shared when every request's cached tokens cover it, and sealed once when the "
          "prime adds about one copy of it to sealed_tokens and the conversations add only their own turns.")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags before ``--``, the server's after it."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description="Launch SGLang with MosaicKV and a policy file, send an agent workload that shares one long "
                    "system prompt, report latency, cached tokens and the server's kv_compress_info.",
        epilog="Arguments after '--' go to sglang.launch_server unchanged, for example:\n"
               "  python examples/agent_workload.py --model-path M -- --mem-fraction-static 0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    server = p.add_argument_group("server")
    server.add_argument("--model-path", help="model to serve (required unless --url is given)")
    server.add_argument("--policy", default=str(POLICY),
                        help="policy file passed as --kv-compress-config (default: examples/agent_policy.yaml)")
    server.add_argument("--port", type=int, default=30000, help="port of the launched server (default: %(default)s)")
    server.add_argument("--url", help="use this running server (e.g. http://127.0.0.1:30000) instead of launching "
                                      "one; start it with --enable-cache-report to see cached tokens")
    server.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for /health; a first start compiles kernels for minutes "
                             "(default: %(default)s)")
    server.add_argument("--server-log", type=Path,
                        help="where the launched server's output goes (default: "
                             "mosaickv-agent-server-PORT.log in the temp dir)")
    work = p.add_argument_group("workload")
    work.add_argument("--conversations", type=int, default=8, help="conversations, G (default: %(default)s)")
    work.add_argument("--turns", type=int, default=3, help="turns per conversation, T (default: %(default)s)")
    work.add_argument("--system-words", type=int, default=2000,
                      help="length of the shared system prompt in words (default: %(default)s)")
    work.add_argument("--seed", type=int, default=0,
                      help="seed of the generated prompts and tool results (default: %(default)s)")
    work.add_argument("--max-tokens", type=int, default=32,
                      help="tokens generated per turn, greedy (default: %(default)s)")
    work.add_argument("--concurrency", type=int, default=0,
                      help="conversations in flight at once; 0: all of them (default: %(default)s)")
    work.add_argument("--no-prime", action="store_true",
                      help="skip the single request that caches and seals the system prompt before the "
                           "conversations start (without it, their first turns all arrive with the prefix uncached)")
    work.add_argument("--request-timeout", type=float, default=600.0,
                      help="seconds per request (default: %(default)s)")
    p.add_argument("--output", type=Path, help="also write everything (per request, per turn, server info) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(ours)
    if args.url is None and args.model_path is None:
        p.error("give --model-path to launch a server, or --url to use a running one")
    if args.url is not None and extra:
        p.error("server flags after '--' need a launched server, not --url")
    return args, extra


def run_workload(base: str, args: argparse.Namespace) -> dict:
    """Prime, run the conversations concurrently, read server info at each stage."""
    client = OpenAI(base_url=f"{base}/v1", api_key="EMPTY", timeout=args.request_timeout, max_retries=0)
    convs = build_conversations(args.conversations, args.turns, args.system_words, args.seed)
    infos = {"before": kv_compress_info(base)}
    prime = None
    if not args.no_prime:
        prime = send(client, -1, 0, [{"role": "system", "content": convs[0].system},
                                     {"role": "user", "content": "Reply with OK."}], 1)
        infos["after_prime"] = kv_compress_info(base)
    bar = tqdm(total=len(convs) * args.turns, desc="requests", unit="req", disable=args.quiet)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:  # conversations finish turns from several threads
            bar.update(n)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency or len(convs)) as pool:
        futures = [pool.submit(run_conversation, client, g, c, args.max_tokens, advance) for g, c in enumerate(convs)]
        results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - start
    bar.close()
    infos["after"] = kv_compress_info(base)
    rows = summarize(results, args.turns, len(convs))
    print_report(prime, rows, infos)
    sent = sum(r.prompt_tokens or 0 for r in results if r.ok)
    print(f"\n{sum(r.ok for r in results)} of {len(convs) * args.turns} requests answered in {wall:.1f} s; "
          f"{sent} prompt tokens sent, the system prompt ({args.system_words}+ words) in every request")
    return {"wall_s": wall, "prime": None if prime is None else asdict(prime), "per_turn": rows,
            "server_info": infos, "requests": [asdict(r) for r in results]}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the workload; exit status 1 if the server failed or any request did."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    record: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.url is not None:
        record.update(run_workload(args.url.rstrip("/"), args))
    else:
        cmd = server_command(args.model_path, args.port, args.policy, extra)
        log = args.server_log or Path(tempfile.gettempdir()) / f"mosaickv-agent-server-{args.port}.log"
        record["server_command"] = cmd
        print("launching:", " ".join(cmd), f"\nserver log: {log}", flush=True)
        try:
            with launch.launched(cmd, args.port, log, args.startup_timeout) as base:
                record.update(run_workload(base, args))
        except launch.ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.output is not None:
        args.output.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.output}")
    failed = sum(not r["ok"] for r in record["requests"]) + (record["prime"] is not None and not record["prime"]["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
