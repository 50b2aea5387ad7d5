"""The `edgevlm` command line. Only this module maps errors to exit codes:
0 ok, 1 run failed, 2 usage/config/input error, 3 missing optional dependency."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgevlm import __version__
from edgevlm.errors import EdgeVLMError, UsageError
from edgevlm.loader import DEFAULT_MODEL
from edgevlm.ui import info, native_stdout_silenced, set_quiet

EPILOG = """examples:
  edgevlm export --model tiny:smolvlm --method bi --ratio 0.3 --target gguf -o out
  edgevlm export --model HuggingFaceTB/SmolVLM-256M-Instruct --method bi --ratio 0.3 \\
      --target gguf --quant q4_k_m
  edgevlm score tiny:qwen2-vl --method lc -o scores/
  edgevlm prune tiny:llava --method bi --ratio 0.25 -o out/
  edgevlm eval tiny:llava out/pruned --baseline random:5
"""


# --------------------------------------------------------------------------------- parsers
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                   help="where to run PyTorch (default cpu)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map, e.g. 'auto' to spread a large model over GPUs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="seed for tiny: models and sampling")


def _calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="builtin:32",
                   help="builtin[:N], a folder of images (+prompts.jsonl) or a .jsonl file")
    p.add_argument("--batch-size", type=int, default=4)


def _score_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--method", required=required, help="bi, angular, lc or svl (edgevlm list methods)")
    p.add_argument("--tokens", default=None, help="token subset: all, text or visual")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. p=0.5 for svl (repeatable)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="fraction of decoder layers to remove")
    group.add_argument("--n-layers", type=int, help="number of decoder layers to remove")
    p.add_argument("--protect", default=None, help="layers never removed: first,last,<index>")


def _out_options(p: argparse.ArgumentParser, default: str = "out") -> None:
    p.add_argument("-o", "--out", default=default, help=f"output folder (default {default})")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevlm", description="Prune, quantize, export and benchmark VLMs for the edge.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list families, methods, targets, devices, tiny or random models")
    p.add_argument("what", choices=["families", "methods", "targets", "devices", "tiny", "random"])

    p = sub.add_parser("inspect", help="show a model's family, layers, parameters and targets")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("score", help="score every decoder layer (writes scores.json)")
    p.add_argument("model")
    _score_options(p, required=True)
    _plan_options(p)
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    p = sub.add_parser("prune", help="remove the least important layers (writes pruned/)")
    p.add_argument("model")
    _score_options(p, required=False)
    _plan_options(p)
    p.add_argument("--plan", type=Path, help="replay a plan.json instead of scoring")
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    p = sub.add_parser("eval", help="fidelity of a pruned model against its base")
    p.add_argument("base")
    p.add_argument("pruned")
    p.add_argument("--baseline", default=None, metavar="random:K",
                   help="also evaluate K random plans removing as many layers")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    _calib_options(p)
    _model_options(p)

    p = sub.add_parser("export", help="score, prune, quantize and export for a target")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local folder or tiny:<family> (default {DEFAULT_MODEL})")
    _score_options(p, required=False)
    _plan_options(p)
    p.add_argument("--plan", type=Path, help="replay a plan.json instead of scoring")
    p.add_argument("--target", required=True, help="onnx or gguf")
    p.add_argument("--quant", default=None, help="onnx: none|int8|q4; gguf: f16|q8_0|q4_k_m|...")
    p.add_argument("--mmproj-type", default="f16", help="gguf mmproj type: f16 or q8_0")
    p.add_argument("--vision-quant", default="none", help="onnx vision encoder: none or int8")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not advised)")
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    sub.add_parser("devices", help="list device profiles and mark the detected one")

    p = sub.add_parser("run", help="answer a prompt about an image with an export (streams)")
    p.add_argument("export", help="export folder or its manifest.json")
    p.add_argument("--image", required=True,
                   help="image file, or 'builtin' for a generated test picture")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _runtime_options(p)

    p = sub.add_parser("bench", help="time exports on this device (table + bench.json)")
    p.add_argument("exports", nargs="+", help="export folders or manifests; 2+ are compared")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("-o", "--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG chart here")
    _runtime_options(p)
    return parser


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="device profile: auto (detect) or a name from `edgevlm devices`")
    p.add_argument("--runtime", default=None, help="onnxruntime or llama.cpp (default: by target)")
    p.add_argument("--threads", type=int, default=None, help="default: the profile's")


# -------------------------------------------------------------------------------- commands
def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option '{pair}' is not KEY=VALUE", "e.g. --option p=0.5")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load(args, name: str, **kw):
    from edgevlm.loader import load

    info(f"loading {name}")
    return load(name, device=args.device, device_map=args.device_map, dtype=args.dtype,
                seed=args.seed, **kw)


def cmd_list(args) -> int:
    if args.what == "families":
        from edgevlm.adapters import ADAPTERS

        for a in ADAPTERS:
            print(f"{a.family:12s} {a.hf_class:36s} gguf {a.gguf_text_arch}/{a.gguf_projector}")
    elif args.what == "methods":
        from edgevlm.scoring import SCORERS

        for scorer in SCORERS:
            options = ", ".join(f"{k}={v}" for k, v in scorer.defaults.items())
            print(f"{scorer.name:8s} {scorer.summary}" + (f" [{options}]" if options else ""))
    elif args.what == "targets":
        from edgevlm.targets import TARGETS

        for t in TARGETS:
            print(f"{t.name:6s} {t.description}; quant: {', '.join(t.quants)}")
    elif args.what == "tiny":
        from edgevlm.tiny import tiny_names

        print("\n".join(f"tiny:{n}" for n in tiny_names()))
    elif args.what == "random":
        from edgevlm.tiny.presets import PRESETS

        for name, (family, shape) in PRESETS.items():
            print(f"random:{name:14s} {family:11s} {shape.layers} layers, hidden {shape.hidden}")
    else:
        return cmd_devices(args)
    return 0


def cmd_devices(args) -> int:
    from edgevlm.devices import builtin_profiles, detect

    detected = detect().name
    for name, profile in builtin_profiles().items():
        mark = "*" if name == detected else " "
        print(f"{mark} {name:18s} {profile.description}")
    print("(* = detected on this machine)")
    return 0


def cmd_inspect(args) -> int:
    from edgevlm.summary import describe, format_summary

    summary = describe(args.model, seed=args.seed)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _score(args, vlm, calib, n_drop=None):
    from edgevlm import pipeline

    return pipeline.score_model(vlm, calib, args.method, tokens=args.tokens,
                                batch_size=args.batch_size, n_drop=n_drop,
                                options=_options(args.option))


def _n_drop(args, vlm) -> int | None:
    from edgevlm.plan import layers_to_drop

    if args.ratio is None and args.n_layers is None:
        return None
    return layers_to_drop(vlm.adapter.num_layers(vlm.config), args.ratio, args.n_layers)


def cmd_score(args) -> int:
    from edgevlm import pipeline
    from edgevlm.outdir import check_writable, staged_dir
    from edgevlm.scoring import SCORERS

    SCORERS.get(args.method)
    check_writable(Path(args.out), args.force)
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    scores = _score(args, vlm, calib, n_drop=_n_drop(args, vlm))
    with staged_dir(args.out, args.force) as tmp:
        pipeline.write_scores(tmp, scores)
    _print_scores(scores)
    info(f"wrote {args.out}/scores.json")
    return 0


def _print_scores(scores, dropped=()) -> None:
    order = scores.ascending()
    print(f"{scores.method} scores (low = least important):")
    for i in range(scores.n_layers):
        mark = "  removed" if i in dropped else ""
        print(f"  layer {i:3d}  {scores.scores[i]:.6g}  rank {order.index(i) + 1}{mark}")


def _plan(args, vlm, calib):
    """Scores + plan from --plan or from --method/--ratio; also returns the scores."""
    from edgevlm import pipeline
    from edgevlm.types import PrunePlan

    if args.plan:
        return None, PrunePlan.load(args.plan).validate()
    if not args.method:
        raise UsageError("say how to choose layers", "pass --method bi|angular|lc|svl or --plan plan.json")
    if args.ratio is None and args.n_layers is None:
        raise UsageError("say how many layers to remove", "pass --ratio 0.3 or --n-layers N")
    n_drop = _n_drop(args, vlm)
    scores = _score(args, vlm, calib, n_drop=n_drop)
    return scores, pipeline.plan_for(vlm, scores, ratio=args.ratio, n_layers=args.n_layers,
                                     protect=args.protect)


def _early_checks(args) -> None:
    """Everything that can be rejected before loading a model."""
    from edgevlm.outdir import check_writable
    from edgevlm.plan import layers_to_drop
    from edgevlm.scoring import SCORERS

    if getattr(args, "method", None):
        SCORERS.get(args.method)
    if args.ratio is not None or args.n_layers is not None:
        layers_to_drop(10**6, args.ratio, args.n_layers)  # range checks only
    check_writable(Path(args.out), args.force)


def cmd_prune(args) -> int:
    from edgevlm import pipeline
    from edgevlm.outdir import staged_dir

    _early_checks(args)
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    scores, plan = _plan(args, vlm, calib)
    with staged_dir(args.out, args.force) as tmp:
        if scores is not None:
            pipeline.write_scores(tmp, scores, plan)
        else:
            plan.save(tmp / "plan.json")
        pipeline.prune_and_save(vlm, plan, tmp)
    print(f"pruned model: {args.out}/pruned ({len(plan.kept)} of {plan.n_layers} layers kept; "
          f"removed {plan.layers})")
    return 0


def cmd_eval(args) -> int:
    from edgevlm import pipeline
    from edgevlm.fidelity import fidelity, random_baseline

    k = None
    if args.baseline:
        kind, _, count = args.baseline.partition(":")
        if kind != "random" or not count.isdigit() or int(count) < 1:
            raise UsageError(f"--baseline '{args.baseline}' is not random:K", "e.g. --baseline random:5")
        k = int(count)
    calib = pipeline.calibration(args.calib, args.seed)
    samples = calib.heldout or calib.scoring
    base = _load(args, args.base)
    pruned = _load(args, args.pruned)
    result = {"base": args.base, "pruned": args.pruned, "calibration": calib.description,
              "fidelity": fidelity(base, pruned, samples, batch_size=args.batch_size)}
    n_base, n_pruned = (v.adapter.num_layers(v.config) for v in (base, pruned))
    if k:
        if n_pruned >= n_base:
            raise UsageError("the pruned model has as many layers as the base",
                             "a random baseline needs a pruned model with fewer layers")
        result["random_baseline"] = random_baseline(base, n_base - n_pruned, samples, k,
                                                    seed=args.seed, batch_size=args.batch_size)
    _print_eval(result, n_base, n_pruned)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print_eval(result, n_base, n_pruned) -> None:
    f = result["fidelity"]
    print(f"held-out samples {f['samples']}, positions {f['positions']}; "
          f"layers {n_base} -> {n_pruned}")
    print(f"  KL(base||pruned)  {f['kl']:.6g}")
    print(f"  top-1 agreement   {f['top1_agreement']:.4f}")
    if f["ppl_base"] is not None:
        print(f"  answer perplexity {f['ppl_base']:.4g} (base) -> {f['ppl_pruned']:.4g} (pruned)")
    rb = result.get("random_baseline")
    if rb:
        print(f"random baseline ({rb['k']} plans removing {rb['n_dropped']} layers):")
        for key in ("kl", "top1_agreement", "ppl_pruned"):
            if key in rb:
                s = rb[key]
                print(f"  {key:17s} {s['mean']:.6g} ± {s['std']:.3g} (min {s['min']:.4g}, max {s['max']:.4g})")


def cmd_export(args) -> int:
    from edgevlm import pipeline
    from edgevlm.outdir import staged_dir
    from edgevlm.targets import TARGETS

    target = TARGETS.get(args.target)
    quant = args.quant or target.default_quant
    _early_checks(args)
    options = ({"mmproj_type": args.mmproj_type} if target.name == "gguf"
               else {"vision_quant": args.vision_quant})
    target.check(quant, None, **options)
    pruning = args.method or args.plan
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    target.check(quant, vlm.config, **options)
    samples = calib.heldout or calib.scoring
    with staged_dir(args.out, args.force) as tmp:
        plan = None
        if pruning:
            scores, plan = _plan(args, vlm, calib)
            if scores is not None:
                pipeline.write_scores(tmp, scores, plan)
            model_dir = pipeline.prune_and_save(vlm, plan, tmp)
            plan_record = plan.to_dict()
        else:
            model_dir, plan_record = vlm.path, getattr(vlm.config, "edgevlm_plan", None)
        del vlm  # the exporter reloads the saved checkpoint as its reference
        extra = dict(options, name=pipeline.export_name(args.model, plan)) if (
            target.name == "gguf") else options
        with native_stdout_silenced(not args.verbose):
            artifact = pipeline.export_target(
                target.name, model_dir, tmp, quant=quant, plan=plan_record,
                base_model=args.model, verify=not args.no_verify, samples=samples,
                progress=not args.quiet, **extra)
    print(f"exported {args.model} -> {args.out} ({target.name}, {quant})")
    for f in artifact.files:
        print(f"  {f.role:16s} {f.path}  {f.bytes / 1e6:.2f} MB")
    if artifact.parity:
        print("  verified against PyTorch: " + _parity_summary(artifact.parity))
    return 0


def _parity_summary(parity: dict) -> str:
    """The headline figures of a manifest's parity record, one line."""
    parts = []
    for key, value in parity.items():
        if key.endswith("max_abs_diff") and isinstance(value, (int, float)):
            parts.append(f"{key.removesuffix('_max_abs_diff')} max diff {value:.2g}")
        elif key == "greedy_tokens_equal":
            parts.append(f"greedy tokens equal: {'yes' if value else 'no'}")
        elif key == "text_top1_agreement":
            parts.append(f"top-1 agreement {value:.2f}")
    for variant, record in (parity.get("quantized") or {}).items():
        if isinstance(record, dict) and "top1_agreement" in record:
            parts.append(f"{variant} top-1 {record['top1_agreement']:.2f}")
    return "; ".join(parts)


