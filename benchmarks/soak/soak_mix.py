"""The soak's request mix: deterministic in its seed, with fixed counts of every kind.

Counts are fixed (rounded shares), not sampled, so that every kind is present in every
run, small fault runs included, and an invariant such as "zero 5xx among the aborted
streams" is never vacuously true.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common lowercase words: one BPE token each after a space, so words ~ tokens.
VOCAB = tuple("""
the of and to in is was for on that with as by at from his her they this which but not are
had have one all were when there can an been has more who will into time only new some
would them other than then its two first also after over way may did many most where any
just such made through long these well year both work under last day house world state
water city school field point group right part place case small large number order hand
light river road paper music table story north south early stone cloud garden market
window letter bridge forest island valley summer winter morning evening engine signal
""".split())

# Shares of the requested count; the rest is "short" requests (probes come on top of the
# shares, out of the rest).
SHARES = {"shared": 0.36, "unique": 0.20, "abort": 0.10, "over_context": 0.02, "empty": 0.02,
          "max_tokens_0": 0.02}
EDGE_KINDS = ("over_context", "empty", "max_tokens_0")
PROBE_REPEATS = 2  # sends of each probe inside the loaded mix

# What SGLang 0.5.17 answers the edge requests, whatever the KV cache: every case but the
# two 200s is refused before the scheduler (so --kv-compress none answers the same).
EXPECTED_STATUS = {
    ("over_context", "completions"): 400,  # TokenizerManager._validate_one_request (ValueError)
    ("over_context", "chat"): 400,
    ("empty", "completions"): 400,  # OpenAIServingCompletion._validate_request: "Prompt cannot be empty"
    ("empty", "chat"): 200,  # the chat template alone is a prompt
    ("max_tokens_0", "completions"): 400,  # CompletionRequest.validate_max_tokens_positive
    ("max_tokens_0", "chat"): 200,  # max_new_tokens 0: prefill only, an empty answer
}


@dataclass(frozen=True)
class MixConfig:
    """Sizes of the mix. Outputs and prompts are short: the mosaickv backend still loops
    over requests and layers in Python (about 50 ms per request and decode step, 2k prompt
    tokens/s on the H100), and 2,000 requests must fit in a few minutes. Their prompts
    still add up to several times the soak's capped pool, so the radix cache must evict."""

    requests: int = 2000
    seed: int = 0
    model: str = "default"
    group_size: int = 6  # questions per shared system prompt
    system_words: tuple[int, int] = (150, 400)
    unique_words: tuple[int, int] = (100, 500)
    short_words: tuple[int, int] = (4, 40)
    abort_words: tuple[int, int] = (20, 200)
    over_context_words: int = 10_000  # > 8192 tokens, SmolLM2's context
    max_tokens: tuple[int, int] = (1, 3)
    abort_max_tokens: int = 16  # with ignore_eos: the stream is still running when it is cut
    abort_after: tuple[int, int] = (1, 3)  # stream events read before closing the connection
    probes: int = 6  # half short (never sealed), half long (sealed once cached)
    probe_words: int = 600
    probe_max_tokens: int = 12
    stream_share: float = 0.4
    logprobs_share: float = 0.3
    n_share: float = 0.05  # n = 2, sampled


@dataclass(frozen=True)
class Req:
    """One request: where it goes, its JSON body, and how the client treats it."""

    index: int
    kind: str  # shared, unique, short, abort, probe or one of EDGE_KINDS
    endpoint: str  # "completions" or "chat"
    body: dict
    abort_after: int = 0  # close the stream after this many events (0: read it to the end)
    group: int = -1  # shared system prompt id
    probe: int = -1  # probe id

    @property
    def path(self) -> str:
        return "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def kind_counts(requests: int, probe_sends: int) -> dict[str, int]:
    """Exact count per kind: rounded shares, then probe sends, then short requests."""
    counts = {kind: round(share * requests) for kind, share in SHARES.items()}
    rest = requests - sum(counts.values())
    counts["probe"] = min(probe_sends, max(rest, 0))
    counts["short"] = max(rest - counts["probe"], 0)
    return counts


