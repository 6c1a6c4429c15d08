"""The ``mosaickv`` command: offline evaluation, policy checks and listings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosaickv.config import load_policy, preset_names
from mosaickv.errors import PolicyError
from mosaickv.formats import WIDTHLESS
from mosaickv.tasks import KINDS


DENSE_SHARE = 0.667  # SmolLM2's 20 of 90 heads whole at 3x: half the loss of 10 (docs/accuracy.md)


def _count_or_share(text: str) -> float:
    """--dense: a head count (int) or a share of the budget (a fraction below 1)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _check_policies(names: list[str], scope: str, **overrides) -> None:
    """Refuse a bad policy before the minutes of model work (a ratio one policy cannot
    reach is reported in its row), and one whose scorer cannot seal segments alone."""
    for name in names:
        policy = load_policy(name, **overrides)
        if scope == "segment":
            policy.check_sealable()


def _eval(args: argparse.Namespace) -> int:
    import torch

    from mosaickv import model as models
    from mosaickv.evaluate import corpus_ids, evaluate_fidelity, plot_fidelity
    from mosaickv.hf import Runner

    _check_policies(args.policy, args.scope)

    if args.threads:
        torch.set_num_threads(args.threads)
    net, tokenizer = models.load(args.model)
    runner = Runner(net)
    samples = corpus_ids(tokenizer, args.tokens + args.continuation, args.samples)
    result = evaluate_fidelity(runner, samples, args.policy, args.ratio, continuation=args.continuation, scope=args.scope, progress=not args.quiet)
    result["model"] = args.model or models.DEFAULT_MODEL
    result["command"] = "mosaickv " + " ".join(sys.argv[1:])
    if args.plot:
        plot_fidelity(result, args.plot)
        result["plot"] = args.plot
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    """A Markdown table of the fidelity rows."""
    lines = [
        f"{result['samples']} texts of {result['context_tokens']} context tokens, continuation {result['continuation_tokens']}, scope {result['scope']}, "
        f"dense {result['dense_bytes_per_token']:.0f} B/token",
        "",
        "| policy | target | ratio | bytes/token | KL (nats) | top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['policy']} | {r['target_ratio']:g}x | - | - | - | refused: {r['error']} |")
        else:
            lines.append(
                f"| {r['policy']} | {r['target_ratio']:g}x | {r['ratio']:.2f}x | {r['bytes_per_token']:.0f} | {r['kl']:.4f} | {r['top1']:.3f} |"
            )
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy, ratio=args.ratio)
    if args.head_dim:
        policy.bind(args.head_dim)
    print(json.dumps({"name": policy.name, "ratio": policy.ratio, "segment_size": policy.segment_size, "ok": True}))
    return 0


def _list(args: argparse.Namespace) -> int:
    from mosaickv.registry import SCORERS, SELECTORS, STRATEGIES

    print("presets:    " + ", ".join(preset_names()))
    for label, reg in (("scorers", SCORERS), ("selectors", SELECTORS), ("strategies", STRATEGIES)):
        print(f"{label + ':':<12}" + ", ".join(reg.names()))
    return 0


def _samples(items: list[str], kinds: list[str]) -> dict[str, int]:
    """``--samples 10 multivalue=3``: a count for every kind, then per-kind counts."""
    plain = [i for i in items if "=" not in i]
    pairs = [i.split("=", 1) for i in items if "=" in i]
    for name, n in [("", plain[-1] if plain else "1"), *pairs]:
        if name and name not in kinds:
            raise PolicyError("samples", f"{name}={n}", f"KIND=N with KIND one of the tasks run ({', '.join(kinds)})")
        if not n.isdigit():
            raise PolicyError("samples", n, "a whole number")
    counts = dict.fromkeys(kinds, int(plain[-1]) if plain else 1)
    counts.update({name: int(n) for name, n in pairs})
    return counts


