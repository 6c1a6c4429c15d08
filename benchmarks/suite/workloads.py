"""The serving suite's models, workloads and per-method server flags, in one table.

run_comparison.sh asks this module for shell words (``plan``, ``flags``) so that every
method of a comparison gets the same launch flags but the compression ones, and the same
bench_serving arguments; report.py names the goal's workloads from the same names.

Prompts: ``random-ids`` with ``--tokenize-prompt``, not ``random``: bench_serving's
``random`` cuts prompts out of ShareGPT, which it downloads, and the GPU machine has no
network; ``random-ids`` sends exactly ``--random-input-len`` token ids per prompt.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

SUITE = Path(__file__).resolve().parent
MODELS_DIR = os.environ.get("MKV_MODELS", "/tmp/mkv/models")  # where ../shared/device/stage.sh puts SmolLM2


@dataclass(frozen=True)
class Model:
    path: str
    context: int  # the model's own max_position_embeddings
    mem_fraction: float  # --mem-fraction-static: weights + KV pool
    build: str = ""  # command that creates ``path`` when it is missing


@dataclass(frozen=True)
class Workload:
    """``random``: ``input_len`` prompt tokens each; ``gsp``: ``input_len`` shared system-prompt tokens."""

    kind: str
    input_len: int
    prompts: dict[str, int]  # default --num-prompts per model; a model not named cannot run it
    output_len: int = 256
    max_concurrency: int | None = None  # set: equal batch for every method
    groups: int = 0  # gsp: groups of prompts sharing one system prompt
    question_len: int = 0
    margin: int = 64  # context beyond input + output (gsp prompts are decoded random tokens: re-encoded, they grow)
    # --cuda-graph-max-bs for every method: a decode batch above SGLang's default largest
    # graph (256 on an H200) runs eager, which the ninth run's gsp rows (512 requests) did.
    graph_batch: int | None = None


MODELS = {
    # 135M weights: a small static fraction keeps the prompt count needed to fill the pool low.
    "smollm2": Model(f"{MODELS_DIR}/smollm2-135m-instruct", 8192, 0.15),
    # 15 GB of weights; 0.85 of 80 GB leaves ~50 GB of KV (~390k dense bf16 tokens).
    "llama8b-random": Model(
        f"{MODELS_DIR}/llama8b-random",
        131072,
        0.85,
        build=f"python3 {SUITE}/make_random_model.py --out {MODELS_DIR}/llama8b-random",
    ),
    # For --tp 2 (the plugin issue): 8 KV heads split 4 and 4, where SmolLM2's 3 cannot be.
    "llama-tp-small": Model(
        f"{MODELS_DIR}/llama-tp-small",
        16384,
        0.5,
        build=f"python3 {SUITE}/make_random_model.py --out {MODELS_DIR}/llama-tp-small --layers 8 --hidden 2048 "
        "--intermediate 5632 --heads 16 --kv-heads 8 --head-dim 128 --max-positions 16384",
    ),
}

# Prompt counts exceed the estimated concurrency of the method that holds the most, where
# the call's time allows, so that admission is bounded by KV memory (report.py marks the
# rows where it was bounded by the prompt count instead).
WORKLOADS = {
    "random8k": Workload("random", 8192, {"smollm2": 240, "llama8b-random": 160}),
    "random32k": Workload("random", 32768, {"llama8b-random": 48}),
    "random32k_eq": Workload("random", 32768, {"llama8b-random": 16}, max_concurrency=8),
    "random64k": Workload("random", 65536, {"llama8b-random": 24}),
    "gsp": Workload(
        "gsp", 4096, {"smollm2": 512, "llama8b-random": 512}, groups=32, question_len=256, margin=2048,
        graph_batch=512,
    ),
    # A short agent workload for a check of one setting (--tp 2), not a figure of the goal.
    "gsp_small": Workload(
        "gsp", 1024, {"smollm2": 64, "llama-tp-small": 64}, output_len=64, groups=8, question_len=128, margin=512
    ),
}

METHODS = {
    # The staged sgl-kernel has no fa3; triton attention with CUDA graphs works there.
    "none": ["--attention-backend", "triton"],
    "fp8": ["--attention-backend", "triton", "--kv-cache-dtype", "fp8_e4m3"],
    "mosaic3": ["--kv-compress", "mosaickv", "--kv-compress-config", "mosaic"],
    "mosaic6": ["--kv-compress", "mosaickv", "--kv-compress-config", str(SUITE / "mosaic6.yaml")],
    # mosaic3 without low-rank options: an 8B-shaped sealing call of 32 seals 2.35x faster in
    # 3.3x less workspace (twentieth run, h200_2026-12-02c); its server seals 128 a call.
    "mosaic3_nolr": ["--kv-compress", "mosaickv", "--kv-compress-config",
                     str(SUITE.parent / "sealing" / "mosaic_no_lowrank.yaml")],
}

# Greedy requests never reach the sampling kernels; pytorch spares a FlashInfer JIT at start.
COMMON_FLAGS = ["--sampling-backend", "pytorch"]


def input_len(workload: Workload, model: Model) -> int:
    """A random prompt shortened to the model's context where it must be (SmolLM2: 7936 + 256 = 8192)."""
    return min(workload.input_len, model.context - workload.output_len) if workload.kind == "random" else workload.input_len


