"""Next-token fidelity of a server whose prefix cache holds compressed segments.

For each text: send the first ``--prefix`` tokens (the radix cache keeps them and the
plugin seals them), then the whole text asking for the top-``--top`` log-probs of every
token past the prefix, so those positions attend to what the cache kept. Run it against
a ``--kv-compress none`` server and a compressed one, then ``compare`` the two files:
top-1 agreement and KL(none || other) summed over none's top k (the full KL's terms for
those tokens: zero when both servers agree exactly), where a token missing from the other
server's top k gets that server's k-th log-prob (an upper bound on its probability).
A mosaickv server seals in the background: the second request waits until it is done.

    python fidelity_client.py run PORT MODEL OUT.json [--texts 4 --prefix 1536 --total 2048]
    python fidelity_client.py compare NONE.json OTHER.json OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request


def post(port: int, path: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def texts(tokenizer, count: int, total: int) -> list[list[int]]:
    from mosaickv.evaluate import corpus_text

    ids = tokenizer(corpus_text(count * total * 6)).input_ids
    if len(ids) < count * total:
        raise SystemExit(f"the corpus gives {len(ids)} tokens, fewer than --texts x --total = {count * total}")
    return [ids[i * total : (i + 1) * total] for i in range(count)]


def wait_sealed(port: int, timeout: float = 300) -> float:
    """:func:`mosaickv.server_info.wait_sealed` on a local port; a timeout ends the run."""
    from mosaickv.server_info import wait_sealed as wait

    try:
        return wait(f"http://127.0.0.1:{port}", timeout).seconds
    except TimeoutError as err:
        raise SystemExit(str(err)) from None


def run(port: int, model: str, out: str, count: int, prefix: int, total: int, top: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    records = []
    for ids in texts(tok, count, total):
        t = time.time()
        post(port, "/generate", {"input_ids": ids[:prefix], "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        waited = wait_sealed(port)
        res = post(port, "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": prefix,
                                       "top_logprobs_num": top,
                                       "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        meta = res["meta_info"]
        tops = [{int(tid): lp for lp, tid, *_ in pos} for pos in meta["input_top_logprobs"] if pos]
        records.append({"seconds": round(time.time() - t, 2), "sealing_wait_s": round(waited, 2),
                        "cached_tokens": meta.get("cached_tokens"),
                        "positions": len(tops), "top": tops})
    json.dump({"port": port, "prefix": prefix, "total": total, "top_k": top, "texts": records}, open(out, "w"))


def compare(a_path: str, b_path: str, out: str) -> dict:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    agree = n = 0
    kls = []
    for ra, rb in zip(a["texts"], b["texts"]):
        for pa, pb in zip(ra["top"], rb["top"]):
            pa = {int(k): v for k, v in pa.items()}
            pb = {int(k): v for k, v in pb.items()}
            n += 1
            agree += max(pa, key=pa.get) == max(pb, key=pb.get)
            floor = min(pb.values())
            kls.append(sum(math.exp(v) * (v - pb.get(k, floor)) for k, v in pa.items()))
    kls.sort()
    res = {"positions": n, "top1_agreement": agree / n if n else None,
           "topk_kl_mean": sum(kls) / n if n else None, "topk_kl_median": kls[n // 2] if n else None,
           "top_k": a["top_k"], "prefix": a["prefix"], "total": a["total"],
           "cached_tokens": [[r.get("cached_tokens") for r in x["texts"]] for x in (a, b)]}
    json.dump(res, open(out, "w"), indent=1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run")
    r.add_argument("port", type=int)
    r.add_argument("model")
    r.add_argument("out")
    r.add_argument("--texts", type=int, default=4)
    r.add_argument("--prefix", type=int, default=1536)
    r.add_argument("--total", type=int, default=2048)
    r.add_argument("--top", type=int, default=20)
    c = sub.add_parser("compare")
    c.add_argument("none")
    c.add_argument("other")
    c.add_argument("out")
    args = ap.parse_args(argv)
    if args.step == "run":
        run(args.port, args.model, args.out, args.texts, args.prefix, args.total, args.top)
    else:
        print(json.dumps(compare(args.none, args.other, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
