"""Parity of an export with the PyTorch model it came from: the one PyTorch reference, the
tolerances per precision, and the report that goes into manifest.json (`parity`).

Both targets measure against `torch_reference` (the same chat encoding, EOS ignored so every
step is compared) and return a `ParityReport`: every check with its name, value, tolerance
and whether it passed; the CLI prints them the same way for both.

Errors are max |export - PyTorch| divided by max(1, max |PyTorch|): logits and features scale
with their magnitude, so the bound does too. Agreements are shares of positions whose argmax
equals PyTorch's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from edgevlm.errors import VerificationError
from edgevlm.types import JsonMixin


@dataclass(frozen=True)
class Tolerance:
    """What a decoder at one precision must reach against the fp32 PyTorch model (None:
    measured and recorded, never failed).

    logits: error bound on logits; top1: share of text positions whose argmax agrees; greedy:
    share of greedy steps with the image (teacher-forced along PyTorch's greedy tokens) whose
    argmax agrees. Quantized bounds sit well below what the tiny and full-size random models
    measure, and far above a broken file (wrong layout: agreement ~ 1/vocab). Random weights
    give near-tied logits, so 4-bit argmax agreement there is low (q4_0 on the hidden-64 tiny
    SmolVLM: greedy 0.19); the logits bound is the sharp check: it implies every pick is
    within twice the bound of PyTorch's best.
    """

    logits: float | None
    top1: float | None
    greedy: float | None


# Decoder precision -> bounds. "f32" is also the ONNX fp32 graphs (quant "none"), whose
# greedy tokens must all be equal. ONNX int8 / q4 decoders are measured, not failed:
# quantization changes tokens, and onnxruntime's kernels are not a file format to check.
TOLERANCES = {
    "f32": Tolerance(1e-3, 1.0, 1.0),
    "f16": Tolerance(1e-2, 0.9, 0.9),
    "bf16": Tolerance(5e-2, 0.8, 0.8),
    "q8_0": Tolerance(5e-2, 0.8, 0.8),
    "q6_k": Tolerance(0.2, 0.5, 0.3),
    "q5_k_m": Tolerance(0.3, 0.4, 0.2),
    "q4_0": Tolerance(0.6, 0.3, 0.1),
    "q4_k_m": Tolerance(0.6, 0.3, 0.1),
    "q4_k_s": Tolerance(0.6, 0.3, 0.1),
    "q3_k_m": Tolerance(1.0, 0.2, 0.05),
    "int8": Tolerance(None, None, None),
    "q4": Tolerance(None, None, None),
}
# Image features (vision encoder + projector) at the vision file's precision. llama.cpp runs
# patch convolutions in F16: relative error ~2^-11 whatever the scale.
IMAGE_TOLERANCES = {"f32": 1e-3, "f16": 5e-3, "q8_0": 5e-2, "int8": None}
# Greedy steps see the image features, so a lower-precision mmproj also bounds greedy
# agreement: at most f16's (0.9) or q8_0's (0.8).
IMAGE_GREEDY = {"f16": TOLERANCES["f16"].greedy, "q8_0": TOLERANCES["q8_0"].greedy}
# A family whose llama.cpp text RMSNorm defect goes undetected holds its f32 logits to its
# table entry's gguf_f32_logits_tol instead (runtimes/families.py; gguf_export/verify.py).
# The ONNX ShortV freeze prefill graph (fp32) against the PyTorch freeze forward: its
# last-position logits are held to TOLERANCES["f32"].logits, every layer's KV cache to this.
KV_TOLERANCES = {"f32": 1e-3}
# ONNX quantization names -> precision rows above.
ONNX_PRECISION = {"none": "f32", "int8": "int8", "q4": "q4"}


@dataclass
class Check(JsonMixin):
    """One comparison: `value` against `tolerance` (`op` "<=" for errors, ">=" for
    agreements); tolerance None records the value without failing."""

    name: str
    value: float
    tolerance: float | None
    op: str = "<="
    passed: bool = True

    @classmethod
    def of(cls, name: str, value: float, op: str, tolerance: float | None) -> Check:
        value = float(value)
        ok = tolerance is None or (value <= tolerance if op == "<=" else value >= tolerance)
        return cls(name=name, value=value, tolerance=tolerance, op=op, passed=bool(ok))

    def describe(self) -> str:
        bound = "recorded" if self.tolerance is None else f"{self.op} {self.tolerance:.3g}"
        return f"{self.name} {self.value:.3g} ({bound}{'' if self.passed else ', FAILED'})"


@dataclass
class ParityReport(JsonMixin):
    """manifest.parity: what was compared and how it came out. `measured` holds each
    target's headline figures (max differences, token lists) beside the checks."""

    target: str
    samples: int
    checks: list[Check] = field(default_factory=list)
    reference: str = "pytorch"
    measured: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def add(self, name: str, value: float, op: str, tolerance: float | None) -> Check:
        check = Check.of(name, value, op, tolerance)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict:
        # The measured figures sit beside the checks, at the top level of manifest.parity.
        return {**self.measured, "target": self.target, "samples": self.samples,
                "reference": self.reference, "passed": self.passed,
                "checks": [c.to_dict() for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict) -> ParityReport:
        own = {"target", "samples", "reference", "checks"}
        return cls(target=data["target"], samples=data["samples"],
                   reference=data.get("reference", "pytorch"),
                   checks=[Check.from_dict(c) for c in data.get("checks", [])],
                   measured={k: v for k, v in data.items() if k not in own | {"passed"}})

    def summary(self) -> str:
        """The CLI's line: every check with its value and tolerance."""
        return (f"{self.samples} held-out sample(s): "
                + "; ".join(c.describe() for c in self.checks))

    def raise_if_failed(self, what: str, fix: str) -> None:
        failed = [c for c in self.checks if not c.passed]
        if failed:
            raise VerificationError(f"{what}: " + "; ".join(c.describe() for c in failed), fix)


def scaled_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want| / max(1, max |want|), max |got - want|)."""
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    return diff / max(1.0, float(np.abs(want).max())), diff


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def torch_reference(vlm, sample, gen_tokens: int, image=None) -> dict:
    """What PyTorch computes for one sample (its image replaced by `image` if given): the
    chat-encoded inputs (numpy), the image-token mask, the image features at the image-token
    positions, last-position prefill logits, and `gen_tokens` greedy tokens with EOS ignored
    (every step is compared); `grid` is Qwen-VL's (rows, cols) of merged patches or None."""
    import torch

    from edgevlm.prompting import encode, model_inputs

    if image is not None:
        sample = dataclasses.replace(sample, image=image)
    batch = model_inputs(encode(vlm, [sample]))
    model = vlm.model
    captured = {}
    hook = vlm.adapter.text_stack(model).register_forward_pre_hook(
        lambda _m, _a, kw: captured.update(embeds=kw.get("inputs_embeds")), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**batch).logits[0, -1].float().numpy()
    finally:
        hook.remove()
    mask = vlm.adapter.visual_mask(batch["input_ids"], vlm.config)[0]
    features = captured["embeds"][0][mask].float().numpy() if bool(mask.any()) else None
    gen = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    gen.eos_token_id = []  # None falls back to the model's EOS; [] really disables it
    gen.do_sample, gen.max_new_tokens, gen.min_new_tokens = False, gen_tokens, None
    if gen.pad_token_id is None:
        gen.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(**batch, generation_config=gen)
    ids = batch["input_ids"][0].tolist()
    grid = None
    if "image_grid_thw" in batch:  # Qwen-VL: image positions are (t, row, col) M-RoPE sections
        merge = int(getattr(vlm.config.vision_config, "spatial_merge_size", 2))
        _t, rows, cols = (int(v) for v in batch["image_grid_thw"][0])
        grid = (rows // merge, cols // merge)
    return {"inputs": {k: v.numpy() for k, v in batch.items() if hasattr(v, "numpy")},
            "ids": ids, "mask": mask.tolist(), "features": features, "logits": logits,
            "tokens": out[0, len(ids):].tolist(), "grid": grid}


def runner_shortfall(vlm, ref: dict, got: list[int]) -> float:
    """PyTorch on the reference prompt followed by a runner's greedy tokens `got`, teacher-
    forced: the largest gap between its best logit and the logit of the runner's token, over
    max(1, |best|). 0 when every token is PyTorch's own pick; random weights tie logits, so a
    pick within float error of the best is not a disagreement, where exact equality would
    test float noise."""
    import torch

    batch = {k: torch.from_numpy(v) for k, v in ref["inputs"].items()}
    n = batch["input_ids"].shape[1]
    tail = torch.tensor([got[:-1]], dtype=batch["input_ids"].dtype)
    for key, value in list(batch.items()):  # every per-token tensor grows by the tokens fed
        if value.dim() == 2 and value.shape == (1, n):
            fill = tail if key == "input_ids" else torch.full_like(
                tail, 1 if key == "attention_mask" else 0, dtype=value.dtype)
            batch[key] = torch.cat([value, fill], dim=1)
    with torch.no_grad():
        logits = vlm.model(**batch).logits[0, n - 1:].float()
    best = logits.max(-1).values
    mine = logits[torch.arange(len(got)), torch.tensor(got)]
    return float(((best - mine) / best.abs().clamp(min=1.0)).max())
