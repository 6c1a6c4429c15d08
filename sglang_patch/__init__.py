"""MosaicKV as an SGLang general plugin (entry-point group ``sglang.srt.plugins``).

SGLang calls :func:`register` in every process (launcher, scheduler, workers) through
``sglang.srt.plugins.load_plugins`` and then applies the hooks registered here. With
``--kv-compress none`` (the default) nothing but the two extra flags changes.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register hooks, the radix cache backend and the attention backend (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from mosaickv.sglang_patch import admission, args, attention, pool, radix

    HookRegistry.register("sglang.srt.server_args.ServerArgs", args.MosaicServerArgs, HookType.REPLACE)
    # Engine keeps its own class attribute (bound at class creation), so replace it too.
    HookRegistry.register(
        "sglang.srt.entrypoints.engine.Engine.server_args_class", args.MosaicServerArgs, HookType.REPLACE
    )
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _exit_cleanly, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator",
        pool.create_configurator_hook,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool",
        pool.build_mha_kv_pool_hook,
        HookType.AROUND,
    )
    # Every way the allocators give slots back; the paged free_segment bypasses free().
    for method in ("token.TokenToKVPoolAllocator.free", "paged.PagedTokenToKVPoolAllocator.free",
                   "paged.PagedTokenToKVPoolAllocator.free_segment"):
        HookRegistry.register(f"sglang.srt.mem_cache.allocator.{method}", pool.allocator_free_hook, HookType.AROUND)
    for method in ("token.TokenToKVPoolAllocator.clear", "paged.PagedTokenToKVPoolAllocator.clear"):
        HookRegistry.register(f"sglang.srt.mem_cache.allocator.{method}", pool.allocator_clear_hook, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode",
                          pool.decode_prefetch_hook, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.get_internal_state", pool.internal_state_hook,
                          HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.on_idle", radix.idle_drain_hook, HookType.BEFORE)
    HookRegistry.register("sglang.srt.managers.scheduler_components.batch_result_processor."
                          "SchedulerBatchResultProcessor.process_batch_result_decode", radix.decode_seal_hook,
                          HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.schedule_policy.PrefillAdder.__init__", admission.prefill_budget_hook,
                          HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
                          admission.chunked_floor_hook, HookType.AROUND)
    radix.register_backend()
    attention.register_backend()


def _exit_cleanly(original, *a, **kw):
    """On the CLI a refusal is one line on stderr and exit status 1, not a traceback."""
    from mosaickv.sglang_patch.args import KVCompressError

    try:
        return original(*a, **kw)
    except KVCompressError as err:
        raise SystemExit(f"error: {err}") from None


__all__ = ["register"]
