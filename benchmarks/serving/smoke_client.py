"""Requests for the GPU smoke run (stdlib only): one greedy chat, one ~1500-token
passkey completion sent twice (the second hits the radix cache), then server info.
Usage: smoke_client.py PORT OUT_JSON"""

import json
import sys
import time
import urllib.request

port, out_path = int(sys.argv[1]), sys.argv[2]
base = f"http://127.0.0.1:{port}"


def call(path, body=None, timeout=120):
    t = time.time()
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read().decode())
        return {"ok": True, "seconds": round(time.time() - t, 3), "response": data}
    except Exception as exc:  # record, do not stop the other requests
        return {"ok": False, "seconds": round(time.time() - t, 3), "error": f"{type(exc).__name__}: {exc}"}


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY = "71432"
LONG = ("There is a pass key hidden in a lot of irrelevant text. Find it and remember it.\n"
        + FILLER * 32 + f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key.\n"
        + FILLER * 32 + "What is the pass key? The pass key is")

res = {}
chat = call("/v1/chat/completions", {"model": "default", "temperature": 0, "max_tokens": 16,
                                      "messages": [{"role": "user", "content": "What is the capital of France?"}]})
if chat["ok"]:
    r = chat.pop("response")
    chat["text"] = r["choices"][0]["message"]["content"]
    chat["usage"] = r.get("usage")
res["chat"] = chat
for name in ("long", "long_repeat"):
    c = call("/v1/completions", {"model": "default", "temperature": 0, "max_tokens": 16, "prompt": LONG})
    if c["ok"]:
        r = c.pop("response")
        c["text"] = r["choices"][0]["text"]
        c["usage"] = r.get("usage")
        c["passkey_found"] = PASSKEY in c["text"]
    res[name] = c
info = call("/get_server_info", timeout=30)
if info["ok"]:
    r = info.pop("response")
    res["max_total_num_tokens"] = r.get("max_total_num_tokens")
    states = r.get("internal_states") or [{}]
    res["kv_compress_info"] = states[0].get("kv_compress_info")
    res["internal_state_keys"] = sorted(states[0].keys())
    res["server_args_excerpt"] = {k: r.get(k) for k in ("kv_compress", "kv_compress_config", "attention_backend",
                                                        "radix_cache_backend", "max_running_requests", "page_size",
                                                        "mem_fraction_static", "max_total_tokens")}
    res["max_running_requests_state"] = states[0].get("max_running_requests")
res["server_info_call"] = info
json.dump(res, open(out_path, "w"), indent=1)
print(json.dumps({k: (v.get("text") if isinstance(v, dict) and "text" in v else v) for k, v in res.items()
                  if k in ("chat", "long", "long_repeat", "max_total_num_tokens", "kv_compress_info")}, indent=1))
