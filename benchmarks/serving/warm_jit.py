"""Build, once per machine, the FlashInfer JIT modules a Llama-family SGLang server calls
on its first forward (layer norms, the gated activation, sampling), each in its own
process so that their ninja builds run side by side.

Why: on a fresh machine the first request builds them inside the scheduler (about a
minute each, measured on the H100: benchmarks/results/h100_seal_convoy_run), and a server
whose first forward builds kernels does not answer /health in time.

    python benchmarks/serving/warm_jit.py
"""

from __future__ import annotations

import subprocess
import sys
import time

OPS = {
    "rmsnorm": "from sgl_kernel import rmsnorm; rmsnorm(x, w)",
    "fused_add_rmsnorm": "from sgl_kernel import fused_add_rmsnorm; fused_add_rmsnorm(x, x.clone(), w)",
    "silu_and_mul": "from sgl_kernel import silu_and_mul; silu_and_mul(torch.cat([x, x], -1))",
    "sampling": ("import flashinfer.sampling as s; p = torch.softmax(x.float(), -1); "
                 "s.top_k_top_p_sampling_from_probs(p, torch.full((4,), 50, device='cuda', dtype=torch.int32), "
                 "torch.full((4,), 0.9, device='cuda'))"),
}
SETUP = ("import torch; x = torch.randn(4, 576, device='cuda', dtype=torch.bfloat16); "
         "w = torch.ones(576, device='cuda', dtype=torch.bfloat16); ")


def main() -> int:
    start = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, "-c", SETUP + code + "; torch.cuda.synchronize()"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, code in OPS.items()}
    failed = 0
    for name, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode:
            failed += 1
            print(f"warm_jit: {name} failed (the server will build it on its first forward): {err.strip()[-300:]}")
    print(f"warm_jit: {len(OPS) - failed}/{len(OPS)} modules ready in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
