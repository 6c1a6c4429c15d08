"""Which KV heads retrieve: a per-model profile, measured once, that policies can spend on.

A prefix shared through the radix cache is sealed before any question exists, so no
score from the prompt's own tail says which tokens a later question needs. Which heads
fetch far tokens, though, is a property of the model (retrieval heads, Wu et al. 2024;
DuoAttention, Xiao et al. 2024): measured on synthetic needle tasks, it holds for other
prompts. The profile is, per (layer, KV head), the attention mass the queries that
produce the answer put on the needle's tokens, averaged over tasks (max over the query
heads of a group).
"""

from __future__ import annotations

import torch

from mosaickv.parts import Observation


def needle_span(pieces: list[str], answer: str, max_tokens: int = 16) -> list[int]:
    """Token positions of the shortest run of ``pieces`` whose text contains ``answer``."""
    best: tuple[int, int] | None = None
    for i in range(len(pieces)):
        text = ""
        for j in range(i, min(i + max_tokens, len(pieces))):
            text += pieces[j]
            if answer in text:
                if best is None or j - i < best[1] - best[0]:
                    best = (i, j)
                break
    if best is None:
        raise ValueError(f"answer {answer!r} not found in the context's tokens")
    return list(range(best[0], best[1] + 1))


def needle_mass(observations: list[Observation], prompt_len: int, needle: list[int]) -> torch.Tensor:
    """[L, Hkv]: mean over the answer's queries of the attention mass on ``needle``.

    ``observations`` come from a prefill of prompt + answer; the queries at positions
    ``prompt_len - 1 ...`` predict the answer tokens, and attend over the prompt alone.
    """
    rows = []
    for obs in observations:
        hkv, group = obs.num_kv_heads, obs.group
        q = obs.queries[:, prompt_len - 1 : -1].float()  # [Hq, A, d]
        k = obs.keys[:, :prompt_len].float().repeat_interleave(group, dim=0)  # [Hq, P, d]
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        mass = attn[:, :, needle].sum(-1).mean(-1)  # [Hq]
        rows.append(mass.view(hkv, group).amax(-1))
    return torch.stack(rows)


def retrieval_profile(runner, tokenizer, tasks, progress: bool = True) -> torch.Tensor:
    """[L, Hkv] needle mass averaged over ``tasks`` (their first answer is teacher-forced)."""
    from tqdm import tqdm

    from mosaickv.retrieval import render

    total = None
    for task in tqdm(tasks, desc="mosaickv heads", disable=not progress):
        prompt = render(task, tokenizer)
        answer = torch.tensor(tokenizer(task.answers[0], add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids = torch.cat([prompt.ids, answer])
        observations, _ = runner.observe(ids)
        pieces = [tokenizer.decode([int(t)]) for t in prompt.before]
        mass = needle_mass(observations, prompt.ids.numel(), needle_span(pieces, task.answers[0]))
        total = mass if total is None else total + mass
    if total is None:
        raise ValueError("no tasks to measure the retrieval heads on")
    return total / len(tasks)