def probe_prompts(cfg: MixConfig) -> list[str]:
    """Fixed greedy probes, independent of the request count: short ones (prompt and
    output under sink + window + one segment: never sealed, so only batch composition can
    change them) alternate with long ones (their prefix is sealed once cached)."""
    rng = random.Random(cfg.seed * 7919 + 1)
    out = []
    for j in range(cfg.probes):
        n = 12 if j % 2 == 0 else cfg.probe_words
        out.append(f"Probe {j}. Notes: {words(rng, n)}.\nThe next line of the notes reads:")
    return out


def system_prompt(cfg: MixConfig, group: int) -> str:
    rng = random.Random(cfg.seed * 104729 + group)
    return (f"You are archive assistant {group}. Answer from these reference notes only.\n"
            f"Notes: {words(rng, rng.randint(*cfg.system_words))}.")


def _messages(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _body(endpoint: str, system: str | None, user: str, model: str, max_tokens: int) -> dict:
    if endpoint == "chat":
        return {"model": model, "messages": _messages(system, user), "max_tokens": max_tokens, "temperature": 0.0}
    prompt = f"{system}\n\n{user}\nAnswer:" if system else user
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}


def _options(body: dict, endpoint: str, rng: random.Random, cfg: MixConfig) -> dict:
    """Streaming, logprobs and n > 1 on a share of the ordinary requests."""
    if rng.random() < cfg.stream_share:
        body.update(stream=True, stream_options={"include_usage": True})
    elif rng.random() < cfg.n_share / (1 - cfg.stream_share):
        body.update(n=2, temperature=0.8, top_p=0.95)
    if rng.random() < cfg.logprobs_share:
        body.update({"logprobs": 3} if endpoint == "completions" else {"logprobs": True, "top_logprobs": 3})
    return body


def build_mix(cfg: MixConfig) -> list[Req]:
    """The loaded phase's requests in sending order (probes inside, at shuffled places)."""
    rng = random.Random(cfg.seed)
    probes = probe_prompts(cfg)
    counts = kind_counts(cfg.requests, len(probes) * PROBE_REPEATS)
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    rng.shuffle(kinds)
    seen = dict.fromkeys(counts, 0)
    out = []
    for index, kind in enumerate(kinds):
        nth = seen[kind]
        seen[kind] += 1
        # Edge kinds alternate endpoints so that both are always covered.
        endpoint = ("completions", "chat")[nth % 2] if kind in EDGE_KINDS else rng.choice(("completions", "chat"))
        max_tokens = rng.randint(*cfg.max_tokens)
        group = probe = -1
        abort_after = 0
        if kind == "shared":
            group = nth // cfg.group_size
            body = _body(endpoint, system_prompt(cfg, group), f"Question {nth}: what do the notes say about "
                         f"{rng.choice(VOCAB)}?", cfg.model, max_tokens)
            body = _options(body, endpoint, rng, cfg)
        elif kind == "unique":
            text = f"Record {cfg.seed}-{index}: {words(rng, rng.randint(*cfg.unique_words))}.\nSummarize the record:"
            body = _options(_body(endpoint, None, text, cfg.model, max_tokens), endpoint, rng, cfg)
        elif kind == "short":
            text = f"Item {index}: {words(rng, rng.randint(*cfg.short_words))}?"
            body = _options(_body(endpoint, None, text, cfg.model, max_tokens), endpoint, rng, cfg)
        elif kind == "abort":
            text = f"Story {cfg.seed}-{index}: {words(rng, rng.randint(*cfg.abort_words))}"
            body = _body(endpoint, None, text, cfg.model, cfg.abort_max_tokens)
            body.update(stream=True, ignore_eos=True)
            abort_after = rng.randint(*cfg.abort_after)
        elif kind == "probe":
            probe = nth % len(probes)
            endpoint = "completions"
            body = probe_body(probes[probe], cfg)
        elif kind == "over_context":
            text = f"Overlong {index}: {words(rng, cfg.over_context_words)}"
            body = _body(endpoint, None, text, cfg.model, 4)
        elif kind == "empty":
            body = _body(endpoint, None, "", cfg.model, 4)
        else:  # max_tokens_0
            body = _body(endpoint, None, f"Zero {index}: {words(rng, 8)}", cfg.model, 0)
        out.append(Req(index, kind, endpoint, body, abort_after, group, probe))
    return out


def probe_body(prompt: str, cfg: MixConfig) -> dict:
    """Greedy completion whose logprobs carry the output token by token."""
    return {"model": cfg.model, "prompt": prompt, "max_tokens": cfg.probe_max_tokens, "temperature": 0.0,
            "logprobs": 1}
