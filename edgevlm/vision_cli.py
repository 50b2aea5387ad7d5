"""The vision-tower options of `score`, `prune` and `export` (--vision-method,
--vision-ratio, --vision-layers) and what the commands do with them."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.ui import info


def add_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("vision tower (docs/methods.md section 8)")
    group.add_argument("--vision-method", default=None,
                       help="score vision layers: bi (patch-token BI, default) or kl (end-to-end "
                            "KL when a layer is skipped; one model forward per layer)")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--vision-ratio", type=float, help="fraction of vision layers to remove")
    amount.add_argument("--vision-layers", type=int, help="number of vision layers to remove")


def requested(args) -> bool:
    return any(getattr(args, k, None) is not None
               for k in ("vision_method", "vision_ratio", "vision_layers"))


def _amount_given(args) -> bool:
    return args.vision_ratio is not None or args.vision_layers is not None


def early_checks(args) -> None:
    """What can be rejected before loading a model."""
    from edgevlm.plan import layers_to_drop
    from edgevlm.scoring.vision import VISION_SCORERS

    if not requested(args):
        return
    VISION_SCORERS.get(args.vision_method or "bi")
    if _amount_given(args):
        layers_to_drop(10**6, args.vision_ratio, args.vision_layers)  # range checks only


def score(args, vlm, calib):
    """Vision-layer scores on the scoring split, or None when no vision option was given."""
    from edgevlm import ui
    from edgevlm.scoring.vision import score_vision

    if not requested(args):
        return None
    return score_vision(vlm, calib.scoring, args.vision_method or "bi",
                        batch_size=args.batch_size, progress=not ui.QUIET,
                        calibration=calib.description)


def plan(args, vlm, calib):
    """(vision scores, vision plan) from the options, (None, None) when none was given.
    Must run on the unpruned model (before the decoder is pruned)."""
    from edgevlm.vision_prune import make_vision_plan

    if not requested(args):
        return None, None
    if not _amount_given(args):
        raise UsageError("say how many vision layers to remove",
                         "pass --vision-ratio 0.25 or --vision-layers N")
    scores = score(args, vlm, calib)
    return scores, make_vision_plan(scores, vlm.config, ratio=args.vision_ratio,
                                    n_layers=args.vision_layers)


def write_scores(out: Path, scores) -> None:
    """vision_scores.json and vision_layer_scores.png (`edgevlm score`)."""
    from edgevlm.plot import plot_scores

    if scores is None:
        return
    scores.save(Path(out) / "vision_scores.json")
    plot_scores(scores, Path(out) / "vision_layer_scores.png")


def attach(args, vlm, calib, decoder_plan):
    """The decoder plan carrying the vision plan (PrunePlan.vision); a plan that removes no
    decoder layer when only vision options were given. Runs before anything is pruned."""
    from edgevlm.types import PrunePlan

    _, vision_plan = plan(args, vlm, calib)
    if vision_plan is None:
        return decoder_plan
    if decoder_plan is None:
        decoder_plan = PrunePlan(method="none", n_layers=vlm.adapter.num_layers(vlm.config),
                                 layers=[])
    decoder_plan.vision = vision_plan.to_dict()
    return decoder_plan


def export_suffix(vision_plan: dict) -> str:
    """'-vision-bi25' / '-vision-kl-3layers' for export file names."""
    ratio = vision_plan.get("ratio")
    amount = f"{round(ratio * 100)}" if ratio else f"-{len(vision_plan['layers'])}layers"
    return f"-{vision_plan['method']}{amount}"


def print_scores(scores) -> None:
    order = scores.ascending()
    print(f"{scores.method} scores (low = least important):")
    for i in range(scores.n_layers):
        print(f"  vision layer {i:3d}  {scores.scores[i]:.6g}  rank {order.index(i) + 1}")


def prune_vision(vlm, vision_plan) -> None:
    from edgevlm.vision_prune import prune_vision_

    prune_vision_(vlm, vision_plan)
    info(f"removed vision layers {vision_plan.layers} ({len(vision_plan.layers)} of "
         f"{vision_plan.n_layers}); {len(vision_plan.kept)} remain")
