"""Build a Llama-8B-shaped model with random weights, on the GPU machine, without a download.

Serving benchmarks need the 8B model's KV shape (32 layers, 8 KV heads of 128) and its
weight traffic, not its answers, and the machine cannot fetch weights. transformers gives
the config and the tensor names (from a model built on the meta device, so nothing is
initialised twice); each tensor is drawn on the GPU from its own seeded generator, so the
weights depend on the seed alone, and written as bf16 safetensors shards. The tokenizer
files come from the SmolLM2 folder, so the vocabulary is that tokenizer's.

    PYTHONPATH=/tmp/mkv/site python3 benchmarks/suite/make_random_model.py --out /tmp/mkv/models/llama8b-random

(with SGLang's own transformers, which reads the ``rope_parameters`` this config writes)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2 = "/tmp/mkv/models/smollm2-135m-instruct"
# Files of the tokenizer folder that describe a model rather than its tokenizer.
NOT_TOKENIZER = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.gguf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer-from", default=SMOLLM2, type=Path, help="folder whose tokenizer files and vocab_size are used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=131072)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--shard-gb", type=float, default=4.0)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> LlamaConfig:
    """The 8B shape with the tokenizer folder's vocabulary and special tokens."""
    source = json.loads((args.tokenizer_from / "config.json").read_text())
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=source["vocab_size"],
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def random_tensor(shape: torch.Size, index: int, seed: int, std: float, device: str) -> torch.Tensor:
    """Norm weights are ones (as a trained model's are near); matrices N(0, std), seeded per tensor."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16, device=device).mul_(std)


def write_weights(config: LlamaConfig, folder: Path, seed: int, device: str, shard_bytes: int) -> int:
    """Write ``model-XXXXX.safetensors`` shards and their index; returns the total bytes."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for index, (name, shape) in enumerate(shapes.items()):
        tensor = random_tensor(shape, index, seed, config.initializer_range, device)
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return total


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and not any(f.match(pattern) for pattern in NOT_TOKENIZER):
            shutil.copy2(f, folder / f.name)
            copied.append(f.name)
    return copied


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    config = make_config(args)
    # Built beside the target and renamed at the end: a half-written folder never has
    # the config.json that run_comparison.sh takes as "the model is there".
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = write_weights(config, tmp, args.seed, args.device, int(args.shard_gb * 2**30))
    t_weights = time.perf_counter() - t0
    copied = copy_tokenizer(args.tokenizer_from, tmp)
    config.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(
        f"random model: {args.out} ({total / 1e9:.2f} GB bf16, {config.num_hidden_layers} layers, "
        f"{config.num_key_value_heads} KV heads x {config.head_dim}, vocab {config.vocab_size}, seed {args.seed}); "
        f"tokenizer files {copied}; weights {t_weights:.1f} s, total {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
