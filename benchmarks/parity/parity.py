"""Hugging Face vs SGLang on the same weights and the same token ids (issue 5, part 1).

Three steps, each its own process on the GPU machine (a process holds one model):

    python benchmarks/parity/parity.py hf --model M --dtype bfloat16 --out hf_bf16.pt --hooks
    python benchmarks/parity/parity.py sglang --model M --out sgl.pt [--dump DIR] [--engine '{"dtype": "bfloat16"}']
    python benchmarks/parity/parity.py compare --hf hf_bf16.pt --sglang sgl.pt [--dump DIR] --json out.json

``hf`` and ``sglang`` run every prompt of :data:`PROMPTS` alone (no batching), greedy for
``--new`` tokens past any end-of-sequence token, and keep each prompt token's log-prob.
With ``--hooks``/``--dump`` the first prompt's per-module outputs are kept too (SGLang's
own ``--debug-tensor-dump-output-folder``), so ``compare`` can name the first module
where the two runs part.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import torch

PROMPTS: list[list[dict[str, str]] | str] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    ("There is a pass key hidden in a lot of irrelevant text. Find it and remember it.\n"
     + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 24
     + "The pass key is 71432. Remember it. 71432 is the pass key.\n"
     + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 24
     + "What is the pass key? The pass key is"),
]


TOP = 5  # per greedy step, each run keeps its top log-probs: the margin where runs part


def prompt_ids(tokenizer, prompt: list[dict[str, str]] | str) -> list[int]:
    """Chat prompts through the model's template (as the server's chat endpoint does)."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def run_hf(model_path: str, dtype: str, new: int, hooks: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    cfg = model.config
    modules: dict[str, torch.Tensor] = {}
    handles = []
    if hooks:
        def keep(name):
            def hook(module, args, kwargs, output):
                t = _first_tensor(output)
                if t is not None:
                    modules[name] = t.detach().float().cpu()[0] if t.dim() == 3 else t.detach().float().cpu()
                if name.endswith("self_attn"):  # the roped q and k, as SGLang's rotary_emb returns them
                    h = kwargs.get("hidden_states", args[0] if args else None)
                    cos, sin = kwargs["position_embeddings"]
                    q = module.q_proj(h).view(1, -1, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
                    k = module.k_proj(h).view(1, -1, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
                    q, k = apply_rotary_pos_emb(q, k, cos, sin)
                    modules[name + ".rope_q"] = q[0].transpose(0, 1).reshape(q.shape[2], -1).float().cpu()
                    modules[name + ".rope_k"] = k[0].transpose(0, 1).reshape(k.shape[2], -1).float().cpu()
            return hook

        def keep_input(name):
            def hook(module, args):
                modules[name] = args[0].detach().float().cpu()[0]
            return hook

        for name, module in model.named_modules():
            if name.endswith("self_attn") or (not list(module.children()) and name):
                handles.append(module.register_forward_hook(keep(name), with_kwargs=True))
            if name.endswith("o_proj"):
                handles.append(module.register_forward_pre_hook(keep_input(name + ".input")))
    runs = []
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = prompt_ids(tok, prompt)
            x = torch.tensor([ids], device=device)
            out = model(x, use_cache=True)
            for h in handles if i == 0 else []:
                h.remove()
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
            prompt_lp = [None] + logprobs[:-1].gather(1, x[0, 1:, None])[:, 0].tolist()
            past, step_lp, gen, tops = out.past_key_values, logprobs[-1], [], []
            for _ in range(new):
                top = step_lp.topk(TOP)
                tops.append(dict(zip(top.indices.tolist(), top.values.tolist())))
                gen.append(int(top.indices[0]))
                step = model(torch.tensor([[gen[-1]]], device=device), past_key_values=past, use_cache=True)
                past, step_lp = step.past_key_values, torch.log_softmax(step.logits[0, -1].float(), dim=-1)
            runs.append({"ids": ids, "prompt_logprobs": prompt_lp, "output_ids": gen, "text": tok.decode(gen),
                         "step_top": tops,
                         "first_token_top": {tok.decode([t]): round(lp, 4) for t, lp in tops[0].items()} if tops else {}})
    return {"engine": f"hf transformers {dtype}", "runs": runs, "modules": modules}


def run_sglang(model_path: str, new: int, dump: str | None, engine_kw: dict, prompts: int) -> dict:
    import sglang as sgl
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    kw = {"model_path": model_path, "disable_radix_cache": True, "random_seed": 0, **engine_kw}
    if dump:
        kw["debug_tensor_dump_output_folder"] = dump
    t = time.time()
    engine = sgl.Engine(**kw)
    started = time.time() - t
    runs = []
    try:
        for prompt in PROMPTS[:prompts]:
            ids = prompt_ids(tok, prompt)
            res = engine.generate(input_ids=ids, return_logprob=True, logprob_start_len=0, top_logprobs_num=TOP,
                                  sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True})
            meta = res["meta_info"]
            gen = res.get("output_ids") or [t[1] for t in meta["output_token_logprobs"]]
            runs.append({"ids": ids, "prompt_logprobs": [t[0] for t in meta["input_token_logprobs"]],
                         "output_ids": gen, "text": tok.decode(gen), "step_top": step_tops(meta["output_top_logprobs"])})
        info = engine.get_server_info()
    finally:
        engine.shutdown()
    args = {k: info.get(k) for k in ("dtype", "attention_backend", "kv_compress", "kv_compress_config", "page_size",
                                    "sampling_backend", "cuda_graph_config")}
    return {"engine": f"sglang {json.dumps(engine_kw)}", "server_args": args, "startup_s": round(started, 1),
            "runs": runs}


def step_tops(output_top_logprobs: list) -> list[dict[int, float]]:
    """SGLang's ``meta_info["output_top_logprobs"]`` (per output token, ``(log-prob,
    token id, text)`` of its top tokens) as the HF run keeps them: token id -> log-prob,
    so that ``compare`` finds the margin where any two runs part."""
    return [{int(token): float(lp) for lp, token, *_ in step} for step in output_top_logprobs]


def _dump_pass(dump: str) -> dict:
    files = sorted(glob.glob(os.path.join(dump, "*", "Pass*.pt")))
    if not files:
        raise FileNotFoundError(f"no Pass*.pt under {dump}")
    return torch.load(files[0], map_location="cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(b.shape[0], -1), b.float().reshape(b.shape[0], -1)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _attention(q, k, v, heads: int, kv_heads: int, d: int) -> torch.Tensor:
    """Causal GQA attention in float64: the arbiter for SGLang's attention kernel."""
    n = q.shape[0]
    q = q.double().view(n, heads, d).transpose(0, 1)
    k = k.double().view(n, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.double().view(n, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    s = q @ k.transpose(1, 2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)


def compare_modules(hf: dict[str, torch.Tensor], sgl: dict, heads: int, kv_heads: int, d: int) -> list[dict]:
    """Per layer, the relative error of each stage against HF (and of SGLang's attention
    against float64 attention on SGLang's own roped q, k and v)."""
    rows = []
    layer = 0
    while f"model.layers.{layer}.self_attn.o_proj" in hf:
        p = f"model.layers.{layer}."
        row: dict[str, float | int] = {"layer": layer}
        qkv = sgl.get(p + "self_attn.qkv_proj")
        if isinstance(qkv, torch.Tensor):
            ref = torch.cat([hf[p + "self_attn.q_proj"], hf[p + "self_attn.k_proj"], hf[p + "self_attn.v_proj"]], -1)
            row["qkv"] = _rel(qkv, ref)
        rope = sgl.get(p + "self_attn.rotary_emb")
        if isinstance(rope, list) and len(rope) == 2:
            row["rope_q"] = _rel(rope[0], hf[p + "self_attn.rope_q"])
            row["rope_k"] = _rel(rope[1], hf[p + "self_attn.rope_k"])
            if isinstance(qkv, torch.Tensor):
                v = qkv[:, (heads + kv_heads) * d:]
                ours = _attention(rope[0], rope[1], v, heads, kv_heads, d)
                if isinstance(sgl.get(p + "self_attn.attn"), torch.Tensor):
                    row["attn_kernel_vs_fp64"] = _rel(sgl[p + "self_attn.attn"], ours)
        for key, sgl_key, hf_key in (("attn", "self_attn.attn", "self_attn.o_proj.input"),
                                     ("o_proj", "self_attn.o_proj", "self_attn.o_proj"),
                                     ("down_proj", "mlp.down_proj", "mlp.down_proj")):
            if isinstance(sgl.get(p + sgl_key), torch.Tensor):
                row[key] = _rel(sgl[p + sgl_key], hf[p + hf_key])
        rows.append(row)
        layer += 1
    return rows


def compare(hf: dict, sgl: dict, dump: str | None) -> dict:
    prompts = []
    for a, b in zip(hf["runs"], sgl["runs"]):
        assert a["ids"] == b["ids"], "the two runs tokenized a prompt differently"
        diffs = [abs(x - y) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])]
        agree = next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y),
                     len(a["output_ids"]))
        gap = None
        if agree < len(a["output_ids"]) and a.get("step_top"):
            top = a["step_top"][agree]  # a's log-probs where b chose another token (an upper bound if off a's top k)
            gap = top[a["output_ids"][agree]] - top.get(b["output_ids"][agree], min(top.values()))
        prompts.append({"prompt_tokens": len(a["ids"]), "greedy_equal": a["output_ids"] == b["output_ids"],
                        "first_divergence": agree, "a_logprob_gap_at_divergence": gap,
                        "hf_text": a["text"], "sglang_text": b["text"],
                        "prompt_logprob_absdiff_max": max(diffs), "prompt_logprob_absdiff_mean": sum(diffs) / len(diffs)})
    out = {"a": hf["engine"], "b": sgl["engine"], "b_server_args": sgl.get("server_args"),
           "greedy_equal": sum(p["greedy_equal"] for p in prompts), "prompts_total": len(prompts), "prompts": prompts}
    if dump and hf.get("modules"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(hf["model"])
        out["modules"] = compare_modules(hf["modules"], _dump_pass(dump), cfg.num_attention_heads,
                                         cfg.num_key_value_heads, cfg.head_dim)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    h = sub.add_parser("hf")
    h.add_argument("--model", required=True)
    h.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    h.add_argument("--hooks", action="store_true")
    h.add_argument("--json", help="also write the texts and first-token top log-probs here")
    s = sub.add_parser("sglang")
    s.add_argument("--model", required=True)
    s.add_argument("--dump")
    s.add_argument("--engine", default="{}", help="JSON of extra sgl.Engine keyword arguments")
    s.add_argument("--prompts", type=int, default=len(PROMPTS), help="only the first N prompts (a dump writes every pass)")
    for p in (h, s):
        p.add_argument("--new", type=int, default=24)
        p.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--hf", required=True)
    c.add_argument("--sglang", required=True)
    c.add_argument("--dump")
    c.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if args.step == "hf":
        res = run_hf(args.model, args.dtype, args.new, args.hooks)
        res["model"] = args.model
        torch.save(res, args.out)
        if args.json:  # the greedy texts and each prompt's first-token margins, readable
            summary = {"engine": res["engine"], "command": " ".join(sys.argv),
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "prompts": [{k: r[k] for k in ("text", "first_token_top")} for r in res["runs"]]}
            json.dump(summary, open(args.json, "w"), indent=1)
    elif args.step == "sglang":
        torch.save(run_sglang(args.model, args.new, args.dump, json.loads(args.engine), args.prompts), args.out)
    else:
        res = compare(torch.load(args.hf, weights_only=False), torch.load(args.sglang, weights_only=False), args.dump)
        res["command"] = " ".join(sys.argv)
        json.dump(res, open(args.json, "w"), indent=1, default=str)
        print(json.dumps({k: res[k] for k in ("a", "b", "greedy_equal", "prompts_total")}))
        for p in res["prompts"]:
            print(f"  eq={p['greedy_equal']} div@{p['first_divergence']} lpdiff max {p['prompt_logprob_absdiff_max']:.3f} "
                  f"mean {p['prompt_logprob_absdiff_mean']:.3f} | {p['hf_text'][:40]!r} | {p['sglang_text'][:40]!r}")
        for r in res.get("modules", [])[:6] + res.get("modules", [])[-2:]:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