def _retrieval(args: argparse.Namespace) -> int:
    import torch

    from mosaickv import model as models
    from mosaickv.hf import Runner
    from mosaickv.retrieval import MODES, evaluate_retrieval, format_tables, plot_retrieval
    from mosaickv.tasks import KINDS, hf_counter, suite

    kinds = list(KINDS) if args.tasks == ["all"] else args.tasks
    for name in kinds:
        if name not in KINDS:
            raise PolicyError("tasks", name, f"one of {list(KINDS)} or all")
    counts = _samples(args.samples, kinds)
    overrides = {"min_context": args.min_context} if args.min_context else {}
    _check_policies(args.policy, args.scope, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # decompressed caches carry denormals that slow CPU matmuls ~3x
    net, tokenizer = models.load(args.model)
    tasks = suite(counts, args.tokens, hf_counter(tokenizer), seed=args.seed)
    modes = MODES if args.mode == "both" else (args.mode,)
    header = {
        "model": args.model or models.DEFAULT_MODEL,
        "command": "mosaickv " + " ".join(sys.argv[1:]),
        "target_tokens": args.tokens,
        "samples": counts,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }

    def save(result: dict) -> None:
        result.update(header)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=1))
        if args.plot:
            plot_retrieval(result, args.plot)
            result["plot"] = args.plot

    result = evaluate_retrieval(
        Runner(net), tokenizer, tasks, args.policy, args.ratio, modes, scope=args.scope, overrides=overrides,
        progress=not args.quiet, on_task=save if args.output or args.plot else None,
    )  # fmt: skip
    save(result)
    print(json.dumps(result, indent=1) if args.json else format_tables(result))
    return 0


def _server(text: str) -> dict:
    """``--server NAME=URL``: a running OpenAI-compatible server."""
    name, sep, url = text.partition("=")
    if not (sep and name and url.startswith(("http://", "https://"))):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=URL with an http(s) URL, e.g. mosaic3x=http://127.0.0.1:30000")
    return {"name": name, "url": url}


