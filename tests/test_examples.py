"""The examples: the custom-policy one registers working parts (its full eval is the README's
job); the agent workload's policy file, workload builder and server handling work without a GPU."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaickv import launch
from mosaickv.compressor import Compressor, compress_segment
from mosaickv.config import load_policy
from mosaickv.parts import Observation
from mosaickv.sglang_patch.sizing import KVShape, slab_bytes
from script_loader import load_script

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_policy.py"


def test_custom_policy_example_parts_compress_to_budget(tmp_path):
    module = load_script("examples/custom_policy.py", "custom_policy_example")
    path = tmp_path / "p.yaml"
    path.write_text(module.POLICY)
    policy = load_policy(path, min_context=256)
    assert policy.token_scorer.power == 2.0
    g = torch.Generator().manual_seed(0)
    obs = [Observation(torch.randn(3, 512, 64, generator=g), torch.randn(3, 512, 64, generator=g), torch.randn(9, 512, 64, generator=g))]
    cache = Compressor(policy, 64).compress(obs)
    assert all(fmt.startswith("t32/k=lowrank") for fmt in cache.formats() if "dense" not in fmt)
    assert cache.dense_nbytes() / cache.nbytes() >= 3.0


# -- examples/agent_workload.py and examples/agent_policy.yaml ------------------------------
AGENT = EXAMPLE.parent / "agent_workload.py"
AGENT_POLICY = EXAMPLE.parent / "agent_policy.yaml"


def _agent_module():
    return load_script("examples/agent_workload.py", "agent_workload_example")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_agent_policy_binds_and_seals_a_segment_within_its_slab(head_dim):
    """What the server does with the file: load, bind to the model, seal one segment into
    a slab sized for ratio 3, without dropping any block whole (the policy's ``drop: false``)."""
    policy = load_policy(AGENT_POLICY).bind(head_dim)
    assert policy.ratio == 3 and policy.segment_size == 32
    layers, heads, n = 2, 2, policy.segment_size
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(layers, heads, n, head_dim, generator=g).bfloat16() for _ in range(2))
    query_stats = torch.rand(layers, heads, head_dim, generator=g) + 0.1
    attention = torch.rand(layers, heads, n, generator=g)
    budget = slab_bytes(KVShape(layers, heads, head_dim, head_dim), n, policy.ratio)
    blocks = compress_segment(policy, k, v, budget, query_stats=query_stats, attention=attention)
    assert sum(b.nbytes() for layer in blocks for b in layer) <= budget
    assert all(b.fmt.tokens >= n // 2 for layer in blocks for b in layer)


def test_agent_conversations_share_the_system_prompt_and_extend_turn_by_turn():
    aw = _agent_module()
    convs = aw.build_conversations(conversations=4, turns=3, system_words=2000)
    assert convs == aw.build_conversations(conversations=4, turns=3, system_words=2000)
    assert len(convs) == 4 and all(len(c.users) == 3 for c in convs)
    assert len({c.system for c in convs}) == 1 and len(convs[0].system.split()) >= 2000
    assert len({c.users[0] for c in convs}) == 4  # only the prefix is shared
    for c in convs:
        answers = [f"answer {t}" for t in range(3)]
        previous = None
        for turn in range(3):
            msgs = c.messages(turn, answers[:turn])
            assert msgs[0] == {"role": "system", "content": c.system}
            assert msgs[-1] == {"role": "user", "content": c.users[turn]}
            if previous is not None:  # a prefix extension: the radix cache reuses the whole previous turn
                assert msgs[: len(previous)] == previous
                assert msgs[len(previous):] == [{"role": "assistant", "content": answers[turn - 1]},
                                                {"role": "user", "content": c.users[turn]}]
            previous = msgs


def test_agent_server_command_passes_the_policy_file_by_absolute_path(monkeypatch):
    aw = _agent_module()
    monkeypatch.chdir(AGENT_POLICY.parent)
    cmd = aw.server_command("some/model", 30123, "agent_policy.yaml", ["--mem-fraction-static", "0.5"])
    joined = " ".join(cmd)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert f"--kv-compress mosaickv --kv-compress-config {AGENT_POLICY}" in joined
    assert "--model-path some/model" in joined and "--port 30123" in joined
    assert cmd[-2:] == ["--mem-fraction-static", "0.5"]
    assert str(AGENT_POLICY) in aw.server_command("m", 1)  # the default policy


def test_agent_workload_help_runs():
    out = subprocess.run([sys.executable, str(AGENT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--model-path" in out.stdout and "--url" in out.stdout and "--conversations" in out.stdout


STUB_SERVER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"max_total_num_tokens": 100, "internal_states": [{"kv_compress_info": {"sealed_segments": 1}}]})
        self.send_response(200 if self.path in ("/health", "/server_info") else 404); self.end_headers()
        self.wfile.write(body.encode() if self.path == "/server_info" else b"")
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        delta = {"index": 0, "delta": {"content": f"{len(req['messages'])} messages"}, "finish_reason": None}
        usage = {"prompt_tokens": 50, "completion_tokens": 2, "total_tokens": 52, "prompt_tokens_details": {"cached_tokens": 40}}
        for chunk in ({**head, "choices": [delta]}, {**head, "choices": [], "usage": usage}):
            self.wfile.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
        self.wfile.write(b"data: [DONE]\\n\\n")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_agent_workload_end_to_end_against_a_stub_server(tmp_path):
    """The launch / wait / stop path and the client path, with a stand-in for SGLang."""
    aw = _agent_module()
    stub = tmp_path / "stub.py"
    stub.write_text(STUB_SERVER)
    port = _free_port()
    out = tmp_path / "results.json"
    with launch.launched([sys.executable, str(stub), str(port)], port, tmp_path / "server.log", 30) as base:
        rc = aw.main(["--url", base, "--conversations", "2", "--turns", "2", "--system-words", "50", "--quiet",
                      "--output", str(out)])
    assert not launch.healthy(base)  # stopped with its process group
    assert rc == 0
    record = json.loads(out.read_text())
    assert [(r["conversation"], r["turn"]) for r in record["requests"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert record["requests"][1]["text"] == "4 messages"  # turn 1 carried turn 0's answer
    assert record["per_turn"][1]["cached_tokens_mean"] == 40
    assert set(record["server_info"]) == {"before", "after_prime", "after"}
    assert record["server_info"]["after"]["kv_compress_info"] == [{"sealed_segments": 1}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
