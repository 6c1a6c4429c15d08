"""The accuracy driver: deterministic tasks, scores through the driver, failures counted apart,
summaries, reports, the CLI's method arguments and the server launcher (with a stub server
on the loopback interface standing in for SGLang, which needs a GPU)."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mosaickv.accuracy import (
    RequestError,
    Completion,
    build_tasks,
    ends_inside_an_answer,
    evaluate,
    format_table,
    make_result,
    paired_differences,
    openai_complete,
    plot_accuracy,
    repeat_report,
    summarize,
    task_key,
    write_json,
)
from mosaickv.cli import build_parser, main
from mosaickv.launch import NO_PROXY, ServerError, launched, server_command
from mosaickv.tasks import KINDS, TOLERANCE, hf_counter

pytest.importorskip("transformers")

LENGTHS = [256, 512]
STUB = textwrap.dedent(
    """
    # An OpenAI-compatible stub: greedy requests get the prompt back (it contains every answer);
    # paths under /broken fail with HTTP 500; under /sealing it plays a MosaicKV server that
    # seals for two server-info polls after each request and, from its third request on,
    # finds its arena full for one segment a request. /events lists what it was sent.
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    EVENTS, PENDING, POSTS = [], [0], [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/events":
                return self.send(200, EVENTS)
            if self.path == "/sealing/get_server_info":
                EVENTS.append(["info", PENDING[0]])
                info = {"internal_states": [{"kv_compress_info": {"sealing_pending": PENDING[0], "oldest_pending_s": 0.1,
                                                                  "arena_full": max(0, POSTS[0] - 2)}}]}
                PENDING[0] = max(0, PENDING[0] - 1)
                return self.send(200, info)
            if self.path == "/get_server_info":
                return self.send(200, {"internal_states": [{}]})
            self.send(200 if self.path == "/health" else 404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.startswith("/broken"):
                return self.send(500, {"object": "error", "message": "stub failure"})
            if self.path.startswith("/sealing"):
                EVENTS.append(["post", body["max_tokens"], body["messages"][-1]["content"]])
                PENDING[0], POSTS[0] = 2, POSTS[0] + 1
            greedy = body["temperature"] == 0 and isinstance(body["max_tokens"], int)
            content = body["messages"][-1]["content"] if greedy else "not a greedy request"
            self.send(200, {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})

        def send(self, status, data):
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    print("stub pid", os.getpid(), flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    from mosaickv import model as models

    return models.converted_model_dir()


@pytest.fixture(scope="module")
def count(tokenizer_dir):
    from transformers import AutoTokenizer

    return hf_counter(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def tasks(count):
    return build_tasks(dict.fromkeys(KINDS, 1), LENGTHS, count, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stub(tmp_path) -> list[str]:
    path = tmp_path / "stub.py"
    path.write_text(STUB)
    return [sys.executable, str(path)]


def by_prompt(tasks):
    return {t.prompt: t.answers for _, t in tasks}


def test_task_selection_is_deterministic_and_each_task_knows_its_length(tasks, count):
    again = build_tasks(dict.fromkeys(KINDS, 1), LENGTHS, count, seed=0)
    other = build_tasks(dict.fromkeys(KINDS, 1), LENGTHS, count, seed=1)
    assert [(n, t.prompt) for n, t in tasks] == [(n, t.prompt) for n, t in again]
    assert all(a.prompt != b.prompt for (_, a), (_, b) in zip(tasks, other))
    assert sorted((n, t.kind) for n, t in tasks) == sorted((n, k) for n in LENGTHS for k in KINDS)
    assert all(abs(t.meta["tokens"] - n) <= TOLERANCE * n + 1 for n, t in tasks)
    with pytest.raises(ValueError, match="within 4%"):
        build_tasks({"single_number": 1}, [500, 505], count)


def test_right_answers_score_100_wrong_or_empty_0_and_partial_kinds_partial(tasks):
    answers = by_prompt(tasks)
    budgets = []

    def right(messages, max_tokens):
        budgets.append(max_tokens)
        return "Sure: " + ", ".join(answers[messages[0]["content"]]) + "."

    methods = {
        "right": right,
        "wrong": lambda messages, max_tokens: "I do not know, maybe 1234567 or Paris.",
        "empty": lambda messages, max_tokens: "",
        "first": lambda messages, max_tokens: answers[messages[0]["content"]][0],
    }
    records = evaluate(tasks, methods, progress=False)
    assert budgets == [t.max_new_tokens for _, t in tasks]  # each task's own budget by default
    summary = summarize(records)
    assert summary["right"]["average"] == 100 and set(summary["right"]["by_length"].values()) == {100}
    for name in ("wrong", "empty"):
        assert summary[name]["average"] == 0 and summary[name]["failed"] == 0
    first = summary["first"]["by_kind"]
    assert first["multivalue"] == pytest.approx(25) and first["freqwords"] == pytest.approx(100 / 3) and first["vartrack"] == pytest.approx(20)
    assert first["single_uuid"] == first["docqa"] == 100
    rec = records[0]
    assert set(rec) == {"method", "kind", "length", "tokens", "seed", "depth", "new_tokens", "score", "output", "finish_reason",
                        "answers", "seconds", "error", "prime_s", "arena_full"}
    assert rec["score"] == 1.0 and rec["error"] is None and rec["answers"] == list(tasks[0][1].answers)
    assert rec["new_tokens"] == tasks[0][1].max_new_tokens
    capped = evaluate(tasks[:2], {"capped": right}, max_tokens=5, progress=False)
    assert budgets[-2:] == [5, 5] and [r["new_tokens"] for r in capped] == [5, 5]
    # Another budget is another task: a capped answer never pairs with an uncapped one.
    assert task_key(capped[0]) != task_key({**capped[0], "new_tokens": tasks[0][1].max_new_tokens})


def test_answers_cut_inside_a_value_are_counted_and_reported():
    """An output that stops partway through an answer is the budget's cut, counted per
    method and named under the table; a wrong copy that goes on, or a whole answer, is not."""
    uuid = "8a4a9c67-0032-4f07-8f67-f92a313bbb7e"
    assert ends_inside_an_answer("The special magic UUID is: 8a4a9c67-0032-4f07-8f67-f92a313bbb7", [uuid])
    assert not ends_inside_an_answer(f"The special magic UUID is: {uuid}", [uuid])
    assert not ends_inside_an_answer("The special magic UUID is: 8a4a9c67-0032-4f07-8f67-f92a313bbb7f.", [uuid])
    assert not ends_inside_an_answer("It is 8a", [uuid])  # under three characters: too likely by chance
    base = {"kind": "single_uuid", "length": 1024, "seed": 0, "depth": 0.5, "answers": [uuid], "error": None}
    records = [{**base, "method": "none", "output": uuid, "score": 1.0},
               {**base, "method": "m", "output": "is: " + uuid[:20], "score": 0.0}]
    result = make_result({}, records)
    assert result["summary"]["none"]["cut"] == 0 and result["summary"]["m"]["cut"] == 1
    assert "answers that stop inside an answer value (cut by the new-token budget, most likely): m 1" in format_table(result)


def test_the_servers_finish_reason_is_kept_and_answers_stopped_by_the_budget_are_counted(tasks):
    """A server says why it stopped; an answer that ran out of new tokens ("length") is
    counted per method and named under the table; a plain text answer has no reason."""
    answers = by_prompt(tasks)
    whole = lambda m, n: Completion(" ".join(answers[m[0]["content"]]), "stop")  # noqa: E731
    cut = lambda m, n: Completion(" ".join(answers[m[0]["content"]])[:3], "length")  # noqa: E731
    records = evaluate(tasks, {"whole": whole, "cut": cut, "text": lambda m, n: "x"}, progress=False)
    assert {r["method"]: r["finish_reason"] for r in records} == {"whole": "stop", "cut": "length", "text": None}
    result = make_result({}, records)
    assert result["summary"]["whole"]["average"] == 100 and result["summary"]["whole"]["stopped_by_length"] == 0
    assert result["summary"]["cut"]["stopped_by_length"] == len(tasks) and result["summary"]["text"]["stopped_by_length"] == 0
    assert f"answers the server stopped at the new-token budget (finish_reason length): cut {len(tasks)}" in format_table(result)


def test_a_failing_method_is_counted_as_failed_never_scored(tasks):
    answers = by_prompt(tasks)

    def sometimes(messages, max_tokens):
        if "born" in messages[0]["content"]:  # docqa
            raise RuntimeError("HTTP 503 from the server")
        return " ".join(answers[messages[0]["content"]])

    records = evaluate(tasks, {"flaky": sometimes}, progress=False)
    failed = [r for r in records if r["error"]]
    assert {r["kind"] for r in failed} == {"docqa"} and len(failed) == len(LENGTHS)
    assert all(r["score"] is None and r["output"] is None and "RuntimeError: HTTP 503" in r["error"] for r in failed)
    s = summarize(records)["flaky"]
    assert s["failed"] == len(LENGTHS) and s["requests"] == len(tasks)
    assert s["by_kind"]["docqa"] is None and s["average"] == 100  # the failures are not averaged in as zeros
    assert f"| - | 100.0 | {len(LENGTHS)}/{len(tasks)} |" in format_table(make_result({}, records))


def test_a_server_that_does_not_start_fails_its_tasks_and_the_next_method_runs(tasks):
    class NoServer:
        def __enter__(self):
            raise ServerError("exited with status 1 before /health answered")

        def __exit__(self, *exc):
            return False

    records = evaluate(tasks[:3], {"down": NoServer(), "up": lambda m, n: "x"}, progress=False)
    summary = summarize(records)
    assert summary["down"]["failed"] == 3 and summary["down"]["average"] is None
    assert records[0]["error"] == "ServerError: exited with status 1 before /health answered"
    assert summary["up"]["failed"] == 0 and summary["up"]["requests"] == 3


def test_records_are_saved_as_the_run_goes_and_when_it_is_interrupted(tasks):
    saved = []
    evaluate(tasks[:7], {"a": lambda m, n: "", "b": lambda m, n: ""}, progress=False, save=lambda r: saved.append(len(r)), every=3)
    assert saved == [3, 6, 7, 9, 12, 14]  # every 3 requests and after each method
    calls = []

    def interrupted(messages, max_tokens):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return ""

    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(tasks, {"a": interrupted}, progress=False, save=lambda r: saved.append(len(r)), every=100)
    assert saved == [4]


def record(kind, length, score, error=None):
    return {"method": "m", "kind": kind, "length": length, "score": score, "error": error}


def test_summary_averages_a_hand_built_record_set():
    records = [
        record("single_number", 256, 1.0),
        record("single_number", 256, 0.0),
        record("single_number", 512, 1.0),
        record("multivalue", 256, 0.5),
        record("multivalue", 512, None, error="RequestError: POST http://x/v1/chat/completions returned HTTP 500"),
    ]
    s = summarize(records)["m"]
    assert s["requests"] == 5 and s["failed"] == 1
    assert s["by_kind"] == pytest.approx({"single_number": 200 / 3, "multivalue": 50})
    assert s["average"] == pytest.approx((200 / 3 + 50) / 2)  # the mean over kinds, not over requests
    assert s["by_length"] == pytest.approx({"256": 50, "512": 100})  # at 512 only single_number was scored


def test_report_round_trips_through_json_and_the_plot_is_written(tasks, tmp_path):
    answers = by_prompt(tasks)
    records = evaluate(tasks, {"right": lambda m, n: " ".join(answers[m[0]["content"]]), "empty": lambda m, n: ""}, progress=False)
    result = make_result({"command": "mosaickv accuracy", "device": "test CPU", "methods": [{"name": "right"}, {"name": "empty"}]}, records)
    write_json(tmp_path / "acc.json", result)
    assert json.loads((tmp_path / "acc.json").read_text()) == result
    plot_accuracy(result, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(result).splitlines()
    assert table[2] == "| method | " + " | ".join(KINDS) + " | average | failed |"
    assert table[4] == "| right | " + " | ".join(["100.0"] * len(KINDS)) + f" | 100.0 | 0/{len(tasks)} |"
    assert table[5].startswith("| empty | 0.0 |")


def test_cli_parses_methods_and_refuses_malformed_ones_naming_the_flag(capsys):
    args = build_parser().parse_args(["accuracy", "--server", "a=http://x:1", "--launch", "mosaic3x=--kv-compress mosaickv", "--launch", "none="])
    assert args.methods == [{"name": "a", "url": "http://x:1"}, {"name": "mosaic3x", "flags": "--kv-compress mosaickv"}, {"name": "none", "flags": ""}]
    assert args.kinds == list(KINDS) and args.lengths == [1024, 2048, 4096, 7168]
    for argv, words in [
        (["--server", "nonsense"], ["argument --server", "'nonsense' is not NAME=URL"]),
        (["--server", "a=x:1"], ["argument --server", "http"]),
        (["--launch", "fp8"], ["argument --launch", "NAME=FLAGS"]),
        (["--launch", "x=--port 5"], ["argument --launch", "'--port 5' set --port", "the launcher sets --model-path and --port itself"]),
        (["--server", "a=http://x:1", "--kinds", "nope"], ["argument --kinds", "invalid choice: 'nope'", "single_number"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["accuracy", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and all(w in err for w in words), err
    for argv, words in [
        ([], ["--server NAME=URL or --launch NAME=FLAGS"]),
        (["--launch", "none="], ["--launch needs --model-path"]),
        (["--server", "a=http://x:1"], ["--tokenizer (or --model-path)"]),
        (["--server", "a=http://x:1", "--server", "a=http://y:1"], ["'a' is given twice"]),
    ]:
        with pytest.raises(SystemExit):
            main(["accuracy", *argv])
        assert all(w in capsys.readouterr().err for w in words)


def test_launch_command_line():
    assert server_command("/models/smollm2", 30001, "--kv-compress mosaickv --kv-compress-config mosaic", python="python") == [
        "python", "-m", "sglang.launch_server", "--model-path", "/models/smollm2", "--port", "30001",
        "--kv-compress", "mosaickv", "--kv-compress-config", "mosaic",
    ]  # fmt: skip
    assert server_command("m", 1, "", python="py") == ["py", "-m", "sglang.launch_server", "--model-path", "m", "--port", "1"]
    assert server_command("m", 1, "--kv-compress-config '/a b/p.yaml'", python="py")[-1] == "/a b/p.yaml"
    for flags in ("--port 5", "--model-path=/x", "--kv-compress 'mosaickv"):
        with pytest.raises(ValueError, match="launch flags"):
            server_command("m", 1, flags)


def test_launcher_reports_a_server_that_exits_with_its_log_tail(tmp_path):
    command = [sys.executable, "-c", "print('CUDA error: no device'); raise SystemExit(3)"]
    with pytest.raises(ServerError, match=r"(?s)exited with status 3.*CUDA error: no device"):
        with launched(command, free_port(), tmp_path / "s.log", startup_timeout=60):
            pass


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie waits for init, not for us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_launcher_times_out_and_stops_the_whole_process_group(tmp_path):
    server = "import os, subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); print('pids', os.getpid(), w.pid, flush=True); time.sleep(120)"
    log = tmp_path / "s.log"
    with pytest.raises(ServerError, match=r"not healthy .* after 3 s \(--startup-timeout\)"):
        with launched([sys.executable, "-c", server], free_port(), log, startup_timeout=3):
            pass
    text = log.read_text()
    assert text.startswith("$ ")  # the command line heads the log
    leader, worker = map(int, text.split("pids ")[1].split()[:2])
    assert not alive(leader) and not alive(worker)  # the worker too: the whole group is stopped


def test_launched_stub_server_through_the_cli_end_to_end(stub, tokenizer_dir, tmp_path, capsys):
    port = free_port()
    with launched([*stub, str(port)], port, tmp_path / "stub.log", startup_timeout=60) as root:
        assert openai_complete(root + "/v1")([{"role": "user", "content": "hello"}], 4) == Completion("hello", "stop")
        with pytest.raises(RequestError, match=rf"POST {root}/broken/v1/chat/completions returned HTTP 500: .*stub failure"):
            openai_complete(root + "/broken")([{"role": "user", "content": "x"}], 4)
        out = tmp_path / "acc.json"
        argv = [
            "accuracy", "--server", f"echo={root}", "--server", f"broken={root}/broken", "--tokenizer", str(tokenizer_dir),
            "--kinds", "single_number", "multivalue", "--lengths", "256", "--samples", "2", "--device", "test CPU",
            "--output", str(out), "--plot", str(tmp_path / "acc.png"), "--quiet",
        ]  # fmt: skip
        assert main(argv) == 1  # failed requests make the exit status non-zero
    assert not alive(int((tmp_path / "stub.log").read_text().split("stub pid ")[1].split()[0]))  # stopped on exit
    captured = capsys.readouterr()
    assert "| echo | 100.0 | 100.0 | 100.0 | 0/4 |" in captured.out and "| broken | - | - | - | 4/4 |" in captured.out
    assert "4 of 8 requests failed" in captured.err
    result = json.loads(out.read_text())
    assert result["device"] == "test CPU" and [m["name"] for m in result["methods"]] == ["echo", "broken"]
    assert result["summary"]["echo"]["average"] == 100 and result["summary"]["broken"]["failed"] == 4
    assert all("HTTP 500" in r["error"] and f"{root}/broken/v1/chat/completions" in r["error"] for r in result["records"] if r["method"] == "broken")
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RequestError, match=rf"POST {root}/v1/chat/completions failed"):  # nothing listens any more
        openai_complete(root)([{"role": "user", "content": "x"}], 4)


def test_prime_context_sends_the_context_waits_for_sealing_then_asks(stub, tokenizer_dir, tmp_path, count):
    """--prime-context: per task the context alone (one token asked), server-info polls
    until nothing is left sealing, then the whole prompt; a server without MosaicKV is
    not waited for."""
    port = free_port()
    with launched([*stub, str(port)], port, tmp_path / "stub.log", startup_timeout=60) as root:
        out = tmp_path / "acc.json"
        argv = [
            "accuracy", "--server", f"mosaic={root}/sealing", "--server", f"plain={root}", "--prime-context",
            "--tokenizer", str(tokenizer_dir), "--kinds", "single_number", "--lengths", "256", "--samples", "2",
            "--output", str(out), "--quiet",
        ]  # fmt: skip
        assert main(argv) == 0
        with NO_PROXY.open(root + "/events", timeout=10) as response:
            events = json.loads(response.read().decode())
    tasks = [t for _, t in build_tasks({"single_number": 2}, [256], count, seed=0)]
    expected = []
    for task in tasks:
        expected += [["post", 1, task.context], ["info", 2], ["info", 1], ["info", 0],
                     ["post", task.max_new_tokens, task.prompt]]
    assert events == expected
    result = json.loads(out.read_text())
    assert result["prime_context"] is True and result["summary"]["mosaic"]["average"] == 100
    assert all(r["prime_s"] is not None and r["prime_s"] >= 0 for r in result["records"])
    # The sealing server's arena was full from its third request (the second task's prime)
    # on: its records say so, its summary keeps the count, and the table warns for it alone.
    assert [r["arena_full"] for r in result["records"] if r["method"] == "mosaic"] == [0, 1]
    assert [r["arena_full"] for r in result["records"] if r["method"] == "plain"] == [0, 0]
    assert result["summary"]["mosaic"]["arena_full"] == 1 and result["summary"]["plain"]["arena_full"] == 0
    table = format_table(result)
    assert "mosaic: arena_full = 1: its server left that many segments dense" in table and "plain: arena_full" not in table


def test_concurrent_methods_answer_side_by_side_and_keep_their_records_grouped(tasks):
    import threading

    both_started = threading.Barrier(2, timeout=10)  # sequential methods would never both reach it
    order = {"a": [], "b": []}

    def method(name):
        def complete(messages, max_tokens):
            if not order[name]:
                both_started.wait()
            order[name].append(messages[0]["content"])
            return name
        return complete

    records = evaluate(tasks[:4], {"a": method("a"), "b": method("b")}, progress=False, concurrent=True)
    assert [r["method"] for r in records] == ["a"] * 4 + ["b"] * 4
    assert [r["output"] for r in records] == ["a"] * 4 + ["b"] * 4
    assert order["a"] == order["b"] and len(order["a"]) == 4  # each method's tasks in the same order
    assert all(r["error"] is None for r in records)


def test_a_method_keeps_parallel_requests_in_flight_and_its_records_in_task_order(tasks):
    import threading

    answers = by_prompt(tasks)
    lock, live, peak = threading.Lock(), [0], [0]
    three_in = threading.Barrier(3, timeout=10)  # fewer than three in flight would never pass it

    def complete(messages, max_tokens):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        if messages[0]["content"] in first_three:
            three_in.wait()
        with lock:
            live[0] -= 1
        return " ".join(answers[messages[0]["content"]])

    first_three = {task.messages()[0]["content"] for _, task in tasks[:3]}
    parallel = evaluate(tasks, {"m": complete}, progress=False, parallel=3)
    assert peak[0] == 3
    one_by_one = evaluate(tasks, {"m": lambda m, n: " ".join(answers[m[0]["content"]])}, progress=False)
    drop = ("seconds", "prime_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in parallel] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one_by_one]
    with pytest.raises(ValueError, match="at least 1, got 0"):
        evaluate(tasks, {"m": complete}, progress=False, parallel=0)


def test_parallel_must_be_a_positive_count(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["accuracy", "--server", "a=http://x", "--parallel", "0"])
    assert "--parallel: '0' is not a whole number of at least 1" in capsys.readouterr().err


def test_merge_puts_runs_side_by_side_and_refuses_other_tasks_or_a_shared_method(tasks, tmp_path, capsys):
    answers = by_prompt(tasks)
    right = evaluate(tasks, {"right": lambda m, n: " ".join(answers[m[0]["content"]])}, progress=False)
    empty = evaluate(tasks, {"empty": lambda m, n: ""}, progress=False)
    header = {"kinds": list(KINDS), "lengths": LENGTHS, "samples": {"single_number": 1}, "seed": 0, "prime_context": True}
    files = []
    for name, recs, extra in (("a", right, {}), ("b", empty, {}), ("other", empty, {"seed": 1}), ("again", right, {})):
        files.append(tmp_path / f"{name}.json")
        write_json(files[-1], make_result({**header, **extra, "command": f"mosaickv accuracy {name}"}, recs))
    out = tmp_path / "merged.json"
    assert main(["accuracy-merge", str(files[0]), str(files[1]), "--output", str(out), "--plot", str(tmp_path / "m.png")]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["summary"]) == ["right", "empty"]
    assert merged["summary"]["right"]["average"] == 100.0 and merged["summary"]["empty"]["average"] == 0.0
    assert merged["summary"] == summarize(right + empty)
    assert merged["command"] == ["mosaickv accuracy a", "mosaickv accuracy b"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    for bad, words in ((files[2], "seed is 1"), (files[3], "method 'right' is in both")):
        with pytest.raises(SystemExit):
            main(["accuracy-merge", str(files[0]), str(bad), "--output", str(tmp_path / "x.json")])
        assert words in capsys.readouterr().err


def test_pool_pairs_each_task_within_its_run_and_refuses_a_repeat(tasks, tmp_path, capsys):
    """Two runs that asked other tasks: every task counts once, paired within its run (the
    second run's tasks here look like the first's, as --samples leaves seeds alike), so a
    method right in one run and wrong in the other is 50 points under the reference."""
    answers = by_prompt(tasks)
    right = lambda m, n: " ".join(answers[m[0]["content"]])  # noqa: E731
    header = {"kinds": list(KINDS), "lengths": LENGTHS, "seed": 0, "prime_context": True}
    first = evaluate(tasks, {"none": right, "m": right}, progress=False)
    second = evaluate(tasks, {"none": right, "m": lambda m, n: ""}, progress=False)
    files = []
    for name, recs, samples in (("first", first, 1), ("second", second, 2), ("again", second, 1)):
        files.append(tmp_path / f"{name}.json")
        write_json(files[-1], make_result({**header, "samples": {"single_number": samples}, "command": name}, recs))
    out = tmp_path / "pooled.json"
    assert main(["accuracy-merge", "--pool", str(files[0]), str(files[1]), "--output", str(out)]) == 0
    pooled = json.loads(out.read_text())
    diff = pooled["differences"]["by_method"]["m"]
    assert diff["tasks"] == 2 * len(tasks) and diff["average"] == pytest.approx(-50.0)
    assert pooled["summary"]["m"]["requests"] == 2 * len(tasks) and pooled["summary"]["m"]["average"] == pytest.approx(50.0)
    assert pooled["pooled_from"] == [str(files[0]), str(files[1])] and pooled["command"] == ["first", "second"]
    assert {r["run"] for r in pooled["records"]} == {0, 1}
    with pytest.raises(SystemExit):
        main(["accuracy-merge", "--pool", str(files[0]), str(files[2]), "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert f"{files[2]} asked {files[0]}'s tasks again of m, none: a repeat, not more tasks" in err


def test_a_run_cut_short_is_also_compared_over_the_tasks_every_method_answered(tasks, tmp_path):
    answers = by_prompt(tasks)
    right = lambda m, n: " ".join(answers[m[0]["content"]])  # noqa: E731
    full = evaluate(tasks, {"a": right, "b": lambda m, n: ""}, progress=False)
    assert "common" not in make_result({}, full)  # the same tasks: the summary already compares
    cut = len(tasks) // 2  # b's run was cut after half its tasks, and b gets every one of those right
    records = [r for r in full if r["method"] == "a"] + evaluate(tasks[:cut], {"b": right}, progress=False)
    result = make_result({}, records)
    assert result["common"]["tasks"] == cut
    common = result["common"]["summary"]
    assert common["a"]["requests"] == common["b"]["requests"] == cut
    assert common["a"]["average"] == common["b"]["average"] == 100
    assert result["summary"]["a"]["requests"] == len(tasks)  # the full summary keeps every record
    table = format_table(result)
    assert f"over the {cut} tasks that every method answered" in table
    last = table.splitlines()[-1]
    assert last.startswith("| b | ") and last.endswith(f" | 100.0 | 0/{cut} |")
    plot_accuracy(result, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_a_method_that_answered_nothing_does_not_empty_the_common_tasks(tasks):
    answers = by_prompt(tasks)
    right = lambda m, n: " ".join(answers[m[0]["content"]])  # noqa: E731
    records = evaluate(tasks, {"a": right}, progress=False) + evaluate(tasks[:3], {"b": right}, progress=False)
    records += [{**r, "method": "down", "score": None, "output": None, "error": "ServerError: exited"} for r in records[: len(tasks)]]
    result = make_result({}, records)
    assert result["common"]["tasks"] == 3 and set(result["common"]["summary"]) == {"a", "b"}


def paired(method, scores, kind="single_number", error_at=()):
    return [{"method": method, "kind": kind, "length": 1024, "tokens": 1000, "seed": i, "depth": 0.5, "answers": [str(i)],
             "score": None if i in error_at else s, "error": "RequestError: HTTP 500" if i in error_at else None}
            for i, s in enumerate(scores)]  # fmt: skip


def test_differences_to_none_are_paired_per_task_with_an_interval_around_them():
    rng = np.random.default_rng(7)
    ref = (rng.random(200) < 0.5).astype(float)
    worse = np.where(rng.random(200) < 0.2, 0.0, ref)  # a fifth of the tasks lost
    records = paired("none", ref) + paired("lossy", worse) + paired("same", ref)
    diff = make_result({}, records)["differences"]
    assert diff["reference"] == "none" and set(diff["by_method"]) == {"lossy", "same"}
    lossy, same = diff["by_method"]["lossy"], diff["by_method"]["same"]
    assert lossy["average"] == pytest.approx(100 * (worse - ref).mean())
    assert lossy["low"] < lossy["average"] < lossy["high"] < 0  # a real loss: the interval excludes 0
    assert (same["average"], same["low"], same["high"]) == (0, 0, 0)  # identical answers: no spread at all
    # paired: the interval of a loss on a few tasks is far narrower than the scores' own spread
    assert lossy["high"] - lossy["low"] < 2 * 1.96 * 100 * np.sqrt(0.25 / 200)
    assert paired_differences(records, "none") == diff  # seeded: the same report every time
    assert lossy["tasks_for_1_point"] > 200  # +-1 point needs more tasks than this run had


def test_differences_average_over_kinds_and_skip_tasks_either_method_failed():
    records = paired("none", [1, 1, 1, 1], "single_number") + paired("none", [0, 0], "multikey")
    records += paired("m", [1, 0, 0, 0], "single_number", error_at=(3,)) + paired("m", [1, 1], "multikey")
    d = paired_differences(records, "none")["by_method"]["m"]
    assert d["tasks"] == 5  # the failed task is not paired
    assert d["average"] == pytest.approx((100 * -2 / 3 + 100) / 2)  # the mean over kinds, as the summary's average
    assert d["low"] <= d["average"] <= d["high"]


def test_a_reference_that_is_not_in_the_run_is_refused_by_name(tasks, tmp_path, capsys):
    records = paired("a", [1, 0]) + paired("b", [0, 0])
    assert "differences" not in make_result({}, records)  # no none, none asked: nothing to compare with
    with pytest.raises(ValueError, match="reference method 'nonee' is not in the run; its methods are a, b"):
        make_result({}, records, "nonee")
    write_json(tmp_path / "r.json", make_result({"kinds": list(KINDS)}, records))
    with pytest.raises(SystemExit):
        main(["accuracy-merge", str(tmp_path / "r.json"), "--output", str(tmp_path / "x.json"), "--reference", "nonee"])
    assert "reference method 'nonee' is not in the run" in capsys.readouterr().err
    assert main(["accuracy-merge", str(tmp_path / "r.json"), "--output", str(tmp_path / "y.json"), "--reference", "a"]) == 0
    table = capsys.readouterr().out
    assert "difference to a in points" in table and "| b | -50.0 |" in table


def test_merging_one_run_summarizes_it_again_under_its_own_header(tmp_path):
    records = paired("none", [1, 1, 0]) + paired("m", [1, 0, 0])
    old = {"command": "mosaickv accuracy --server none=...", "device": "H200", "merged_from": ["a.json", "b.json"],
           "records": records, "summary": summarize(records), "plot": "/elsewhere/old.png"}  # written before differences existed
    write_json(tmp_path / "old.json", old)
    assert main(["accuracy-merge", str(tmp_path / "old.json"), "--output", str(tmp_path / "new.json")]) == 0
    new = json.loads((tmp_path / "new.json").read_text())
    assert {k: new[k] for k in ("command", "device", "merged_from", "records", "summary")} == {k: old[k] for k in ("command", "device", "merged_from", "records", "summary")}
    assert "plot" not in new  # the old plot is not this report's
    assert new["differences"]["by_method"]["m"]["average"] == pytest.approx(-100 / 3)


def test_a_repeat_counts_changed_scores_and_pairs_the_change_per_task(tmp_path, capsys):
    first = {"command": "run a", "records": paired("none", [1, 1, 0, 0, 1, 0]) + paired("m", [1, 0, 0, 0, 0, 0])}
    # asked again with two more tasks: none's third task now right, m's fifth failed
    second = {"command": "run b", "records": paired("none", [1, 1, 1, 0, 1, 0, 1, 1])
              + paired("m", [1, 0, 0, 0, 0, 0, 1, 0], error_at=(4,))}
    report = repeat_report(first, second, ["a", "b"])
    none, m = report["by_method"]["none"], report["by_method"]["m"]
    assert (none["tasks"], none["changed"], m["tasks"], m["changed"]) == (6, 1, 5, 0)
    assert none["a"] == pytest.approx(100 * 3 / 6) and none["b"] == pytest.approx(100 * 4 / 6)
    assert none["change"]["average"] == pytest.approx(100 / 6) and none["change"]["low"] <= 100 / 6 <= none["change"]["high"]
    assert (m["change"]["average"], m["change"]["low"], m["change"]["high"]) == (0, 0, 0)
    # each run's difference to none over the five tasks both methods answered in both runs
    assert report["reference"] == "none" and "difference_to_reference" not in none
    assert m["difference_to_reference"]["a"]["average"] == pytest.approx(100 * (1 - 2) / 5)
    assert m["difference_to_reference"]["b"]["average"] == pytest.approx(100 * (1 - 3) / 5)
    for name, run in (("ra", first), ("rb", second)):
        write_json(tmp_path / f"{name}.json", run)
    assert main(["accuracy-repeat", str(tmp_path / "ra.json"), str(tmp_path / "rb.json"), "--output", str(tmp_path / "rep.json")]) == 0
    table = capsys.readouterr().out
    assert "| none | 6 | 1 | 50.0 | 66.7 | +16.7 [" in table and "| m | -20.0 [" in table
    assert json.loads((tmp_path / "rep.json").read_text())["runs"] == ["ra", "rb"]


def test_a_repeat_needs_a_shared_method_and_its_reference_in_both_runs(capsys, tmp_path):
    a, b = {"records": paired("none", [1, 0])}, {"records": paired("m", [1, 0])}
    with pytest.raises(ValueError, match="first and second share no method: none against m"):
        repeat_report(a, b)
    with pytest.raises(ValueError, match="reference method 'x' is not in both runs; they share none"):
        repeat_report(a, a, reference="x")
    write_json(tmp_path / "a.json", a)
    write_json(tmp_path / "b.json", b)
    with pytest.raises(SystemExit):
        main(["accuracy-repeat", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "cannot compare" in capsys.readouterr().err
