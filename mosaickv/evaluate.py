"""Offline fidelity: next-token KL and top-1 agreement of a compressed cache against dense.

Each of a few long texts is split into a context, which is prefilled once and compressed
by every policy at every ratio, and a continuation, which is teacher-forced over each compressed
cache and over the dense (bf16) cache; the continuation's next-token distributions are
compared. The text is built from docstrings of Python's standard library, shipped with
the package (``mosaickv/data/corpus.json.gz``), so it is natural prose and code, the same
on every machine, and needs no download.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from mosaickv.compressor import CompressedCache, Compressor
from mosaickv.config import load_policy
from mosaickv.errors import PolicyError
from mosaickv.reference import CompressedLayer

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.json.gz"  # scripts/make_corpus.py writes it


@lru_cache(maxsize=1)
def _docstrings() -> tuple[str, ...]:
    return tuple(json.loads(gzip.decompress(CORPUS.read_bytes()))["docstrings"])


def corpus_text(min_chars: int) -> str:
    """The shipped corpus's docstrings (standard-library modules and their public members,
    in a fixed order), as many as reach ``min_chars``: the same text on every machine."""
    parts: list[str] = []
    size = 0
    for doc in _docstrings():
        parts.append(doc)
        size += len(doc)
        if size >= min_chars:
            break
    return "\n\n".join(parts)


def corpus_ids(tokenizer, tokens: int, samples: int = 1) -> list[torch.Tensor]:
    """``samples`` disjoint runs of ``tokens`` tokens from the built-in corpus."""
    text = corpus_text(tokens * samples * 6)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens * samples:
        raise ValueError(f"the built-in corpus has {ids.numel()} tokens, fewer than the {tokens} x {samples} asked for")
    return [ids[i * tokens : (i + 1) * tokens] for i in range(samples)]


def dense_cache(observations) -> CompressedCache:
    """The uncompressed (bf16) cache of a span, in the same shape the compressed ones have."""
    return CompressedCache(
        layers=[CompressedLayer() for _ in observations],
        tail_k=[o.keys.to(torch.bfloat16) for o in observations],
        tail_v=[o.values.to(torch.bfloat16) for o in observations],
        num_tokens=observations[0].keys.shape[1],
        head_dim=observations[0].keys.shape[2],
    )


@dataclass
class FidelityRow:
    policy: str
    target_ratio: float
    ratio: float | None = None
    bytes_per_token: float | None = None
    kl: float | None = None
    top1: float | None = None
    kl_per_sample: list[float] | None = None
    seconds: float | None = None
    formats: dict | None = None
    error: str | None = None


def compare(dense_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(dense || compressed) in nats and top-1 agreement over positions."""
    p = torch.log_softmax(dense_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (dense_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return kl, top1


def evaluate_fidelity(
    runner,
    samples: list[torch.Tensor],
    policies: list[str],
    ratios: list[float],
    continuation: int = 64,
    scope: str = "group",
    progress: bool = True,
) -> dict:
    """Every policy at every ratio, averaged over texts: each one's context is prefilled
    once, then every compressed cache is read by its last ``continuation`` tokens."""
    prepared = []
    for ids in samples:
        context, future = ids[:-continuation], ids[-continuation:]
        observations, _ = runner.observe(context)
        dense = dense_cache(observations)
        prepared.append((observations, future, runner.feed(dense, future)[0]))
    rows: list[FidelityRow] = []
    jobs = [(p, r) for p in policies for r in ratios]
    for name, ratio in tqdm(jobs, desc="mosaickv eval", disable=not progress):
        row = FidelityRow(policy=name, target_ratio=ratio)
        start = time.perf_counter()
        try:
            policy = load_policy(name, ratio=ratio)
            kls, top1s, nbytes, formats = [], [], 0, {}
            for observations, future, dense_logits in prepared:
                cache = Compressor(policy, runner.head_dim).compress(observations, scope=scope)
                kl, top1 = compare(dense_logits, runner.feed(cache, future)[0])
                kls.append(kl)
                top1s.append(top1)
                nbytes += cache.nbytes()
                for fmt, count in cache.formats().items():
                    formats[fmt] = formats.get(fmt, 0) + count
            row.kl, row.top1, row.kl_per_sample = sum(kls) / len(kls), sum(top1s) / len(top1s), kls
            row.ratio = dense.dense_nbytes() * len(prepared) / nbytes
            row.bytes_per_token = nbytes / (dense.num_tokens * len(prepared))
            row.formats = dict(sorted(formats.items(), key=lambda kv: -kv[1])[:8])
        except PolicyError as err:
            row.error = str(err)
        row.seconds = round(time.perf_counter() - start, 2)
        rows.append(row)
    return {
        "context_tokens": int(samples[0].numel() - continuation),
        "continuation_tokens": continuation,
        "samples": len(samples),
        "scope": scope,
        "dense_bytes_per_token": dense.nbytes() / dense.num_tokens,
        "rows": [asdict(r) for r in rows],
    }


def plot_fidelity(result: dict, path: str) -> None:
    """KL and top-1 agreement against bytes per token, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_top) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = result["dense_bytes_per_token"]
    policies = sorted({r["policy"] for r in result["rows"]})
    for name in policies:
        rows = sorted((r for r in result["rows"] if r["policy"] == name and r["error"] is None), key=lambda r: r["bytes_per_token"])
        if not rows:
            continue
        x = [r["bytes_per_token"] for r in rows]
        ax_kl.plot(x, [max(r["kl"], 1e-6) for r in rows], marker="o", label=name)
        ax_top.plot(x, [r["top1"] for r in rows], marker="o", label=name)
    for ax in (ax_kl, ax_top):
        ax.axvline(dense, color="grey", linestyle=":", label="dense bf16")
        ax.set_xlabel("KV bytes per token (all layers)")
        ax.grid(alpha=0.3)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("next-token KL vs dense (nats)")
    ax_top.set_ylabel("top-1 agreement with dense")
    ax_top.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {result['context_tokens']}-token contexts x {result['samples']}, {result['scope']} scope")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
