"""The recovery recipes (docs/methods.md section 5): which modules train and what loss they minimise.

  projector      cross-entropy on answer tokens; only the multimodal projector trains
  sft            cross-entropy on answer tokens
  sft+hidden-kd  0.5 * MSE(student final hidden, teacher final hidden) + 0.5 * CE
  logit-kd       KL(teacher || student) of next-token distributions at temperature 2
                 (times T², the usual gradient scale), + ce_weight * CE

"Final hidden" is the output of the decoder's final norm, what the lm_head reads, on every
real (non-padding) token. Logit KD covers the same tokens, so it needs no answers unless
ce_weight > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UsageError
from edgevlm.registry import Registry

KD_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    ce: float  # weight of answer cross-entropy
    hidden_kd: float = 0.0  # weight of final-hidden MSE to the teacher
    logit_kd: float = 0.0  # weight of temperature-T logit KL to the teacher
    train: str = "decoder"  # default trainable part: decoder | projector | all
    fixed_train: bool = False  # the recipe is defined by what it trains

    @property
    def needs_teacher(self) -> bool:
        return bool(self.hidden_kd or self.logit_kd)


RECIPES: Registry[Recipe] = Registry("recovery recipe")
for _r in (
    Recipe("projector", "train the multimodal projector only (CE on answers)", ce=1.0,
           train="projector", fixed_train=True),
    Recipe("sft", "supervised fine-tuning (CE on answers)", ce=1.0),
    Recipe("sft+hidden-kd", "0.5 MSE to the teacher's final hidden states + 0.5 CE", ce=0.5,
           hidden_kd=0.5),
    Recipe("logit-kd", f"KL to the teacher's logits at T={KD_TEMPERATURE:g} (+ --ce-weight CE)",
           ce=0.0, logit_kd=1.0),
):
    RECIPES.add(_r.name, _r)


def recipe_with(name: str, ce_weight: float | None) -> Recipe:
    """The named recipe, with logit-kd's optional CE weight applied."""
    from dataclasses import replace

    recipe = RECIPES.get(name)
    if ce_weight is None:
        return recipe
    if recipe.name != "logit-kd":
        raise UsageError(f"--ce-weight applies to --recipe logit-kd, not {recipe.name}",
                         "drop --ce-weight, or use --recipe logit-kd")
    if ce_weight < 0:
        raise UsageError(f"--ce-weight {ce_weight} is negative", "use 0 or more, e.g. 0.5")
    return replace(recipe, ce=ce_weight)


class FinalHidden:
    """Records the output of a model's final decoder norm during forwards (a forward hook)."""

    def __init__(self, vlm):
        self.value = None
        self._handle = vlm.adapter.final_norm(vlm.model).register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.value = out

    def remove(self) -> None:
        self._handle.remove()


def make_loss(recipe: Recipe, student, teacher=None):
    """loss_fn(samples) -> scalar tensor for edgevlm.training.fit, and a `parts` dict that
    holds the last step's terms (for the progress bar and the record)."""
    import torch
    import torch.nn.functional as F

    from edgevlm.prompting import encode, model_inputs
    from edgevlm.training import answer_loss

    student_hidden = FinalHidden(student) if recipe.hidden_kd else None
    teacher_hidden = FinalHidden(teacher) if recipe.hidden_kd else None
    parts: dict[str, float] = {}

    def loss_fn(samples):
        with_answer = all(s.answer for s in samples)
        batch = encode(student, samples, with_answer=with_answer, answer_eos=with_answer)
        inputs = model_inputs(batch)
        logits = student.model(**inputs).logits
        total = logits.new_zeros(())
        if recipe.ce:
            ce = answer_loss(logits, batch)
            parts["ce"] = ce.item()
            total = total + recipe.ce * ce
        if recipe.needs_teacher:
            real = inputs["attention_mask"].bool()
            teacher_inputs = {k: v.to(teacher.model.device) for k, v in inputs.items()}
            with torch.no_grad():
                teacher_logits = teacher.model(**teacher_inputs).logits
            if recipe.hidden_kd:
                h_s = student_hidden.value[real].float()
                h_t = teacher_hidden.value.to(h_s.device)[real].float()
                mse = F.mse_loss(h_s, h_t)
                parts["hidden_mse"] = mse.item()
                total = total + recipe.hidden_kd * mse
            if recipe.logit_kd:
                t = KD_TEMPERATURE
                log_p_s = F.log_softmax(logits[real].float() / t, dim=-1)
                log_p_t = F.log_softmax(teacher_logits.to(logits.device)[real].float() / t, dim=-1)
                kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t
                parts["kl"] = kl.item()
                total = total + recipe.logit_kd * kl
        return total

    def close():
        for hook in (student_hidden, teacher_hidden):
            if hook is not None:
                hook.remove()

    return loss_fn, parts, close
