"""The ``--kv-compress`` flags and the startup refusals.

SGLang builds its CLI from the ``ServerArgs`` dataclass fields, and ``sgl.Engine(**kw)``
passes keyword arguments straight to it, so the flags are two annotated fields on a
dataclass subclass that the plugin puts in place of ``ServerArgs``. Every check runs
in ``__post_init__``, which runs in the launcher process (CLI and ``Engine`` alike),
so an unsupported combination fails before any worker starts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from sglang.srt.arg_groups.arg_utils import NS, A, Arg
from sglang.srt.server_args import ServerArgs

KV_COMPRESS_CHOICES = ["none", "mosaickv"]
ATTENTION_CHOICES = ["triton", "sdpa"]
SEALING_CHOICES = ["processes", "device", "device-thread"]
DEVICE_SEALING = ("device", "device-thread")  # sealing where the pool is: no worker processes
BACKEND_NAME = "mosaickv"
DEFAULT_POLICY = "mosaic"
# KV cache dtypes the segment formats store without a second rounding (values are bf16).
BF16_KV_DTYPES = ("auto", "bf16", "bfloat16")

logger = logging.getLogger(__name__)


class KVCompressError(ValueError):
    """A flag or model that ``--kv-compress mosaickv`` cannot serve; one sentence."""


@dataclasses.dataclass
class MosaicServerArgs(ServerArgs):
    """``ServerArgs`` plus the two MosaicKV fields; with ``kv_compress="none"`` it is inert."""

    kv_compress: A[
        str,
        Arg(help="KV-cache compression: 'none' (default) or 'mosaickv' (2-D token and channel compression).",
            choices=KV_COMPRESS_CHOICES),
        NS("memory"),
    ] = "none"
    kv_compress_config: A[
        Optional[str],
        "MosaicKV policy: a preset name (mosaic, mosaic_heads, snapkv, think, streaming, uniform2d, keynorm, lossless) or a .yaml/.json path.",
        NS("memory"),
    ] = None
    kv_compress_workers: A[
        Optional[int],
        "MosaicKV sealing processes (host CPU, off the scheduler's critical path); default a quarter of the CPUs, 1 to 4.",
        NS("memory"),
    ] = None
    kv_compress_attention: A[
        Optional[str],
        Arg(help="MosaicKV attention: 'triton' (default; mixed-format kernels) or 'sdpa' (PyTorch reference, slow).",
            choices=ATTENTION_CHOICES),
        NS("memory"),
    ] = None
    kv_compress_sealing: A[
        Optional[str],
        Arg(help="MosaicKV sealing: 'processes' (default; host worker processes beside the scheduler), 'device' "
                 "(inline on the GPU at insert, 32 segments per call; for large models and long prompts, which host "
                 "processes cannot seal as fast as prefill makes them) or 'device-thread' (as 'device', on a thread "
                 "beside the scheduler, which goes on launching forwards meanwhile; on an H200's 8B-shaped 8k "
                 "prompts it served what 'device' did: the two did not overlap).",
            choices=SEALING_CHOICES),
        NS("memory"),
    ] = None
    kv_compress_seal_batch: A[
        Optional[int],
        "MosaicKV with --kv-compress-sealing device: segments per sealing call (default: 32 for an 8B-shaped "
        "model, more for smaller ones in the same workspace, up to 256; four times that for a policy without low-rank "
        "options, which needs about a quarter of the workspace a segment). Larger calls seal faster and take more "
        "GPU workspace outside the KV pool: on an H200, 8B-shaped segments, 32 a call sealed 863/s in 4.4 GiB, "
        "64 990/s in 8.4 GiB, 128 984/s in 16.4 GiB.",
        NS("memory"),
    ] = None
    kv_compress_cuda_graph: A[
        bool,
        "MosaicKV: capture decode steps in CUDA graphs (the kernels' static plan, sized for --max-running-requests "
        "requests of the full context). Prefill runs without graphs.",
        NS("memory"),
    ] = False

    def __post_init__(self) -> None:
        if self.kv_compress not in KV_COMPRESS_CHOICES:
            raise KVCompressError(f"--kv-compress {self.kv_compress!r} is not one of {KV_COMPRESS_CHOICES}.")
        if self.kv_compress == "none":
            for flag, value in (("--kv-compress-config", self.kv_compress_config),
                                ("--kv-compress-workers", self.kv_compress_workers),
                                ("--kv-compress-attention", self.kv_compress_attention),
                                ("--kv-compress-sealing", self.kv_compress_sealing),
                                ("--kv-compress-seal-batch", self.kv_compress_seal_batch),
                                ("--kv-compress-cuda-graph", self.kv_compress_cuda_graph or None)):
                if value is not None:
                    raise KVCompressError(f"{flag} needs --kv-compress mosaickv.")
            super().__post_init__()
            return
        check_user_flags(self)
        if self.kv_compress_sealing is None:
            self.kv_compress_sealing = SEALING_CHOICES[0]
        elif self.kv_compress_sealing not in SEALING_CHOICES:
            raise KVCompressError(f"--kv-compress-sealing {self.kv_compress_sealing!r} is not one of {SEALING_CHOICES}.")
        elif self.kv_compress_sealing in DEVICE_SEALING and self.kv_compress_workers is not None:
            raise KVCompressError("--kv-compress-workers sets sealing processes; with --kv-compress-sealing device "
                                  "there are none: drop one of the two flags.")
        if self.kv_compress_seal_batch is not None:
            if self.kv_compress_sealing not in DEVICE_SEALING:
                raise KVCompressError(f"--kv-compress-seal-batch sets segments per device sealing call; it needs "
                                      f"--kv-compress-sealing device or device-thread, got "
                                      f"{self.kv_compress_sealing!r}.")
            if self.kv_compress_seal_batch < 1:
                raise KVCompressError(f"--kv-compress-seal-batch {self.kv_compress_seal_batch} must be at least 1.")
        if self.kv_compress_workers is None:
            self.kv_compress_workers = default_seal_workers()
        elif self.kv_compress_workers < 1:
            raise KVCompressError(f"--kv-compress-workers {self.kv_compress_workers} must be at least 1.")
        if self.kv_compress_attention is None:
            self.kv_compress_attention = ATTENTION_CHOICES[0]
        elif self.kv_compress_attention not in ATTENTION_CHOICES:
            raise KVCompressError(f"--kv-compress-attention {self.kv_compress_attention!r} is not one of "
                                  f"{ATTENTION_CHOICES}.")
        if self.kv_compress_cuda_graph and self.kv_compress_attention != "triton":
            raise KVCompressError(f"--kv-compress-cuda-graph needs --kv-compress-attention triton (the PyTorch "
                                  f"path loops over requests on the host), got {self.kv_compress_attention!r}.")
        self._mosaic_policy = load_checked_policy(self.kv_compress_config)
        # One page is one segment: SGLang allocates by the tree cache's page size, and
        # the tree's nodes hold whole segments.
        if self.page_size is None:
            self.page_size = self._mosaic_policy.segment_size
        # Our pool and tree cache own the KV layout, so our backends must read it.
        self.attention_backend = self.attention_backend or BACKEND_NAME
        self.radix_cache_backend = self.radix_cache_backend or BACKEND_NAME
        super().__post_init__()
        if self.model_path.lower() not in ("none", "dummy"):
            check_model(self, self.get_model_config())
        check_token_cap(self)
        disable_cuda_graphs(self, keep_decode=self.kv_compress_cuda_graph)

    @property
    def mosaic_policy(self):
        """The validated policy (``None`` with ``--kv-compress none``)."""
        return getattr(self, "_mosaic_policy", None)


def default_seal_workers() -> int:
    """A quarter of the CPUs, from 1 to 4: each process seals on one torch thread, and the
    rest of the machine serves the scheduler, tokenizer and detokenizer."""
    import os

    return max(1, min(4, (os.cpu_count() or 1) // 4))


def disable_cuda_graphs(args: ServerArgs, keep_decode: bool) -> None:
    """Prefill under mosaickv plans on the host every step, which no CUDA graph can
    capture, so its graphs go off; decode graphs too unless ``keep_decode``
    (``--kv-compress-cuda-graph``: a static plan refilled before each replay). Said in the
    log rather than failed in capture."""
    from sglang.srt.model_executor.cuda_graph_config import Backend

    graph = args.cuda_graph_config
    if graph is None:
        return
    off = [graph.prefill] + ([] if keep_decode else [graph.decode])
    if all(phase.backend == Backend.DISABLED for phase in off):
        return
    logger.warning("CUDA graphs are off for %s with --kv-compress mosaickv: its attention plans on the host every "
                   "step%s.", "prefill" if keep_decode else "prefill and decode",
                   "" if keep_decode else " (--kv-compress-cuda-graph captures decode)")
    for phase in off:
        phase.backend = Backend.DISABLED


def load_checked_policy(source: Optional[str]):
    """Load the policy through the lead's loader; its one-sentence error is re-raised."""
    from mosaickv.config import PolicyError, load_policy

    try:
        policy = load_policy(source or DEFAULT_POLICY)
        policy.check_sealable()
        return policy
    except PolicyError as err:
        raise KVCompressError(f"--kv-compress-config: {err}") from None