def check(model_name: str, workload_name: str) -> tuple[Model, Workload]:
    if model_name not in MODELS:
        raise SystemExit(f"unknown MODEL {model_name!r}: one of {sorted(MODELS)}")
    if workload_name not in WORKLOADS:
        raise SystemExit(f"unknown WORKLOAD {workload_name!r}: one of {list(WORKLOADS)}")
    model, workload = MODELS[model_name], WORKLOADS[workload_name]
    if model_name not in workload.prompts:
        raise SystemExit(f"{workload_name} is not run on {model_name} (its context is {model.context})")
    return model, workload


def server_flags(model: Model, workload: Workload, mem_fraction: float, extra: list[str]) -> list[str]:
    """Launch flags every method shares; --context-length only where it is below the model's own."""
    flags = ["--model-path", model.path, "--mem-fraction-static", str(mem_fraction), *COMMON_FLAGS]
    need = input_len(workload, model) + workload.output_len + workload.margin
    if workload.kind == "gsp":
        need += workload.question_len
    if need < model.context:
        flags += ["--context-length", str(need)]
    if workload.graph_batch:
        flags += ["--cuda-graph-max-bs", str(workload.graph_batch)]
    return flags + extra


def bench_args(model: Model, workload: Workload, num_prompts: int) -> list[str]:
    args = ["--backend", "sglang", "--model", model.path, "--seed", "42", "--disable-tqdm"]
    if workload.kind == "random":
        args += ["--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len", str(input_len(workload, model)),
                 "--random-output-len", str(workload.output_len), "--random-range-ratio", "1.0", "--num-prompts", str(num_prompts)]
    else:
        args += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(workload.groups),
                 "--gsp-prompts-per-group", str(max(1, num_prompts // workload.groups)),
                 "--gsp-system-prompt-len", str(workload.input_len), "--gsp-question-len", str(workload.question_len),
                 "--gsp-output-len", str(workload.output_len)]
    if workload.max_concurrency:
        args += ["--max-concurrency", str(workload.max_concurrency)]
    return args


def words(args: list[str]) -> str:
    """Space-joined for bash's unquoted ``$BASE`` / ``$BENCH_ARGS``, so no argument may hold a space."""
    for a in args:
        if not a or any(c.isspace() or c in "'\"\\$`" for c in a):
            raise SystemExit(f"argument {a!r} cannot pass through an unquoted shell variable")
    return " ".join(args)


def plan(model_name: str, workload_name: str, num_prompts: str = "", mem_fraction: str = "", extra: str = "",
         mosaic_extra: str = "") -> str:
    """Shell assignments for run_comparison.sh (``eval``-ed there). ``mosaic_extra``: launch
    flags of the mosaic methods alone (:func:`method_flags`); part of the settings' tag."""
    model, workload = check(model_name, workload_name)
    n = int(num_prompts) if num_prompts else workload.prompts[model_name]
    base = server_flags(model, workload, float(mem_fraction) if mem_fraction else model.mem_fraction, shlex.split(extra))
    bench = bench_args(model, workload, n)
    if workload.kind == "gsp":
        n = workload.groups * max(1, n // workload.groups)
    # Results of one setting never mix with another's in the machine's state folder.
    digest = hashlib.sha1(" ".join(base + bench + shlex.split(mosaic_extra)).encode()).hexdigest()[:8]
    values = {
        "MODEL_PATH": model.path,
        "BUILD": model.build,
        "BASE": words(base),
        "BENCH_ARGS": words(bench),
        "NUM_PROMPTS": str(n),
        "MAX_CONCURRENCY": str(workload.max_concurrency or ""),
        "INPUT_LEN": str(input_len(workload, model)),
        "OUTPUT_LEN": str(workload.output_len),
        "TAG": f"{model_name}__{workload_name}__{digest}",
    }
    return "\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


def method_flags(method: str, mosaic_extra: str = "") -> list[str]:
    """A method's launch flags; the mosaic methods' with ``mosaic_extra`` after them
    (e.g. ``--kv-compress-sealing device``, which ``none`` and FP8 would refuse)."""
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}: one of {list(METHODS)}")
    return METHODS[method] + (shlex.split(mosaic_extra) if method.startswith("mosaic") else [])


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "plan":
        print(plan(*argv[1:7]))
    elif len(argv) in (2, 3) and argv[0] == "flags":
        print(words(method_flags(*argv[1:3])))
    else:
        raise SystemExit("usage: workloads.py plan MODEL WORKLOAD [N] [MEM_FRACTION] [EXTRA_FLAGS] [MOSAIC_FLAGS] | "
                         "flags METHOD [MOSAIC_FLAGS]")


if __name__ == "__main__":
    main(sys.argv[1:])