def _profile(name: str):
    from edgevlm.devices import HostFacts, detect, get_profile

    if name == "auto":
        facts = HostFacts.read()
        return detect(facts), facts
    return get_profile(name), None


def cmd_run(args) -> int:
    from edgevlm.calib import open_rgb
    from edgevlm.runtimes.bench import bench_image, make_runner

    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens} must be at least 1", "e.g. --max-tokens 64")
    profile, _ = _profile(args.device)
    image = bench_image() if args.image == "builtin" else open_rgb(Path(args.image))
    runner, artifact, _ = make_runner(args.export, profile, runtime=args.runtime,
                                      threads=args.threads)
    runner.load()
    trace = runner.generate(image, args.prompt, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            on_text=lambda piece: print(piece, end="", flush=True))
    print()
    info(f"[{runner.name} on {profile.name}: {trace.prompt_tokens} prompt tokens, "
         f"TTFT {trace.ttft_s * 1e3:.0f} ms, {len(trace.tokens)} tokens"
         + (f", {trace.decode_tok_s:.1f} tok/s" if trace.decode_tok_s else "") + f", stop: {trace.stop}]")
    runner.close()
    return 0


def cmd_bench(args) -> int:
    from edgevlm.runtimes.bench import BenchConfig, bench, format_table

    if args.runs < 1 or args.warmup < 0 or args.gen_tokens < 2:
        raise UsageError("--runs must be >= 1, --warmup >= 0 and --gen-tokens >= 2",
                         "e.g. --runs 5 --warmup 1 --gen-tokens 128")
    profile, facts = _profile(args.device)
    config = BenchConfig(runs=args.runs, warmup=args.warmup, gen_tokens=args.gen_tokens,
                         threads=args.threads, runtime=args.runtime)
    results = []
    for export in args.exports:
        info(f"benchmarking {export} on {profile.name}")
        results.append(bench(export, config, profile=profile, facts=facts))
    names = [str(e).rstrip("/").removesuffix("/manifest.json") for e in args.exports]
    print(format_table(results, names))
    if args.out:
        payload = results[0].to_dict() if len(results) == 1 else {
            "results": [r.to_dict() for r in results], "names": names}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        info(f"wrote {args.out}")
    if args.plot:
        from edgevlm.runtimes.chart import bench_chart

        bench_chart(results, names, args.plot)
    return 0


COMMANDS = {"list": cmd_list, "inspect": cmd_inspect, "score": cmd_score, "prune": cmd_prune,
            "eval": cmd_eval, "export": cmd_export, "devices": cmd_devices, "run": cmd_run,
            "bench": cmd_bench}


def _quiet_libraries() -> None:
    import logging

    # The ONNX exporters log every graph pass at INFO once anything configures logging.
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    set_quiet(args.quiet)
    if args.command not in ("list", "devices", "run", "bench"):
        _quiet_libraries()
    try:
        return COMMANDS[args.command](args) or 0
    except EdgeVLMError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.what}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected library failure
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  run again with -v for the full traceback", file=sys.stderr)
        return 1
