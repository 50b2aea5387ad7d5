"""The model-side commands: list, inspect, score, prune, eval, export."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgevlm import budget_cli, vision_cli
from edgevlm.errors import UsageError
from edgevlm.ui import info, quieted


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
        from edgevlm.runtimes.families import TABLE

        for f in TABLE:
            facts = [f"model_type {'/'.join(f.model_types)}", f"image {f.image_token}"]
            facts += [f"layer period {f.layer_period}"] if f.layer_period else []
            facts += [f"known {t} defect" for t in f.known_defects]
            gguf = f"{f.gguf_text_arch}/{f.gguf_projector}"
            print(f"{f.name:12s} {f.hf_class:36s} gguf {gguf:26s} {'; '.join(facts)}")
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
        from edgevlm.device_commands import cmd_devices

        return cmd_devices(args)
    return 0


def cmd_inspect(args) -> int:
    from edgevlm.summary import describe, format_summary

    budget_cli.early_check(args)
    summary = describe(args.model, seed=args.seed)
    cost = budget_cli.inspect_cost(args, summary["path"])
    if cost:
        summary["image_cost"] = cost
    print(json.dumps(summary, indent=2) if args.json else "\n".join(
        [format_summary(summary), *(budget_cli.format_cost(cost) if cost else [])]))
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

    if not args.method and not vision_cli.requested(args):
        raise UsageError("say what to score", "pass --method bi|angular|lc|svl and/or "
                         "--vision-method bi|kl")
    if args.method:
        SCORERS.get(args.method)
    vision_cli.early_checks(args)
    check_writable(Path(args.out), args.force)
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    scores = _score(args, vlm, calib, n_drop=_n_drop(args, vlm)) if args.method else None
    vision_scores = vision_cli.score(args, vlm, calib)
    with staged_dir(args.out, args.force) as tmp:
        if scores is not None:
            pipeline.write_scores(tmp, scores)
        vision_cli.write_scores(tmp, vision_scores)
    if scores is not None:
        _print_scores(scores)
    if vision_scores is not None:
        vision_cli.print_scores(vision_scores)
    info(f"wrote scores to {args.out}/")
    return 0


def _print_scores(scores) -> None:
    order = scores.ascending()
    print(f"{scores.method} scores (low = least important):")
    for i in range(scores.n_layers):
        print(f"  layer {i:3d}  {scores.scores[i]:.6g}  rank {order.index(i) + 1}")


def _plan(args, vlm, calib):
    """Scores + plan from --plan or from --method/--ratio (+ the vision options, whose plan
    the decoder plan carries); also returns the decoder scores."""
    scores, plan = _decoder_plan(args, vlm, calib)
    return scores, vision_cli.attach(args, vlm, calib, plan)


def _decoder_plan(args, vlm, calib):
    from edgevlm import pipeline
    from edgevlm.types import PrunePlan

    if args.plan:
        plan = PrunePlan.load(args.plan).validate()
        if getattr(args, "mode", "drop") == "freeze" and plan.mode != "freeze":
            raise UsageError(f"--mode freeze, but {args.plan} is a '{plan.mode}' plan",
                             "pass a freeze plan, or drop --mode freeze")
        return None, plan
    if not args.method and vision_cli.requested(args):
        return None, None  # the vision tower only
    if not args.method:
        raise UsageError("say how to choose layers", "pass --method bi|angular|lc|svl or --plan plan.json")
    if args.ratio is None and args.n_layers is None:
        raise UsageError("say how many layers to remove", "pass --ratio 0.3 or --n-layers N")
    n_drop = _n_drop(args, vlm)
    scores = _score(args, vlm, calib, n_drop=n_drop)
    return scores, pipeline.plan_for(vlm, scores, ratio=args.ratio, n_layers=args.n_layers,
                                     protect=args.protect, mode=getattr(args, "mode", "drop"))


def _early_checks(args) -> None:
    """Everything that can be rejected before loading a model."""
    from edgevlm.outdir import check_writable
    from edgevlm.plan import layers_to_drop
    from edgevlm.scoring import SCORERS

    if getattr(args, "method", None):
        SCORERS.get(args.method)
    if args.ratio is not None or args.n_layers is not None:
        layers_to_drop(10**6, args.ratio, args.n_layers)  # range checks only
    vision_cli.early_checks(args)
    budget_cli.early_check(args)
    _check_width_and_recovery(args)
    from edgevlm.freeze import check_args

    check_args(args)
    check_writable(Path(args.out), args.force)


def _check_width_and_recovery(args) -> None:
    """--axis width, --compensate and --recover: combinations refused before any work."""
    if getattr(args, "axis", "layers") == "width":
        from edgevlm.width import check_ratio

        if args.method or args.plan or args.n_layers is not None or args.compensate:
            raise UsageError("--axis width chooses heads and channels by Taylor importance "
                             "and takes --ratio only",
                             "drop --method/--plan/--n-layers/--compensate, or use --axis layers")
        check_ratio(args.ratio)
    if getattr(args, "compensate", None) is not None and args.compensate < 1:
        raise UsageError(f"--compensate {args.compensate} must be a rank of at least 1",
                         "e.g. --compensate 8")
    if getattr(args, "recover", None):
        from edgevlm.recovery.commands import heal_config, prepare

        if not (args.method or args.plan or args.axis == "width"):
            raise UsageError("--recover heals a pruned model, and nothing is pruned",
                             "add --method bi --ratio 0.3 (or --axis width --ratio 0.3)")
        prepare(heal_config(args, args.recover), None, None)  # options and data


def _prune_stage(args, vlm, calib, tmp: Path):
    """Prune `vlm` into tmp/pruned (layers, with optional compensation, or width) and write
    the plan; returns (plan, checkpoint folder)."""
    from edgevlm import pipeline

    if args.axis == "width":
        plan, model_dir = pipeline.width_prune_and_save(vlm, calib.scoring, args.ratio, tmp,
                                                        batch_size=args.batch_size)
        return plan, model_dir
    scores, plan = _plan(args, vlm, calib)
    k = args.compensate or (plan.compensation or {}).get("k")  # a replayed plan keeps its k
    if k:
        pipeline.compensate(vlm, plan, calib.scoring, k, batch_size=args.batch_size)
    if scores is not None:
        pipeline.write_scores(tmp, scores, plan)
    else:
        plan.save(tmp / "plan.json")
    return plan, pipeline.prune_and_save(vlm, plan, tmp)


def cmd_prune(args) -> int:
    from edgevlm import pipeline
    from edgevlm.outdir import staged_dir

    _early_checks(args)
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    with staged_dir(args.out, args.force) as tmp:
        plan, _ = _prune_stage(args, vlm, calib, tmp)
    if args.axis == "width":
        print(f"pruned model: {args.out}/pruned (width, {plan.summary()})")
        return 0
    if plan.mode == "freeze":
        print(f"frozen model: {args.out}/pruned (all {plan.n_layers} layers kept; visual tokens "
              f"frozen in {plan.layers}; edgevlm's loader and the ONNX export apply it)")
        return 0
    print(f"pruned model: {args.out}/pruned ({len(plan.kept)} of {plan.n_layers} layers kept; "
          f"removed {plan.layers}" + (f"; compensated, rank {plan.compensation['k']})"
                                       if plan.compensation else ")"))
    return 0


def cmd_eval(args) -> int:
    from edgevlm import pipeline
    from edgevlm.accuracy import task_accuracy
    from edgevlm.fidelity import fidelity, random_baseline

    k = None
    if args.baseline:
        kind, _, count = args.baseline.partition(":")
        if kind != "random" or not count.isdigit() or int(count) < 1:
            raise UsageError(f"--baseline '{args.baseline}' is not random:K", "e.g. --baseline random:5")
        k = int(count)
    calib = pipeline.calibration(args.calib, args.seed)
    samples = calib.heldout  # never the scoring part: that would judge on what chose the plan
    if not samples:
        raise UsageError(f"calibration '{args.calib}' has no held-out samples to judge on",
                         "use at least 2 samples, e.g. --calib tasks:200")
    base = _load(args, args.base)
    pruned = _load(args, args.pruned)
    with_answers = any(s.answer for s in samples)
    result = {"base": args.base, "pruned": args.pruned, "calibration": calib.description,
              "fidelity": fidelity(base, pruned, samples, batch_size=args.batch_size)}
    if with_answers:
        result["accuracy"] = {name: task_accuracy(vlm, samples, show_progress=not args.quiet)
                              for name, vlm in (("base", base), ("pruned", pruned))}
    compensation = (getattr(pruned.config, "edgevlm_plan", None) or {}).get("compensation")
    if compensation:  # the same layers removed without it, for comparison
        from edgevlm.compensate import uncompensated_twin

        twin = uncompensated_twin(base, pruned.config.edgevlm_plan)
        result["uncompensated"] = {"fidelity": fidelity(base, twin, samples,
                                                        batch_size=args.batch_size)}
        if with_answers:
            result["uncompensated"]["accuracy"] = task_accuracy(twin, samples,
                                                                show_progress=not args.quiet)
        del twin
    n_base, n_pruned = (v.adapter.num_layers(v.config) for v in (base, pruned))
    if k:
        if n_pruned >= n_base:
            raise UsageError("the pruned model has as many layers as the base",
                             "a random baseline needs a pruned model with fewer layers")
        protected = (getattr(pruned.config, "edgevlm_plan", None) or {}).get("protected", [])
        result["random_baseline"] = random_baseline(base, n_base - n_pruned, samples, k,
                                                    seed=args.seed, batch_size=args.batch_size,
                                                    accuracy=with_answers, protected=protected)
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
    if "accuracy" in result:
        _print_accuracy(result["accuracy"], rb)
    un = result.get("uncompensated")
    if un:
        u = un["fidelity"]
        print(f"without compensation (same layers removed): KL {u['kl']:.6g} (vs {f['kl']:.6g}), "
              f"top-1 agreement {u['top1_agreement']:.4f} (vs {f['top1_agreement']:.4f})"
              + (f", accuracy {un['accuracy']['average']:.3f} (vs "
                 f"{result['accuracy']['pruned']['average']:.3f})" if "accuracy" in un else ""))


def _print_accuracy(accuracy: dict, rb: dict | None) -> None:
    """Exact-match accuracy per task: base, pruned and (if run) the random plans."""
    base, pruned = accuracy["base"], accuracy["pruned"]
    random_tasks = (rb or {}).get("accuracy_per_task", {})
    print(f"accuracy (greedy answers, exact match, {base['n']} items):")
    print(f"  {'task':10s} {'base':>6s} {'pruned':>7s}" + ("   random" if rb else ""))
    rows = [(t, base["per_task"][t], pruned["per_task"][t], random_tasks.get(t))
            for t in base["per_task"]]
    rows.append(("average", base["average"], pruned["average"], (rb or {}).get("accuracy")))
    for task, b, p, r in rows:
        tail = f"   {r['mean']:.3f} ± {r['std']:.3f}" if r else ""
        print(f"  {task:10s} {b:6.3f} {p:7.3f}{tail}")


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
    pruning = vision_cli.requested(args) or args.method or args.plan or args.axis == "width"
    calib = pipeline.calibration(args.calib, args.seed)
    vlm = _load(args, args.model)
    target.check(quant, vlm.config, **options)
    budget_cli.check_model(args, vlm.path)
    samples = calib.heldout or calib.scoring
    with staged_dir(args.out, args.force) as tmp:
        plan = None
        if pruning:
            plan, model_dir = _prune_stage(args, vlm, calib, tmp)
        else:
            model_dir = vlm.path
        del vlm  # the exporter reloads the saved checkpoint as its reference
        if args.recover:  # the healed checkpoint's config.json records the recovery
            from edgevlm.recovery.commands import recover_for_export

            model_dir, _ = recover_for_export(args, model_dir, tmp)
        extra = dict(options, name=pipeline.export_name(args.model, plan)) if (
            target.name == "gguf") else options
        with quieted(native_stdout=not args.verbose):
            artifact = pipeline.export_target(
                target.name, model_dir, tmp, quant=quant, base_model=args.model, verify=not args.no_verify, samples=samples,
                progress=not args.quiet, **extra)
        budget = budget_cli.apply_to_export(args, tmp, artifact)
    print(f"exported {args.model} -> {args.out} ({target.name}, {quant})")
    for f in artifact.files:
        print(f"  {f.role:16s} {f.path}  {f.bytes / 1e6:.2f} MB")
    if artifact.parity:
        print("  verified against PyTorch: " + _parity_summary(artifact.parity))
    if budget:
        print(budget_cli.describe_budget(budget))
    fallback = artifact.quantization.get("fallback_tensors") or []
    if fallback:
        kinds = Counter(f["type"] for f in fallback)
        print(f"  note: {len(fallback)} tensors have rows that {quant} cannot block and were "
              f"stored as {', '.join(f'{t} ({n})' for t, n in kinds.items())}; "
              "see quantization.fallback_tensors in manifest.json")
    return 0


def _parity_summary(parity: dict) -> str:
    """A manifest's parity report in one line: every check with its measured value and
    tolerance (the same for both targets)."""
    from edgevlm.export.parity import ParityReport

    return ParityReport.from_dict(parity).summary()
