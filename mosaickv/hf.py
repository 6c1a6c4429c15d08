"""Run a Hugging Face transformers model over a MosaicKV-compressed cache.

One attention implementation, ``mosaickv``, serves two modes. While observing a prefill
it records each layer's queries (the scorers' input) and runs plain SDPA. While reading
a compressed cache, the HF cache holds only the dense tail (plus the tokens being fed),
and each layer attends to its sealed segments and that tail through the reference, so
what the model sees is exactly what a kernel over the same formats would compute.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mosaickv import reference
from mosaickv.compressor import CompressedCache
from mosaickv.parts import Observation

IMPLEMENTATION = "mosaickv"


@dataclass
class _Capture:
    queries: dict[int, torch.Tensor] = field(default_factory=dict)


_mode: ContextVar[_Capture | CompressedCache | None] = ContextVar("mosaickv_mode", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mode = _mode.get()
    if isinstance(mode, CompressedCache):
        if query.shape[0] != 1:
            raise ValueError(f"the compressed-cache path runs one sequence at a time, got a batch of {query.shape[0]}")
        out = reference.attention(query[0], mode.layers[module.layer_idx], key[0], value[0], scale=scaling)
        return out.to(query.dtype).transpose(0, 1)[None], None
    if isinstance(mode, _Capture):
        mode.queries[module.layer_idx] = query[0].detach()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def install(model) -> None:
    """Make ``model`` use the MosaicKV attention implementation (plain SDPA outside our modes)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(IMPLEMENTATION)


@contextmanager
def _using(mode: _Capture | CompressedCache) -> Iterator[None]:
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


class Runner:
    """A model with MosaicKV attention: observe a prefill, then read compressed caches."""

    def __init__(self, model) -> None:
        install(model)
        self.model = model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @torch.no_grad()
    def observe(self, ids: torch.Tensor) -> tuple[list[Observation], torch.Tensor]:
        """Prefill ``ids`` [T]; per layer the cached K/V and the queries, and the logits [T, V]."""
        from transformers import DynamicCache

        capture = _Capture()
        cache = DynamicCache()
        with _using(capture):
            out = self.model(input_ids=ids[None], past_key_values=cache, use_cache=True)
        obs = [
            Observation(keys=cache.layers[i].keys[0].float(), values=cache.layers[i].values[0].float(), queries=capture.queries[i].float())
            for i in range(self.num_layers)
        ]
        return obs, out.logits[0].float()

    @torch.no_grad()
    def feed(self, compressed: CompressedCache, ids: torch.Tensor) -> tuple[torch.Tensor, "object"]:
        """Feed ``ids`` [n] after the compressed span; returns logits [n, V] and the HF cache."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(compressed.tail_k[i][None].float(), compressed.tail_v[i][None].float(), i)
        return self._step(compressed, cache, ids, compressed.num_tokens)

    def _step(self, compressed: CompressedCache, cache, ids: torch.Tensor, start: int):
        positions = torch.arange(start, start + ids.numel())[None]
        with _using(compressed):
            out = self.model(input_ids=ids[None], position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits[0].float(), cache

    @torch.no_grad()
    def generate(self, compressed: CompressedCache, ids: torch.Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
        """Greedy answer to ``ids`` (fed uncompressed after the compressed span)."""
        logits, cache = self.feed(compressed, ids)
        pos = compressed.num_tokens + ids.numel()
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[-1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            logits, cache = self._step(compressed, cache, torch.tensor([nxt]), pos)
            pos += 1
        return out
