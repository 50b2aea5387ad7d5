"""The training loop: the answer loss by hand, loss falls, and an interrupted run resumes
to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import load_tiny

from edgevlm.prompting import encode, model_inputs
from edgevlm.tasks import task_sample
from edgevlm.training import CHECKPOINT, TrainConfig, answer_loss, fit, lr_factor


def test_answer_loss_by_hand():
    # Sequence [5, 1, 2]: the answer is tokens 1 and 2; position 0 predicts 1, position 1 predicts 2.
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    logits[0, 1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    logits[0, 2] = torch.tensor([9.0, 9.0, 9.0, -9.0])  # predicts past the end: ignored
    batch = {"input_ids": torch.tensor([[3, 1, 2]]),
             "answer_mask": torch.tensor([[False, True, True]])}
    first = -math.log(math.exp(2) / (math.exp(2) + 3))
    second = -math.log(math.e / (2 * math.e + 2))
    assert answer_loss(logits, batch).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup=10)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(99, config) < 0.15


def _setup(family="smolvlm"):
    base = load_tiny(family)
    vlm = copy.copy(base)
    vlm.model = copy.deepcopy(base.model)

    def step_samples(step, micro):
        return [task_sample(step * 2 + i, "train") for i in range(2)]

    def loss_fn(samples):
        batch = encode(vlm, samples, with_answer=True, answer_eos=True)
        return answer_loss(vlm.model(**model_inputs(batch)).logits, batch)

    return vlm, step_samples, loss_fn


def test_loss_falls_on_repeated_data():
    vlm, _, loss_fn = _setup()
    fixed = [task_sample(i, "train") for i in range(2)]
    config = TrainConfig(steps=30, lr=5e-3, warmup=1)
    losses = fit(vlm.model, vlm.model.parameters(), lambda s, m: fixed, loss_fn, config,
                 show_progress=False)
    assert losses[-1] < 0.5 * losses[0]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    config = TrainConfig(steps=4, lr=1e-3, warmup=1, checkpoint_every=2)
    torch.manual_seed(0)
    straight, step_samples, loss_fn = _setup()
    expected = fit(straight.model, straight.model.parameters(), step_samples, loss_fn, config,
                   show_progress=False)

    interrupted, step_samples, loss_fn = _setup()

    def dies_at_step_3(step, micro):
        if step == 3:
            raise KeyboardInterrupt
        return step_samples(step, micro)

    with pytest.raises(KeyboardInterrupt):
        fit(interrupted.model, interrupted.model.parameters(), dies_at_step_3, loss_fn, config,
            tmp_path, show_progress=False)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert saved["step"] == 2 and not list(tmp_path.glob(".*.tmp"))  # the last good one

    resumed, step_samples, loss_fn = _setup()
    losses = fit(resumed.model, resumed.model.parameters(), step_samples, loss_fn, config,
                 tmp_path, resume=True, show_progress=False)
    assert losses == pytest.approx(expected, rel=1e-5)
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_fit_trains_through_accelerate():
    """Backward goes through the Accelerator (one call per micro-batch), the model is placed
    on its device, and a device torch cannot see is refused with a fix."""
    from edgevlm.errors import UsageError
    from edgevlm.training import accelerator_for, check_device

    accelerator = accelerator_for("cpu")
    assert accelerator.device.type == "cpu" and accelerator.num_processes == 1
    calls = []
    backward = accelerator.backward
    accelerator.backward = lambda loss, **kw: (calls.append(loss.item()), backward(loss, **kw))
    vlm, step_samples, loss_fn = _setup()
    config = TrainConfig(steps=2, grad_accum=2, lr=1e-3, warmup=1)
    losses = fit(vlm.model, vlm.model.parameters(), step_samples, loss_fn, config,
                 show_progress=False, accelerator=accelerator)
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    assert losses == pytest.approx([calls[0] + calls[1], calls[2] + calls[3]], rel=1e-6)
    for device in ("cuda", "mps"):
        available = (torch.cuda.is_available() if device == "cuda"
                     else torch.backends.mps.is_available())
        if not available:
            with pytest.raises(UsageError, match=f"--device {device}"):
                check_device(device)
            with pytest.raises(UsageError, match=f"--device {device}"):
                accelerator_for(device)
