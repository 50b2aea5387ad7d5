"""The stages chained: load -> score -> plan -> prune -> export. The CLI calls these."""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.types import LayerScores, PrunePlan
from edgevlm.ui import info


def calibration(spec: str, seed: int = 0):
    from edgevlm.calib import load_calibration

    calib = load_calibration(spec, seed=seed)
    if not calib.scoring:
        raise UsageError(f"calibration '{spec}' has no samples", "use --calib builtin:32")
    return calib


def score_model(vlm, calib, method: str, *, tokens: str | None = None, batch_size: int = 4,
                n_drop: int | None = None, options: dict | None = None) -> LayerScores:
    """Score (or reuse cached scores of) every decoder layer on the scoring split."""
    from edgevlm import ui
    from edgevlm.scoring import score_cached

    options = dict(options or {})
    if method == "angular" and n_drop:
        options.setdefault("n", n_drop)
    return score_cached(vlm, calib.scoring, method, calibration=calib.description, tokens=tokens,
                        batch_size=batch_size, progress=not ui.QUIET, **options)


def plan_for(vlm, scores: LayerScores, *, ratio=None, n_layers=None, protect=None,
             mode: str = "drop") -> PrunePlan:
    from edgevlm.plan import make_plan

    text_config = vlm.config.get_text_config()
    return make_plan(scores, ratio=ratio, n_layers=n_layers, protect=protect,
                     layer_types=getattr(text_config, "layer_types", None),
                     layer_period=vlm.adapter.layer_period, mode=mode)


def write_scores(out: Path, scores: LayerScores, plan: PrunePlan | None = None) -> None:
    from edgevlm.plot import plot_scores

    scores.save(out / "scores.json")
    if plan is not None:
        plan.save(out / "plan.json")
    plot_scores(scores, out / "layer_scores.png", plan.layers if plan else None)


def prune_and_save(vlm, plan: PrunePlan, out: Path) -> Path:
    from edgevlm.prune import prune_, save_pruned

    if plan.mode == "freeze":
        from edgevlm.freeze import record_

        record_(vlm, plan)
        info(f"froze visual tokens in layers {plan.layers} ({len(plan.layers)} of "
             f"{plan.n_layers}); all layers remain")
    elif plan.layers or not plan.vision:
        prune_(vlm, plan)
        info(f"removed layers {plan.layers} ({len(plan.layers)} of {plan.n_layers}); "
             f"{len(plan.kept)} remain")
    if plan.vision:
        from edgevlm.vision_cli import prune_vision

        prune_vision(vlm, PrunePlan.from_dict(plan.vision))
    return save_pruned(vlm, out / "pruned")


def compensate(vlm, plan: PrunePlan, samples, k: int, *, batch_size: int = 4) -> None:
    """SVL subspace compensation (edgevlm.compensate) for the blocks `plan` removes, made on
    the unpruned model just before they go; recorded in the plan."""
    from edgevlm.compensate import compensate_

    plan.compensation = compensate_(vlm, plan.layers, samples, k, batch_size=batch_size)
    edits = plan.compensation["edits"]
    info(f"compensated {len(edits)} removed block(s) with rank {k}: edited the MLP "
         f"down-projection of layer(s) {[e['layer'] for e in edits]}"
         + (f"; block(s) {plan.compensation['skipped']} start at layer 0, nothing precedes them"
            if plan.compensation["skipped"] else ""))


def width_prune_and_save(vlm, samples, ratio: float, out: Path, *, batch_size: int = 4):
    """Uniform width pruning (edgevlm.width): out/plan.json and out/pruned/."""
    from edgevlm.prune import save_pruned
    from edgevlm.width import prune_width_

    plan = prune_width_(vlm, samples, ratio, batch_size=batch_size)
    plan.save(Path(out) / "plan.json")
    info(f"width pruning ({plan.method}, {plan.samples} samples): {plan.summary()}")
    if plan.attention_note:
        info(f"note: {plan.attention_note}")
    return plan, save_pruned(vlm, Path(out) / "pruned")


def export_name(model: str, plan: PrunePlan | None) -> str:
    """File-name stem for an export: 'SmolVLM-256M-Instruct-bi30', 'tiny-smolvlm'."""
    stem = Path(model.replace(":", "-")).name or "model"
    if plan is None:
        return stem
    if getattr(plan, "axis", None) == "width":  # a WidthPlan: no layers, no vision plan
        return f"{stem}-width{round(plan.ratio * 100)}"
    if plan.vision:
        from edgevlm.vision_cli import export_suffix

        stem += export_suffix(plan.vision)
        if not plan.layers:
            return stem
    amount = f"{round(plan.ratio * 100)}" if plan.ratio else f"-{len(plan.layers)}layers"
    if plan.mode == "freeze":
        return f"{stem}-freeze-{plan.method}{amount}"
    return f"{stem}-{plan.method}{amount}"


def export_target(target_name: str, model_dir: Path, out: Path, *, quant: str, base_model: str,
                  verify: bool, samples, plan: PrunePlan | None = None, **kwargs):
    """Run a target's exporter into `out` and write out/manifest.json, named after
    `base_model`. The manifest's plan is the one the checkpoint's config.json records; a
    `plan` given here must be that same plan (a check, not an override)."""
    from edgevlm.targets import TARGETS

    target = TARGETS.get(target_name)
    artifact = target.export(Path(model_dir), Path(out), quant=quant, verify=verify,
                             samples=samples, **kwargs)
    if plan is not None and artifact.plan != plan:
        raise UsageError(f"the plan given ({plan.layers}) is not the one {model_dir}'s "
                         f"config.json records ({artifact.plan.layers if artifact.plan else None})",
                         "export the checkpoint that plan made")
    artifact.base_model = base_model
    artifact.save(Path(out) / "manifest.json")
    return artifact
