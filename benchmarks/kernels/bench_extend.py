"""Extend benchmark: a prefill chunk's dense part in our mixed-format kernel vs SGLang's.

Since the extend split (``sglang_patch.attention.extend_attention``) a prefill's dense
rows and new tokens go to SGLang's Triton extend kernel, the one ``--attention-backend
triton`` runs for ``none``, and only its sealed blocks to the mixed-format kernels. This
measures the part that moved, side by side in one run: ``nq`` new tokens attending
causally to themselves after a dense prefix of ``P`` tokens, through

* ``ours``: :class:`~mosaickv.kernels.extend.MixedExtendWrapper` with the server's extend
  tiles and one item per (row block, KV head) (``WHOLE_RUNS``, as ``plan_forward`` cuts
  an extend), and
* ``sglang``: ``extend_attention_fwd`` with its log-sum-exp (what the split calls).

Both outputs are checked against each other before timing. Medians (``do_bench``) on a
GPU; on the CPU (``--smoke``, Triton interpreter) one timed run of a tiny shape, for tests.

    python benchmarks/kernels/bench_extend.py --json OUT.json [--chunk 8192] [--prefix 0 8192 24576]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.kernels.extend import MixedExtendWrapper
from mosaickv.reference import CompressedLayer
from mosaickv.sglang_patch.attention import EXTEND_TUNING
from mosaickv.sglang_patch.forward_inputs import WHOLE_RUNS

patch_interpreter()


def median_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")) * 1e-3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(prefix: int, nq: int, hq: int, hkv: int, d: int, device: torch.device) -> dict:
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    g = torch.Generator(device="cpu").manual_seed(prefix + nq)
    t = prefix + nq
    k, v = (torch.randn(t, hkv, d, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q = torch.randn(nq, hq, d, generator=g).to(device, torch.bfloat16)
    scale = 1 / math.sqrt(d)

    ours = MixedExtendWrapper(EXTEND_TUNING.block_m, EXTEND_TUNING.block_n)
    ours.plan([CompressedLayer()], [k.transpose(0, 1).contiguous()], [v.transpose(0, 1).contiguous()], [nq], hq, hkv,
              d, device, scale, chunk_tokens=WHOLE_RUNS)
    out_ours = ours.run(q)

    qo_indptr = torch.tensor([0, nq], dtype=torch.int32, device=device)
    kv_indptr = torch.tensor([0, prefix], dtype=torch.int32, device=device)
    kv_indices = torch.arange(prefix, dtype=torch.int64, device=device)
    out_sglang = torch.empty(nq, hq, d, dtype=torch.float32, device=device)
    lse = torch.empty(nq, hq, dtype=torch.float32, device=device)

    def sglang() -> None:
        extend_attention_fwd(q, k[prefix:], v[prefix:], out_sglang, k, v, qo_indptr, kv_indptr, kv_indices, None, True,
                             None, nq, 1.0, 1.0, sm_scale=scale, lse_extend=lse)

    sglang()
    torch.testing.assert_close(out_ours.float(), out_sglang, atol=2e-2, rtol=2e-2,
                               msg=lambda m: f"P={prefix} nq={nq}: the two kernels differ. {m}")
    err = (out_ours.float() - out_sglang).abs().max().item()
    s_ours, s_sglang = median_s(lambda: ours.run(q), device), median_s(sglang, device)
    flops = 4 * nq * hq * d * (prefix + (nq + 1) / 2)  # causal: each query sees the prefix and half the chunk
    return {"prefix": prefix, "chunk": nq, "heads": f"{hq}/{hkv}", "head_dim": d, "max_abs_diff": err,
            "ours_ms": round(s_ours * 1e3, 3), "sglang_ms": round(s_sglang * 1e3, 3),
            "ours_tflops": round(flops / s_ours / 1e12, 1), "sglang_tflops": round(flops / s_sglang / 1e12, 1),
            "sglang_speedup": round(s_ours / s_sglang, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=8192, help="new tokens (SGLang's default chunked prefill size)")
    ap.add_argument("--prefix", type=int, nargs="+", default=[0, 8192, 24576], help="dense prefix tokens before them")
    ap.add_argument("--heads", default="32/8", help="query/KV heads (the 8B shape)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (Triton interpreter)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    hq, hkv = (int(x) for x in args.heads.split("/"))
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke runs the kernels under TRITON_INTERPRET=1")
        device, args.chunk, args.prefix = torch.device("cpu"), 40, [0, 37]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("the benchmark needs a GPU (or --smoke under TRITON_INTERPRET=1)")
    rows = []
    for prefix in args.prefix:
        rows.append(row(prefix, args.chunk, hq, hkv, args.head_dim, device))
        print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    result = {"command": "python benchmarks/kernels/bench_extend.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
