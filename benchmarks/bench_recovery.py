"""Recovery after pruning: task-accuracy retention of pruned `trained:` models, without
recovery, with SVL subspace compensation, and after each `edgevlm heal` recipe.

Retention = pruned accuracy / unpruned accuracy (average over the task set's 8 tasks, greedy
answers, exact match) on a fixed slice of test-split items (--eval-items, the same for every
row). Layers are chosen by BI on val-split items; the random-layer baseline removes as many
random layers (--random-plans). Width pruning removes the same share of decoder-layer
parameters as layer pruning at each --width-at ratio.

The grid, per model:
  every ratio:   none, random layers, compensation (k=8), and every --recipes x --fractions
                 (--fraction-recipes: only those at every fraction, the others at --fraction)
  width:         at each --width-at: none; at --focus-ratio also --width-recipes at --fraction
Every recovery run trains the same budget (--steps x --batch-size items): the fraction sets
how many distinct training items those steps draw from (of the task set's 20,000-item train
split), not how long training runs. Torch runs on --threads threads (1 by default: on a
shared 2-core machine more threads are far slower).

    python benchmarks/bench_recovery.py                     # both trained models, full grid
    python benchmarks/bench_recovery.py --models tiny:smolvlm --steps 4 --eval-items 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(value) -> str:
    """A retention as a percentage; n/a where the base model scores zero (random weights)."""
    return "n/a" if value is None else f"{value:.1%}"


def _copy(vlm):
    from edgevlm.loader import LoadedVLM

    return LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)


def _accuracy(vlm, samples) -> dict:
    from edgevlm.accuracy import task_accuracy

    return task_accuracy(vlm, samples, batch_size=32)


def _retention(acc: dict, base: dict) -> dict:
    return {"average": acc["average"] / base["average"] if base["average"] else None,
            "per_task": {t: (v / base["per_task"][t] if base["per_task"][t] else None)
                         for t, v in acc["per_task"].items()}}


def width_ratio_matching(vlm, target: float) -> float:
    """The --ratio of uniform width pruning that removes the share `target` of decoder-layer
    parameters, by counting the q/k/v/o and gate/up/down weights it would remove."""
    text = vlm.config.get_text_config()
    layer = vlm.adapter.layers(vlm.model)[0]
    attn, hidden = layer.self_attn, int(text.hidden_size)
    heads, kv, hd = int(text.num_attention_heads), int(text.num_key_value_heads), attn.head_dim
    inter = int(text.intermediate_size)
    total = sum(p.numel() for p in layer.parameters())
    from edgevlm.width import heads_prunable

    prunable = heads_prunable(vlm)

    def removed(r):
        groups = min(round(r * kv), kv - 1) if prunable else 0
        channels = min(round(r * inter), inter - 1)
        per_group = hidden * hd * (heads // kv) * 2 + hidden * hd * 2
        return (groups * per_group + channels * 3 * hidden) / total

    candidates = [i / 100 for i in range(1, 100)]
    return min(candidates, key=lambda r: (abs(removed(r) - target), r))


class Bench:
    def __init__(self, args, name: str):
        from edgevlm.calib import load_calibration
        from edgevlm.loader import load
        from edgevlm.tasks import task_samples

        self.args, self.name = args, name
        self.base = load(name)
        self.test = task_samples(args.eval_items, "test", 0)
        self.calib = load_calibration(f"tasks:{args.calib_items}", seed=0)  # val split
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
        self.rows: list[dict] = []
        self.base_acc = _accuracy(self.base, self.test)

    def row(self, **fields) -> dict:
        acc = fields.pop("accuracy")
        row = {"model": self.name, **fields, "accuracy": acc,
               "retention": _retention(acc, self.base_acc)}
        self.rows.append(row)
        r = row["retention"]["average"]
        print(f"  {row['axis']:6s} {row.get('ratio')!s:5s} {row['variant']:26s} "
              f"acc {acc['average']:.3f}  retention {_pct(r)}"
              + (f"  train {row['train_seconds']:.0f} s" if row.get("train_seconds") else ""),
              flush=True)
        return row

    def layer_plan(self, ratio: float):
        from edgevlm import pipeline

        scores = pipeline.score_model(self.base, self.calib, "bi", batch_size=8)
        return pipeline.plan_for(self.base, scores, ratio=ratio)

    def pruned(self, plan, k: int | None = None):
        from edgevlm.compensate import compensate_
        from edgevlm.prune import prune_

        vlm = _copy(self.base)
        if k:
            plan = copy.deepcopy(plan)
            plan.compensation = compensate_(vlm, plan.layers, self.calib.scoring, k, batch_size=8)
        prune_(vlm, plan)
        return vlm

    def healed(self, vlm, recipe: str, fraction: float) -> tuple[dict, dict]:
        """Save `vlm`, heal it with the base as teacher, evaluate the saved result (reloaded,
        as users get it). Returns (accuracy, heal record without the loss curve)."""
        from edgevlm.loader import load
        from edgevlm.prune import save_pruned
        from edgevlm.recovery.data import training_data
        from edgevlm.recovery.heal import HealConfig, heal
        from edgevlm.runtimes.measure import RssSampler

        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        save_pruned(vlm, folder / "pruned")
        student = load(str(folder / "pruned"))
        config = HealConfig(recipe, "tasks", fraction=fraction, steps=self.args.steps,
                            batch_size=self.args.batch_size, lr=self.args.lr, seed=0)
        data = training_data("tasks", fraction, seed=0)
        from edgevlm.runtimes.measure import current_rss_mb

        before = current_rss_mb()
        with RssSampler() as rss:
            record = heal(student, self.base, config, data, folder / "healed",
                          show_progress=False)
        record.pop("losses")
        record["peak_rss_mb"] = rss.peak_mb
        record["rss_before_mb"] = before
        return _accuracy(load(str(folder / "healed")), self.test), record

    def heal_row(self, vlm, axis, ratio, recipe, fraction, extra=None):
        acc, record = self.healed(vlm, recipe, fraction)
        return self.row(axis=axis, ratio=ratio, variant=f"{recipe} {fraction:.0%}",
                        recipe=recipe, fraction=fraction, accuracy=acc,
                        train_seconds=record["seconds"], peak_rss_mb=record["peak_rss_mb"],
                        train_rss_increase_mb=(record["peak_rss_mb"] - record["rss_before_mb"]
                                               if record["rss_before_mb"] else None),
                        peak_gpu_memory_mb=record.get("peak_gpu_memory_mb"),
                        lr=record["lr"], steps=record["steps"],
                        loss_first=record["loss_first"], loss_last=record["loss_last"],
                        **(extra or {}))


def run_model(args, name: str, save=None) -> dict:
    import random

    from edgevlm.plan import random_plan
    from edgevlm.prune import prune_

    started = time.time()
    bench = Bench(args, name)
    n_layers = bench.base.adapter.num_layers(bench.base.config)
    print(f"{name}: base accuracy {bench.base_acc['average']:.3f} on {bench.base_acc['n']} "
          f"test items", flush=True)
    result = {"model": name, "layers": n_layers, "base_accuracy": bench.base_acc,
              "rows": bench.rows}

    def saved():
        result["seconds"] = round(time.time() - started, 1)
        if save:
            save(result)

    for ratio in args.ratios:
        plan = bench.layer_plan(ratio)
        extra = {"dropped": plan.layers}
        bench.row(axis="layers", ratio=ratio, variant="none", accuracy=_accuracy(
            bench.pruned(plan), bench.test), **extra)
        rng = random.Random(0)
        runs = []
        for _ in range(args.random_plans):
            rplan = random_plan(n_layers, len(plan.layers), rng)
            vlm = _copy(bench.base)
            prune_(vlm, rplan)
            runs.append((_accuracy(vlm, bench.test), rplan.layers))
        if runs:
            mean = {"average": statistics.fmean(a["average"] for a, _ in runs),
                    "n": runs[0][0]["n"],
                    "per_task": {t: statistics.fmean(a["per_task"][t] for a, _ in runs)
                                 for t in runs[0][0]["per_task"]}}
            bench.row(axis="layers", ratio=ratio, variant=f"random layers (mean of {len(runs)})",
                      accuracy=mean, random_plans=[d for _, d in runs],
                      random_averages=[a["average"] for a, _ in runs])
        bench.row(axis="layers", ratio=ratio, variant=f"compensation k={args.k}",
                  accuracy=_accuracy(bench.pruned(plan, args.k), bench.test), k=args.k, **extra)
        saved()
        for recipe in args.recipes:
            every = args.fraction_recipes is None or recipe in args.fraction_recipes
            for fraction in args.fractions if every else [args.fraction]:
                bench.heal_row(bench.pruned(plan), "layers", ratio, recipe, fraction, extra)
                saved()
    if args.width_at:
        from edgevlm.width import prune_width_

        for at in args.width_at:
            target = round(at * n_layers) / n_layers
            r = width_ratio_matching(bench.base, target)
            vlm = _copy(bench.base)
            wplan = prune_width_(vlm, bench.calib.scoring, r)
            p = wplan.parameters
            extra = {"width_ratio": r, "parameter_reduction": 1 - p["after"] / p["before"],
                     "target_reduction": target, "width": wplan.config_record()}
            bench.row(axis="width", ratio=at, variant="none", accuracy=_accuracy(vlm, bench.test),
                      **extra)
            for recipe in args.width_recipes if at == args.focus_ratio else []:
                bench.heal_row(vlm, "width", at, recipe, args.fraction, extra)
            saved()
    saved()
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    fraction = results["config"]["fraction"]
    styles = {f: ls for f, ls in zip(sorted(results["config"]["fractions"]), [":", "-", "--"], strict=False)}

    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in model["rows"] if r["axis"] == "layers"]
        colours = {}
        keys = dict.fromkeys((r.get("recipe") or r["variant"], r.get("fraction")) for r in rows)
        for key, frac in keys:
            pts = sorted((r["ratio"], 100 * (r["retention"]["average"] or 0)) for r in rows
                         if (r.get("recipe") or r["variant"]) == key and r.get("fraction") == frac)
            colour = colours.get(key)
            label = key if frac is None else f"{key} {frac:.0%}"
            (line,) = ax.plot(*zip(*pts, strict=True), marker="o" if frac in (None, fraction) else ".",
                              ls=styles.get(frac, "-") if frac is not None else "-",
                              lw=1.8 if frac in (None, fraction) else 0.9, color=colour,
                              label=label)
            colours[key] = line.get_color()
        for r in model["rows"]:
            if r["axis"] == "width":
                ax.scatter([r["ratio"]], [100 * (r["retention"]["average"] or 0)], marker="x", s=60,
                           label=f"width ({r['parameter_reduction']:.0%} of layer params), "
                                 f"{r['variant']}")
        ax.axhline(95, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{model['model']} (unpruned accuracy {model['base_accuracy']['average']:.3f})")
        ax.set_xlabel("share of decoder layers removed (width: same parameters)")
        ax.set_ylabel("retention, % of unpruned accuracy")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(r) -> str:
    return f"{_pct(r['retention']['average'])}" if r else "-"


def table(results: dict) -> str:
    """Per model: retention (% of the unpruned average accuracy) per ratio and recovery, one
    column per data fraction; training seconds and peak RSS at the main fraction."""
    config = results["config"]
    fractions, main_f = config["fractions"], config["fraction"]
    out = []
    for model in results["models"]:
        rows = model["rows"]
        out.append(f"`{model['model']}` (unpruned accuracy "
                   f"{model['base_accuracy']['average']:.3f}, {model['base_accuracy']['n']} test items)")
        out.append("")
        out.append("| pruning | recovery | " + " | ".join(f"{f:.0%} data" for f in fractions)
                   + f" | train s ({main_f:.0%}) | peak RSS MB ({main_f:.0%}) |")
        out.append("|---|---|" + "---|" * len(fractions) + "---|---|")
        seen = []
        for r in rows:
            key = (r["axis"], r["ratio"], r.get("recipe") or r["variant"])
            if key in seen:
                continue
            seen.append(key)
            group = [x for x in rows if (x["axis"], x["ratio"], x.get("recipe") or x["variant"])
                     == key]
            what = (f"{r['ratio']:.0%} of layers" if r["axis"] == "layers"
                    else f"width, {r['parameter_reduction']:.0%} of layer params")
            if not r.get("recipe"):
                cells = [_cell(r)] * len(fractions) if r["axis"] == "layers" else \
                    [_cell(r)] * len(fractions)
                out.append(f"| {what} | {r['variant']} | " + " | ".join(cells) + " | - | - |")
                continue
            by_f = {x["fraction"]: x for x in group}
            m = by_f.get(main_f)
            secs = f"{m['train_seconds']:.0f}" if m else "-"
            rss = f"{m['peak_rss_mb']:.0f}" if m and m.get("peak_rss_mb") else "-"
            out.append(f"| {what} | {r['recipe']} | "
                       + " | ".join(_cell(by_f.get(f)) for f in fractions) + f" | {secs} | {rss} |")
        out.append("")
    return "\n".join(out)


def task_table(results: dict, ratio: float) -> str:
    """Per-task retention at one ratio, main fraction."""
    main_f = results["config"]["fraction"]
    out = []
    for model in results["models"]:
        tasks = sorted(model["base_accuracy"]["per_task"])
        out.append(f"`{model['model']}`, {ratio:.0%} of layers removed (recipes on "
                   f"{main_f:.0%} of the data): accuracy per task (retention)")
        out.append("")
        out.append("| recovery | " + " | ".join(tasks) + " | average |")
        out.append("|---|" + "---|" * (len(tasks) + 1))
        base = model["base_accuracy"]
        out.append("| (unpruned) | " + " | ".join(f"{base['per_task'][t]:.2f}" for t in tasks)
                   + f" | {base['average']:.3f} |")
        for r in model["rows"]:
            if r["axis"] != "layers" or r["ratio"] != ratio or r.get("fraction") not in (None, main_f):
                continue
            acc = r["accuracy"]
            out.append(f"| {r.get('recipe') or r['variant']} | "
                       + " | ".join(f"{acc['per_task'][t]:.2f}" for t in tasks)
                       + f" | {acc['average']:.3f} ({_pct(r['retention']['average'])}) |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["trained:smolvlm", "trained:qwen2-vl"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--recipes", nargs="+",
                        default=["projector", "sft", "sft+hidden-kd", "logit-kd"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--fraction-recipes", nargs="*", default=None,
                        help="recipes run at every --fractions (default: all); the others at "
                             "--fraction only")
    parser.add_argument("--fraction", type=float, default=0.05,
                        help="the main fraction (width recovery, table columns)")
    parser.add_argument("--width-at", type=float, nargs="*", default=[0.2, 0.3, 0.4],
                        help="width pruning removing the parameters of these layer ratios")
    parser.add_argument("--width-recipes", nargs="*", default=["sft+hidden-kd"],
                        help="recipes run on the width-pruned model at --focus-ratio, --fraction")
    parser.add_argument("--focus-ratio", type=float, default=0.3,
                        help="width recovery and the per-task table")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="merge result files of separate runs (one per model) into --out")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: heal's")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--random-plans", type=int, default=3)
    parser.add_argument("--eval-items", type=int, default=160, help="test-split items")
    parser.add_argument("--calib-items", type=int, default=32, help="val-split items (BI, k)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=RESULTS / "recovery.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "recovery.png")
    args = parser.parse_args(argv)

    import torch

    from edgevlm.ui import set_quiet

    torch.set_num_threads(args.threads)
    set_quiet(True)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        models: dict[str, dict] = {}  # rows of one model from several runs join, in order
        for part in parts:
            for m in part["models"]:
                if m["model"] in models:
                    if m["base_accuracy"] != models[m["model"]]["base_accuracy"]:
                        raise SystemExit(f"{m['model']}: runs evaluated different test items")
                    models[m["model"]]["rows"] += m["rows"]
                else:
                    models[m["model"]] = copy.deepcopy(m)
        order = {r: i for i, r in enumerate(sorted({r["ratio"] for m in models.values()
                                                    for r in m["rows"]}))}
        for m in models.values():  # layers by ratio, then width; runs keep their row order
            m["rows"].sort(key=lambda r: (r["axis"] != "layers", order[r["ratio"]]))
        results = dict(parts[0], models=list(models.values()),
                       runs=[{"command": part.get("command"), "config": part["config"],
                              "seconds": part.get("seconds")} for part in parts])
        results["config"] = dict(results["config"],
                                 ratios=sorted({r for part in parts
                                                for r in part["config"]["ratios"]}))
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.plot)
        print(table(results))
        print(task_table(results, results["config"]["focus_ratio"]))
        return 0
    started = time.time()
    results = {"config": vars(args) | {"out": str(args.out), "plot": str(args.plot)},
               "command": "python benchmarks/bench_recovery.py " + " ".join(argv or sys.argv[1:]),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"{os.cpu_count()} cores",
               "torch": torch.__version__, "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(model_result):  # rewritten after every row: partial results survive
        done = [m for m in results["models"] if m["model"] != model_result["model"]]
        results["models"] = done + [model_result]
        results["seconds"] = round(time.time() - started, 1)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for name in args.models:
        save(run_model(args, name, save))
    plot(results, args.plot)
    print(table(results))
    print(task_table(results, args.focus_ratio))
    print(f"wrote {args.out} and {args.plot} in {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