def _positive_int(text: str) -> int:
    """A count of at least 1 (``--parallel``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _launch(text: str) -> dict:
    """``--launch NAME=FLAGS``: a server to start with these ``sglang.launch_server`` flags (FLAGS may be empty)."""
    from mosaickv.launch import launch_flags

    name, sep, flags = text.partition("=")
    if not (sep and name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FLAGS, e.g. none= or 'mosaic3x=--kv-compress mosaickv'")
    try:
        launch_flags(flags)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return {"name": name, "flags": flags}


def _accuracy(args: argparse.Namespace) -> int:
    import time

    from transformers import AutoTokenizer

    from mosaickv.accuracy import Method, build_tasks, connect, evaluate, format_table, make_result, plot_accuracy, write_json
    from mosaickv.tasks import hf_counter

    methods = [Method(**m) for m in args.methods or []]
    if not methods:
        args.fail("name at least one method with --server NAME=URL or --launch NAME=FLAGS")
    names = [m.name for m in methods]
    for name in names:
        if names.count(name) > 1:
            args.fail(f"method name {name!r} is given twice (--server/--launch): names must differ")
    if any(m.url is None for m in methods) and not args.model_path:
        args.fail("--launch needs --model-path (the model the servers load)")
    tokenizer = args.tokenizer or args.model_path
    if not tokenizer:
        args.fail("--tokenizer (or --model-path) is needed to count prompt lengths in the model's tokens")
    counts = _samples(args.samples, args.kinds)
    try:
        tasks = build_tasks(counts, args.lengths, hf_counter(AutoTokenizer.from_pretrained(tokenizer)), seed=args.seed)
    except ValueError as err:
        args.fail(f"--lengths {' '.join(map(str, args.lengths))}: {err}")
    out = Path(args.output)
    launches = [m for m in methods if m.url is None]
    ports = {m.name: args.port + launches.index(m) for m in launches}  # a fresh port each: the last one may linger
    logs = {m.name: out.with_name(f"{out.stem}.{m.name}.server.log") for m in launches}
    header = {
        "command": "mosaickv " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": args.device,
        "model_path": args.model_path,
        "tokenizer": tokenizer,
        "methods": [{**vars(m), "port": ports.get(m.name), "log": str(logs[m.name]) if m.name in logs else None} for m in methods],
        "kinds": args.kinds,
        "lengths": sorted(set(args.lengths)),
        "samples": counts,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "prime_context": args.prime_context,
        "concurrent": args.concurrent,
        "parallel": args.parallel,
        "requests_per_method": len(tasks),
    }
    connections = {
        m.name: connect(m, args.model_path, ports.get(m.name, args.port), logs.get(m.name), args.startup_timeout, args.request_timeout, args.model_name)
        for m in methods
    }  # fmt: skip
    records = evaluate(tasks, connections, args.max_tokens, progress=not args.quiet,
                       save=lambda recs: write_json(out, make_result(header, recs)), prime=args.prime_context,
                       concurrent=args.concurrent, parallel=args.parallel)
    try:
        result = make_result(header, records, args.reference)
    except ValueError as err:
        args.fail(f"--reference {args.reference}: {err}")
    if args.plot:
        plot_accuracy(result, args.plot)
        result["plot"] = args.plot
    write_json(out, result)
    print(format_table(result))
    failed = sum(r["error"] is not None for r in records)
    if failed:
        print(f"mosaickv: {failed} of {len(records)} requests failed (not scored); their errors are in {out}", file=sys.stderr)
    return 1 if failed else 0


def _add_reference_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="the method the others are compared with, paired, with a bootstrap interval (default: none, where the run has it)")


def _accuracy_merge(args: argparse.Namespace) -> int:
    from mosaickv.accuracy import format_table, merge_results, plot_accuracy, pool_results, write_json

    try:
        combine = pool_results if args.pool else merge_results
        result = combine([json.loads(Path(f).read_text()) for f in args.inputs], args.inputs, args.reference)
    except (OSError, ValueError, KeyError) as err:
        args.fail(f"cannot merge {' '.join(args.inputs)}: {err}")
    if args.plot:
        plot_accuracy(result, args.plot)
        result["plot"] = args.plot
    write_json(args.output, result)
    print(format_table(result))
    return 0


def _accuracy_repeat(args: argparse.Namespace) -> int:
    from mosaickv.accuracy import format_repeat, repeat_report, write_json

    try:
        stems = [Path(f).stem for f in args.inputs]
        names = stems if stems[0] != stems[1] else ["first", "second"]
        report = repeat_report(*[json.loads(Path(f).read_text()) for f in args.inputs], names, args.reference)
    except (OSError, ValueError, KeyError) as err:
        args.fail(f"cannot compare {' '.join(args.inputs)}: {err}")
    if args.output:
        write_json(args.output, report)
    print(format_repeat(report))
    return 0


def _heads(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from mosaickv import model as models
    from mosaickv.config import read_policy_source
    from mosaickv.heads import retrieval_profile
    from mosaickv.hf import Runner
    from mosaickv.tasks import hf_counter, suite

    base = read_policy_source(args.base)
    load_policy(args.base)  # refuse a bad base before the minutes of model work
    if args.threads:
        torch.set_num_threads(args.threads)
    net, tokenizer = models.load(args.model)
    tasks = suite(dict.fromkeys(("single_number", "multikey"), args.samples), [args.tokens], hf_counter(tokenizer), seed=args.seed)
    profile = retrieval_profile(Runner(net), tokenizer, tasks, progress=not args.quiet)
    inner = dict(base.get("strategy", {"name": "dynamic"}))
    if args.whole == "fp8" and inner.get("name", "dynamic") == "dynamic":
        # As the preset mosaic_heads_fp8: the other heads may store a side in fp8 too,
        # unless the base says otherwise (docs/accuracy.md, twenty-ninth run).
        inner.setdefault("fp8", True)
    policy = {**base, "name": f"{base.get('name', 'policy')}_heads",
              "strategy": {"name": "headwise", "heads": [[round(float(x), 4) for x in row] for row in profile],
                           "dense": args.dense, "inner": inner,
                           **({"whole": args.whole} if args.whole != "dense" else {})}}
    loaded = load_policy(policy)  # what is written must load
    count = loaded.strategy.whole_heads(loaded.ratio)
    how_many = (f"the {count}" if args.dense >= 1
                else f"as many as {args.dense:g} of each segment's budget buys ({count} at {loaded.ratio:g}x) of the")
    whole = "kept whole" if args.whole == "dense" else f"kept whole in {args.whole}"
    header = (f"# {args.base} with {how_many} KV heads of {args.model or models.DEFAULT_MODEL} that retrieve most {whole}.\n"
              f"# Measured by: mosaickv {' '.join(sys.argv[1:])}\n")
    Path(args.output).write_text(header + yaml.safe_dump(policy, sort_keys=False, default_flow_style=None, width=160))
    order = profile.flatten().argsort(descending=True)[:count].tolist()
    hkv = profile.shape[1]
    print(f"wrote {args.output}; dense heads (layer, kv head, needle mass): "
          + ", ".join(f"({i // hkv}, {i % hkv}, {profile.flatten()[i]:.2f})" for i in order))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments every subcommand that runs the model on the CPU shares."""
    p.add_argument("--model", default=None, help="a local transformers model folder (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_model_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments every subcommand that runs policies on the model shares."""
    p.add_argument("--policy", nargs="+", default=["mosaic"], help="preset names or policy files")
    p.add_argument("--scope", choices=["group", "segment"], default="group", help="plan the whole prompt at once, or each segment alone as serving does")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaickv", description="Dynamic two-dimensional KV-cache compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="fidelity of policies against the dense cache on a real model")
    ev.add_argument("--ratio", nargs="+", type=float, default=[3.0], help="how many times fewer bytes than dense")
    ev.add_argument("--tokens", type=int, default=2048, help="context length that is compressed")
    ev.add_argument("--continuation", type=int, default=64, help="tokens teacher-forced after the context")
    ev.add_argument("--samples", type=int, default=2, help="disjoint texts to average over")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--output", default=None, help="also write the JSON to this file")
    ev.add_argument("--plot", default=None, help="write a PNG of fidelity against bytes per token")
    _add_model_run_args(ev)
    ev.set_defaults(func=_eval)

    ck = sub.add_parser("check", help="validate a policy (preset name or file)")
    ck.add_argument("policy")
    ck.add_argument("--ratio", type=float, default=None)
    ck.add_argument("--head-dim", type=int, default=None)
    ck.set_defaults(func=_check)

    ls = sub.add_parser("list", help="list presets and registered parts")
    ls.set_defaults(func=_list)

    rt = sub.add_parser("retrieval", help="RULER-style retrieval accuracy with the question inside or after the compressed prompt")
    rt.add_argument("--ratio", nargs="+", type=float, default=[2.0, 3.0, 6.0], help="how many times fewer bytes than dense")
    rt.add_argument("--mode", choices=["inside", "after", "both"], default="both", help="question inside the compressed prompt, after it, or both")
    rt.add_argument("--tasks", nargs="+", default=["all"], help="task kinds (see mosaickv.tasks.KINDS) or all")
    rt.add_argument("--samples", nargs="+", default=["3"], help="samples per kind: N, then KIND=N to override one kind")
    rt.add_argument("--tokens", nargs="+", type=int, default=[2048], help="prompt lengths in model tokens")
    rt.add_argument("--seed", type=int, default=0, help="task generator seed")
    rt.add_argument("--min-context", type=int, default=None, help="override the policies' min_context (short smoke runs)")
    rt.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rt.add_argument("--output", default=None, help="write the JSON here (rewritten after every task)")
    rt.add_argument("--plot", default=None, help="write a PNG of accuracy against ratio, one column per mode")
    _add_model_run_args(rt)
    rt.set_defaults(func=_retrieval)

    hd = sub.add_parser("heads", help="measure which KV heads retrieve (needle tasks, answer teacher-forced) and write a headwise policy")
    hd.add_argument("--base", default="mosaic", help="the policy whose strategy runs on the other heads (preset name or file)")
    hd.add_argument("--dense", type=_count_or_share, default=DENSE_SHARE,
                    help="how many KV heads (over all layers) keep every token dense, or a fraction below 1: the share "
                         f"of each segment's budget they take, so more at lower ratios (default {DENSE_SHARE:g})")
    hd.add_argument("--whole", choices=WIDTHLESS, default="dense",
                    help="how the whole heads store their tokens: dense (bf16) or fp8 (e4m3, half the bytes, so the "
                         "same share keeps twice as many heads whole; composes MosaicKV with FP8, and a dynamic base "
                         "may then store the other heads' sides in fp8 too unless it sets fp8 itself)")
    hd.add_argument("--samples", type=int, default=4, help="tasks per kind (single_number, multikey)")
    hd.add_argument("--tokens", type=int, default=2048, help="prompt length in model tokens")
    hd.add_argument("--seed", type=int, default=1000, help="task seed (keep it apart from the seeds you evaluate on)")
    hd.add_argument("--output", required=True, help="the policy YAML to write")
    _add_model_args(hd)
    hd.set_defaults(func=_heads)

    ac = sub.add_parser("accuracy", help="long-context accuracy of methods served through the OpenAI API (running servers, or SGLang servers it launches)")
    ac.add_argument("--server", dest="methods", action="append", type=_server, metavar="NAME=URL", help="a running OpenAI-compatible server (repeatable)")
    ac.add_argument("--launch", dest="methods", action="append", type=_launch, metavar="NAME=FLAGS", help="start python -m sglang.launch_server with these flags (repeatable; one at a time unless --concurrent)")
    ac.add_argument("--model-path", default=None, help="the model the launched servers load (and the default tokenizer)")
    ac.add_argument("--tokenizer", default=None, help="a transformers tokenizer folder to count prompt tokens (default: --model-path)")
    ac.add_argument("--model-name", default="default", help="the model name sent in requests")
    ac.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), metavar="KIND", help=f"task kinds (default all: {', '.join(KINDS)})")
    ac.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 7168], help="prompt lengths in model tokens")
    ac.add_argument("--samples", nargs="+", default=["3"], help="samples per kind per length: N, then KIND=N to override one kind")
    ac.add_argument("--seed", type=int, default=0, help="task generator seed")
    ac.add_argument("--max-tokens", type=int, default=None, help="answer budget for every request (default: each task's own)")
    ac.add_argument("--port", type=int, default=30000, help="port of the first launched server (the next ones count up)")
    ac.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a launched server has to answer /health")
    ac.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    ac.add_argument("--device", default=None, help="a description of the machine, kept in the JSON (e.g. 'H100 80GB')")
    ac.add_argument("--prime-context", action="store_true",
                    help="send each task's context first and wait until the server has compressed it, so the question and answer read the compressed cache")
    ac.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                    help="requests of each method in flight at once (default 1; the server batches them, as it would its users')")
    ac.add_argument("--concurrent", action="store_true",
                    help="ask every method at once, a thread each (servers sharing a GPU answer side by side; launched servers then start together, so they must fit together)")
    ac.add_argument("--output", default="accuracy.json", help="the JSON (rewritten as the run goes); server logs go beside it")
    ac.add_argument("--plot", default=None, help="write a PNG of accuracy against length and per kind")
    ac.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_reference_arg(ac)
    ac.set_defaults(func=_accuracy, fail=ac.error)

    am = sub.add_parser("accuracy-merge", help="one accuracy report from runs that asked the same tasks of different methods (--pool: other tasks)")
    am.add_argument("inputs", nargs="+", help="accuracy JSONs written by `mosaickv accuracy --output`")
    am.add_argument("--output", required=True, help="the merged JSON")
    am.add_argument("--plot", default=None, help="write a PNG of the merged report")
    am.add_argument("--pool", action="store_true",
                    help="runs that asked other tasks (other --samples, --lengths or --seed) of the same methods: "
                         "all their tasks in one report, each paired within its run")
    _add_reference_arg(am)
    am.set_defaults(func=_accuracy_merge, fail=am.error)

    ar = sub.add_parser("accuracy-repeat", help="how far asking the same tasks again moved each method's scores (the run-to-run noise)")
    ar.add_argument("inputs", nargs=2, help="two accuracy JSONs whose runs asked some of the same tasks")
    ar.add_argument("--output", default=None, help="also write the comparison as JSON")
    _add_reference_arg(ar)
    ar.set_defaults(func=_accuracy_repeat, fail=ar.error)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PolicyError, FileNotFoundError) as err:
        print(f"mosaickv: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