def check_user_flags(args: ServerArgs) -> None:
    """Refuse flags that cannot work with compressed KV, before SGLang resolves defaults."""
    refusals = [
        (args.speculative_algorithm is not None,
         f"--speculative-algorithm {args.speculative_algorithm} is not supported with --kv-compress mosaickv "
         "(draft tokens would be verified against a compressed cache); drop one of the two flags."),
        (args.attention_backend not in (None, BACKEND_NAME)
         or args.prefill_attention_backend not in (None, BACKEND_NAME)
         or args.decode_attention_backend not in (None, BACKEND_NAME),
         f"--attention-backend/--prefill-attention-backend/--decode-attention-backend must be unset or "
         f"'{BACKEND_NAME}' with --kv-compress mosaickv (other backends read only the dense pool), got "
         f"{args.attention_backend}/{args.prefill_attention_backend}/{args.decode_attention_backend}."),
        (args.radix_cache_backend not in (None, BACKEND_NAME),
         f"--radix-cache-backend {args.radix_cache_backend} cannot be combined with --kv-compress mosaickv, "
         f"which installs its own '{BACKEND_NAME}' tree cache; leave --radix-cache-backend unset."),
        (args.kv_cache_dtype not in BF16_KV_DTYPES,
         f"--kv-cache-dtype {args.kv_cache_dtype} is not supported with --kv-compress mosaickv "
         f"(segments store bf16 values; allowed: {', '.join(BF16_KV_DTYPES)})."),
        (args.pp_size > 1,
         f"--pp-size {args.pp_size} (pipeline parallelism) is not supported with --kv-compress mosaickv yet; use 1."),
        (args.enable_hierarchical_cache,
         "--enable-hierarchical-cache is not supported with --kv-compress mosaickv (HiCache copies the dense pool only)."),
        (args.disaggregation_mode != "null",
         f"--disaggregation-mode {args.disaggregation_mode} is not supported with --kv-compress mosaickv "
         "(PD transfer moves dense KV only)."),
        (args.enable_lmcache or args.enable_flexkv,
         "--enable-lmcache/--enable-flexkv are not supported with --kv-compress mosaickv (they store dense KV)."),
    ]
    for refused, sentence in refusals:
        if refused:
            raise KVCompressError(sentence)


