"""Train a `trained:<family>` reference model from scratch on the task set (CPU is enough).

    python -m edgevlm.trained.train --family smolvlm            # writes edgevlm/trained/smolvlm
    python -m edgevlm.trained.train --family qwen2-vl --resume  # continue after an interruption

Deterministic for a seed on a given machine and thread count; checkpoints every 100 steps in
--work-dir. The result is a standard checkpoint (fp16 safetensors + processor) with a model
card (README.md) and training.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from edgevlm.trained import RECIPES, family_of, folder

EVAL_ITEMS = 400  # test-split items for the model card (50 per task)


def build(family: str, seed: int = 0):
    """The untrained reference model of `family` as a LoadedVLM."""
    import torch

    from edgevlm.adapters import adapter_for_config
    from edgevlm.loader import LoadedVLM
    from edgevlm.tiny import FACTORIES

    torch.manual_seed(seed)
    model, processor = FACTORIES.get(family)(RECIPES.get(family), seed)
    return LoadedVLM(model=model, processor=processor, adapter=adapter_for_config(model.config),
                     name=f"trained:{family}", path=Path("."))


def train(family: str, config, work_dir: Path, out: Path, *, resume: bool = False) -> dict:
    import torch

    from edgevlm.accuracy import task_accuracy
    from edgevlm.loader import load
    from edgevlm.prompting import encode, model_inputs
    from edgevlm.runtimes.provenance import package_versions
    from edgevlm.tasks import task_sample, task_samples
    from edgevlm.training import answer_loss, fit

    vlm = build(family, config.seed)
    per_step = config.batch_size * config.grad_accum

    def step_samples(step, micro):
        first = step * per_step + micro * config.batch_size
        return [task_sample(i, "train", config.seed) for i in range(first, first + config.batch_size)]

    def loss_fn(samples):
        batch = encode(vlm, samples, with_answer=True, answer_eos=True)
        return answer_loss(vlm.model(**model_inputs(batch)).logits, batch)

    started = time.time()
    losses = fit(vlm.model, vlm.model.parameters(), step_samples, loss_fn, config, work_dir,
                 resume=resume, desc=f"train {family}")
    seconds = time.time() - started
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.model.to(torch.float16).save_pretrained(tmp)
    vlm.processor.save_pretrained(tmp)
    # Judge the model as users get it: reloaded from the fp16 files.
    accuracy = task_accuracy(load(str(tmp)), task_samples(EVAL_ITEMS, "test", config.seed),
                             show_progress=True)
    record = {"family": family, "train": vars(config) | {"seconds": round(seconds, 1)},
              "final_loss": sum(losses[-50:]) / len(losses[-50:]), "losses_every_10": losses[::10],
              "test_accuracy": accuracy, "parameters": sum(p.numel() for p in vlm.model.parameters()),
              "machine": f"{platform.machine()}, torch threads: {torch.get_num_threads()}",
              **package_versions("torch")}
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (tmp / "README.md").write_text(model_card(vlm.model.config, record))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def model_card(config, record: dict) -> str:
    """The folder's README.md, from the model config and training.json's record."""
    from edgevlm.tasks import CHANCE

    text, vision = config.get_text_config(), config.vision_config
    depth = getattr(vision, "depth", None) or vision.num_hidden_layers
    width = getattr(vision, "embed_dim", None) or vision.hidden_size
    acc = record["test_accuracy"]
    rows = "\n".join(f"| {task} | {value:.3f} | {CHANCE[task]:.3f} |"
                     for task, value in acc["per_task"].items())
    unlearned = [t for t, v in acc["per_task"].items() if v < 2 * CHANCE[t]]
    t = record["train"]
    return f"""# trained:{record['family']}

A reference model for judging pruning by task accuracy: the {config.architectures[0]}
architecture scaled down, trained from scratch on edgevlm's procedural task set
(`edgevlm.tasks`, train split). Not a general model: it knows only these tasks.

- Decoder: {text.num_hidden_layers} layers, hidden {text.hidden_size}, FFN {text.intermediate_size}, {text.num_attention_heads} heads ({text.num_key_value_heads} KV), vocabulary {text.vocab_size}
- Vision: {depth} layers, width {width}
- Parameters: {record['parameters'] / 1e6:.2f} M, stored as fp16
- Training: {t['steps']} steps x {t['batch_size'] * t['grad_accum']} items, AdamW lr {t['lr']} (warm-up {t['warmup']}, cosine), seed {t['seed']}, {t['seconds'] / 60:.1f} min on {record['machine']}
- Final loss (mean of the last 50 steps): {record['final_loss']:.4f}
- Rebuild: `python -m edgevlm.trained.train --family {record['family']}`

Test split, {acc['n']} items, greedy answers, exact match:

| task | accuracy | chance |
|---|---|---|
{rows}
| **average** | **{acc['average']:.3f}** | |

{"Not learned in this budget (under twice chance): " + ", ".join(unlearned) + "." if unlearned else ""}
"""


def main(argv=None) -> int:
    from edgevlm.loader import cache_dir
    from edgevlm.training import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m edgevlm.trained.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, help=", ".join(RECIPES.names()))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: the packaged folder")
    parser.add_argument("--work-dir", type=Path, help="checkpoints (default: the edgevlm cache)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results are reproducible for a fixed count)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    family = family_of(args.family)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup=min(100, args.steps // 10))
    work_dir = args.work_dir or cache_dir() / "train" / family
    record = train(family, config, work_dir, args.out or folder(family), resume=args.resume)
    print(json.dumps({k: record[k] for k in ("final_loss", "test_accuracy")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
