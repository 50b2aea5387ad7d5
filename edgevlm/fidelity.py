"""How close a pruned model stays to its base on held-out samples (docs/methods.md section 7)."""

from __future__ import annotations

import copy
import math
import random
import statistics

from edgevlm.ui import progress


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def fidelity(base, pruned, samples, *, batch_size: int = 4, show_progress: bool = True) -> dict:
    """Mean KL(P_base || P_pruned) of next-token distributions and top-1 agreement at the
    last prompt position and every reference-answer position, plus the perplexity of the
    reference answers under both models."""
    import torch
    import torch.nn.functional as F

    from edgevlm.prompting import encode, model_inputs
    from edgevlm.scoring.lc import kl as kl_rows

    kl_sum, agree, positions = 0.0, 0, 0
    nll = {"base": 0.0, "pruned": 0.0}
    answer_tokens = 0
    for batch_samples in progress(list(_batches(samples, batch_size)), desc="fidelity",
                                  enabled=show_progress):
        batch = encode(base, batch_samples, with_answer=True)
        inputs = model_inputs(batch)
        with torch.no_grad():
            logp_b = F.log_softmax(base.model(**inputs).logits.float(), dim=-1)
            logp_p = F.log_softmax(pruned.model(**inputs).logits.float(), dim=-1)
        answer = batch["answer_mask"]
        # Predicting position t+1 happens at t: the last prompt token predicts the first
        # answer token, and so on; the final token predicts nothing we have.
        predicts = torch.zeros_like(answer)
        predicts[:, :-1] = answer[:, 1:]
        predicts[:, -1] = ~answer.any(dim=1)  # no answer: judge the last prompt position
        # KL(P_base || P_pruned) at the judged positions only (float64 rows)
        kl_sum += kl_rows(logp_b[predicts], logp_p[predicts]).sum().item()
        agree += (logp_b.argmax(-1) == logp_p.argmax(-1))[predicts].sum().item()
        positions += int(predicts.sum())
        targets = batch["input_ids"][:, 1:]
        mask = answer[:, 1:]
        for key, logp in (("base", logp_b), ("pruned", logp_p)):
            token_logp = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll[key] -= token_logp[mask].sum().item()
        answer_tokens += int(mask.sum())
    return {
        "kl": kl_sum / max(positions, 1),
        "top1_agreement": agree / max(positions, 1),
        "ppl_base": math.exp(nll["base"] / answer_tokens) if answer_tokens else None,
        "ppl_pruned": math.exp(nll["pruned"] / answer_tokens) if answer_tokens else None,
        "positions": positions,
        "samples": len(samples),
    }


def random_baseline(base, n_drop: int, samples, k: int, *, seed: int = 0, protected=(),
                    batch_size: int = 4, accuracy: bool = False,
                    show_progress: bool = True) -> dict:
    """Fidelity (and with `accuracy`, task accuracy) of k random plans removing n_drop
    layers: mean and spread per metric."""
    from edgevlm.accuracy import task_accuracy
    from edgevlm.loader import LoadedVLM
    from edgevlm.plan import random_plan
    from edgevlm.prune import prune_

    rng = random.Random(seed)
    text_config = base.config.get_text_config()
    n_total = base.adapter.num_layers(base.config)
    runs = []
    for _ in progress(range(k), desc="random baseline", enabled=show_progress):
        plan = random_plan(n_total, n_drop, rng, protected=protected,
                           layer_types=getattr(text_config, "layer_types", None),
                           layer_period=base.adapter.layer_period)
        candidate = LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                              adapter=base.adapter, name="random", path=base.path)
        prune_(candidate, plan)
        result = fidelity(base, candidate, samples, batch_size=batch_size, show_progress=False)
        if accuracy:
            result["accuracy"] = task_accuracy(candidate, samples)
        result["dropped"] = plan.layers
        runs.append(result)
        del candidate
    summary = {"k": k, "n_dropped": n_drop, "runs": runs}
    for key in ("kl", "top1_agreement", "ppl_pruned"):
        summary[key] = spread([r[key] for r in runs])
    if accuracy:
        summary["accuracy"] = spread([r["accuracy"]["average"] for r in runs])
        tasks = runs[0]["accuracy"]["per_task"] if runs else {}
        summary["accuracy_per_task"] = {
            t: spread([r["accuracy"]["per_task"][t] for r in runs]) for t in tasks}
    return {k: v for k, v in summary.items() if v is not None}


def spread(values) -> dict | None:
    """Mean, population sd, min and max of the non-None values (None if there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}