def check_model(args: MosaicServerArgs, model_config) -> None:
    """Refuse architectures whose KV is not plain per-head MHA/GQA with full attention."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch

    arch = model_config.hf_config.architectures[0]
    policy = args.mosaic_policy
    refusals = [
        (model_config.attention_arch == AttentionArch.MLA,
         f"{arch} uses multi-head latent attention (MLA, DeepSeek-style), which --kv-compress mosaickv does not support."),
        (mambaish_config(model_config) is not None,
         f"{arch} is a hybrid linear-attention model, which --kv-compress mosaickv does not support."),
        (model_config.is_hybrid_swa or model_config.sliding_window_size is not None,
         f"{arch} uses sliding-window attention, which --kv-compress mosaickv does not support."),
        (model_config.is_encoder_decoder,
         f"{arch} is an encoder-decoder model, which --kv-compress mosaickv does not support."),
        (args.kv_cache_dtype == "auto" and model_config.dtype != _bf16(),
         f"--kv-cache-dtype auto resolves to {model_config.dtype} for {arch}, but --kv-compress mosaickv stores "
         "bf16; pass --dtype bfloat16 or --kv-cache-dtype bf16."),
        (args.page_size != policy.segment_size,
         f"--page-size {args.page_size} differs from the policy's segment_size {policy.segment_size}; with "
         "--kv-compress mosaickv a page is one segment: leave --page-size unset or set it to the segment size."),
    ]
    for refused, sentence in refusals:
        if refused:
            raise KVCompressError(sentence)
    from mosaickv.config import PolicyError

    try:
        policy.bind(model_config.head_dim)
        if hasattr(policy.strategy, "check_model"):
            policy.strategy.check_model(model_config.num_hidden_layers, model_config.get_num_kv_heads(args.tp_size))
    except PolicyError as err:
        raise KVCompressError(f"--kv-compress-config does not fit {arch} (head_dim {model_config.head_dim}): {err}") from None
    warn_without_profile(policy, arch)


def warn_without_profile(policy, arch: str) -> None:
    """A compressing policy with no retrieval-head profile (only a profile-bearing
    strategy checks the model) seals every head alike: say what that cost when measured."""
    if policy.ratio > 1 and not hasattr(policy.strategy, "check_model"):
        logger.warning("--kv-compress-config %s keeps no retrieval heads of %s whole: questions asked after a long "
                       "compressed context may not find what they need (SmolLM2-135M at 3x scored 3.0 where none "
                       "scored 37.8 and a policy with its heads profile 32.2, docs/accuracy.md). Measure this model's "
                       "heads with `mosaickv heads --model PATH --output heads.yaml` and serve that file.",
                       policy.name, arch)


def check_token_cap(args: MosaicServerArgs) -> None:
    """Refuse a --max-total-tokens that the dense tails fill, before any worker starts (an
    unset --max-running-requests counts as one: the pool then fits the count to the cap)."""
    from mosaickv.sglang_patch.sizing import prefill_batch_tokens, tail_tokens_per_request, token_cap_problem

    if args.max_total_tokens is None:
        return
    policy = args.mosaic_policy
    problem = token_cap_problem(
        args.max_total_tokens,
        per_request=tail_tokens_per_request(policy.segment_size, policy.sinks, policy.window, args.page_size),
        max_running_requests=args.max_running_requests or 1,
        prefill_tokens=prefill_batch_tokens(args),
        segment_size=policy.segment_size,
    )
    if problem is not None:
        raise KVCompressError(problem)


def _bf16():
    import torch

    return torch.bfloat16
