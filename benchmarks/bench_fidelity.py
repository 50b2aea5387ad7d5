"""Task accuracy against pruning ratio: each scorer against dropping random layers.

On the `trained:` reference models (16 decoder layers, trained on edgevlm's task set):
layers are scored on the val split and every pruned model is judged on the test split
(greedy answers, exact match), as the papers judge layer pruning. For each ratio the random
baseline is several random plans (mean ± sd).

    python benchmarks/bench_fidelity.py                     # both families, the full grid
    python benchmarks/bench_fidelity.py --families smolvlm --ratios 0.3 --random 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).parent / "results"


def pruned_copy(vlm, plan):
    from edgevlm.prune import prune_

    candidate = copy.copy(vlm)
    candidate.model = copy.deepcopy(vlm.model)
    prune_(candidate, plan)
    return candidate


def judge(base, candidate, test, base_accuracy) -> dict:
    from edgevlm.accuracy import task_accuracy
    from edgevlm.fidelity import fidelity

    accuracy = task_accuracy(candidate, test)
    close = fidelity(base, candidate, test, show_progress=False)
    return {"accuracy": accuracy, "retention": accuracy["average"] / base_accuracy["average"],
            "kl": close["kl"], "top1_agreement": close["top1_agreement"]}


def run_family(family: str, args) -> dict:
    from edgevlm.accuracy import task_accuracy
    from edgevlm.loader import load
    from edgevlm.plan import layers_to_drop, make_plan, random_plan
    from edgevlm.scoring import score
    from edgevlm.tasks import task_samples

    base = load(f"trained:{family}")
    n_total = base.adapter.num_layers(base.config)
    scoring = task_samples(args.score_items, "val")
    test = task_samples(args.test_items, "test")
    base_accuracy = task_accuracy(base, test)
    print(f"{family}: {n_total} layers, base accuracy {base_accuracy['average']:.3f}", flush=True)
    rows, scores_by_method = [], {}
    for ratio in args.ratios:
        n_drop = layers_to_drop(n_total, ratio, None)
        for method in args.methods:
            key = (method, n_drop if method == "angular" else None)
            if key not in scores_by_method:
                options = {"n": n_drop} if method == "angular" else {}
                scores_by_method[key] = score(base, scoring, method, batch_size=8,
                                              progress=False, **options)
            plan = make_plan(scores_by_method[key], ratio=ratio)
            row = {"method": method, "ratio": ratio, "dropped": plan.layers,
                   **judge(base, pruned_copy(base, plan), test, base_accuracy)}
            rows.append(row)
            print(f"  r={ratio} {method:8s} drop {plan.layers}: acc "
                  f"{row['accuracy']['average']:.3f} ({row['retention']:.1%}) kl {row['kl']:.3g}",
                  flush=True)
        rng = random.Random(args.seed)
        for k in range(args.random):
            plan = random_plan(n_total, n_drop, rng)
            row = {"method": "random", "ratio": ratio, "plan": k, "dropped": plan.layers,
                   **judge(base, pruned_copy(base, plan), test, base_accuracy)}
            rows.append(row)
        rand = [r["accuracy"]["average"] for r in rows if r["method"] == "random" and r["ratio"] == ratio]
        if rand:
                print(f"  r={ratio} random   acc {sum(rand) / len(rand):.3f} over {len(rand)} plans",
                  flush=True)
    return {"n_layers": n_total, "base_accuracy": base_accuracy,
            "scores": {f"{m}" + (f"-n{n}" if n else ""): s.scores
                       for (m, n), s in scores_by_method.items()},
            "rows": rows}


def summarize(family_result: dict, ratios, methods) -> list[dict]:
    """Per ratio and method: average accuracy and retention (random: mean and sd)."""
    import statistics

    table = []
    for ratio in ratios:
        for method in [*methods, "random"]:
            rows = [r for r in family_result["rows"] if r["method"] == method and r["ratio"] == ratio]
            if not rows:  # --random 0
                continue
            acc = [r["accuracy"]["average"] for r in rows]
            tasks = rows[0]["accuracy"]["per_task"]
            table.append({
                "ratio": ratio, "method": method, "accuracy": statistics.fmean(acc),
                "accuracy_sd": statistics.pstdev(acc) if len(acc) > 1 else None,
                "retention": statistics.fmean(r["retention"] for r in rows),
                "kl": statistics.fmean(r["kl"] for r in rows),
                "per_task": {t: statistics.fmean(r["accuracy"]["per_task"][t] for r in rows)
                             for t in tasks}})
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        res = results["families"][family]
        table = res["summary"]
        for method in results["methods"]:
            pts = [(r["ratio"], r["accuracy"]) for r in table if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        rnd = [r for r in table if r["method"] == "random"]
        xs = [r["ratio"] for r in rnd]
        mean = [r["accuracy"] for r in rnd]
        sd = [r["accuracy_sd"] or 0.0 for r in rnd]
        ax.fill_between(xs, [m - s for m, s in zip(mean, sd, strict=True)],
                        [m + s for m, s in zip(mean, sd, strict=True)], color="grey", alpha=0.3,
                        label="random (mean ± sd)")
        ax.plot(xs, mean, color="grey", linestyle=":")
        ax.axhline(res["base_accuracy"]["average"], color="black", linestyle="--", label="unpruned")
        ax.set_title(f"trained:{family} ({res['n_layers']} layers)")
        ax.set_xlabel("share of decoder layers removed")
        ax.set_ylabel("task accuracy (test split, average)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["smolvlm", "qwen2-vl"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--methods", nargs="+", default=["bi", "angular", "lc", "svl"])
    parser.add_argument("--random", type=int, default=5, help="random plans per ratio")
    parser.add_argument("--score-items", type=int, default=64, help="val-split items to score on")
    parser.add_argument("--test-items", type=int, default=240, help="test-split items to judge on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--out", type=Path, default=RESULTS / "fidelity.json")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    results = {"command": "python benchmarks/bench_fidelity.py " + " ".join(argv or []),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "methods": args.methods, "ratios": args.ratios, "random_plans": args.random,
               "score_items": args.score_items, "test_items": args.test_items, "families": {}}
    for family in args.families:
        res = run_family(family, args)
        res["summary"] = summarize(res, args.ratios, args.methods)
        results["families"][family] = res
    results["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
