"""The `edgevlm` command line. Only this module maps errors to exit codes:
0 ok, 1 run failed, 2 usage/config/input error, 3 missing optional dependency."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgevlm import __version__, budget_cli, vision_cli
from edgevlm.errors import EdgeVLMError
from edgevlm.loader import DEFAULT_MODEL
from edgevlm.ui import quiet_transformers, set_quiet

EPILOG = """examples:
  edgevlm export --model tiny:smolvlm --method bi --ratio 0.3 --target gguf -o out
  edgevlm export --model HuggingFaceTB/SmolVLM-256M-Instruct --method bi --ratio 0.3 \\
      --target gguf --quant q4_k_m
  edgevlm score tiny:qwen2-vl --method lc -o scores/
  edgevlm prune tiny:llava --method bi --ratio 0.25 -o out/
  edgevlm eval tiny:llava out/pruned --baseline random:5
  edgevlm heal out/pruned --teacher tiny:llava --recipe sft+hidden-kd --data tasks --fraction 0.05 -o healed
"""


# --------------------------------------------------------------------------------- parsers
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                   help="where to run PyTorch (default cpu)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map, e.g. 'auto' to spread a large model over GPUs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="seed for tiny: models and sampling")


def _calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="builtin:32",
                   help="builtin[:N], a folder of images (+prompts.jsonl) or a .jsonl file")
    p.add_argument("--batch-size", type=int, default=4)


def _score_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--method", required=required, help="bi, angular, lc or svl (edgevlm list methods)")
    p.add_argument("--tokens", default=None, help="token subset: all, text or visual")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. p=0.5 for svl (repeatable)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="fraction of decoder layers to remove")
    group.add_argument("--n-layers", type=int, help="number of decoder layers to remove")
    p.add_argument("--protect", default=None, help="layers never removed: first,last,<index>")


def _layer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axis", default="layers", choices=["layers", "width"],
                   help="remove whole decoder layers, or uniformly narrow every layer (Taylor "
                        "importance per attention head group / MLP channel; --ratio)")
    p.add_argument("--compensate", type=int, default=None, metavar="K",
                   help="SVL subspace compensation of each removed block (rank K, e.g. 8)")
    p.add_argument("--mode", default="drop", choices=["drop", "freeze"],
                   help="drop: remove the chosen layers; freeze (ShortV, --method lc): keep them, "
                        "but visual tokens skip their query, output projection and MLP "
                        "(ONNX target only)")


def _heal_options(p: argparse.ArgumentParser, *, batch_size: bool) -> None:
    """Recovery training options, shared by `heal` and `export --recover`."""
    p.add_argument("--data", default="tasks",
                   help="training data: tasks[:N[:train]], builtin[:N], a folder or a .jsonl "
                        "(default: the task set's train split, 20000 items)")
    p.add_argument("--fraction", type=float, default=0.05,
                   help="share of the training split to use, in (0, 1] (default 0.05)")
    p.add_argument("--train", default=None, choices=["decoder", "projector", "all"],
                   help="what trains in full (default: the recipe's; sft: decoder)")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R on the decoder's linear layers instead "
                        "(merged into the weights on save)")
    p.add_argument("--ce-weight", type=float, default=None, help="logit-kd: weight of answer CE")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: one pass over the selected items)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-4 full, 1e-3 LoRA or projector)")
    if batch_size:
        p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="write a training checkpoint every N steps")


def _out_options(p: argparse.ArgumentParser, default: str = "out") -> None:
    p.add_argument("-o", "--out", default=default, help=f"output folder (default {default})")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevlm", description="Prune, quantize, export and benchmark VLMs for the edge.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list families, methods, targets, devices, tiny or random models")
    p.add_argument("what", choices=["families", "methods", "targets", "devices", "tiny", "random"])

    p = sub.add_parser("inspect", help="show a model's family, layers, parameters and targets")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    budget_cli.add_inspect_options(p)

    p = sub.add_parser("score", help="score every decoder layer (writes scores.json)")
    p.add_argument("model")
    _score_options(p, required=False)  # or vision options only
    _plan_options(p)
    vision_cli.add_options(p)
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    p = sub.add_parser("prune", help="remove the least important layers (writes pruned/)")
    p.add_argument("model")
    _score_options(p, required=False)
    _plan_options(p)
    vision_cli.add_options(p)
    p.add_argument("--plan", type=Path, help="replay a plan.json instead of scoring")
    _layer_options(p)
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    p = sub.add_parser("heal", help="recover a pruned model's accuracy by training (writes a checkpoint)")
    p.add_argument("pruned", help="the pruned checkpoint (e.g. out/pruned)")
    p.add_argument("--teacher", default=None,
                   help="the unpruned model (needed by sft+hidden-kd and logit-kd)")
    p.add_argument("--recipe", required=True,
                   help="projector, sft, sft+hidden-kd or logit-kd")
    _heal_options(p, batch_size=True)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.checkpoint")
    _model_options(p)
    _out_options(p, default="healed")

    p = sub.add_parser("eval", help="fidelity of a pruned model against its base")
    p.add_argument("base")
    p.add_argument("pruned")
    p.add_argument("--baseline", default=None, metavar="random:K",
                   help="also evaluate K random plans removing as many layers")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    _calib_options(p)
    _model_options(p)

    p = sub.add_parser("export", help="score, prune, quantize and export for a target")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local folder or tiny:<family> (default {DEFAULT_MODEL})")
    _score_options(p, required=False)
    _plan_options(p)
    vision_cli.add_options(p)
    p.add_argument("--plan", type=Path, help="replay a plan.json instead of scoring")
    p.add_argument("--target", required=True, help="onnx or gguf")
    p.add_argument("--quant", default=None, help="onnx: none|int8|q4; gguf: f16|q8_0|q4_k_m|...")
    p.add_argument("--mmproj-type", default="f16", help="gguf mmproj type: f16 or q8_0")
    p.add_argument("--vision-quant", default="none", help="onnx vision encoder: none or int8")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not advised)")
    budget_cli.add_option(p, export=True)
    _layer_options(p)
    p.add_argument("--recover", default=None, metavar="RECIPE",
                   help="heal the pruned model before exporting (see `edgevlm heal`)")
    _heal_options(p, batch_size=False)
    _calib_options(p)
    _model_options(p)
    _out_options(p)

    p = sub.add_parser("devices", help="list device profiles and mark the detected one")
    p.add_argument("--measure", action="store_true",
                   help="also measure this host's memory bandwidth and peak FP32 GFLOP/s")

    p = sub.add_parser("run", help="answer a prompt about an image with an export (streams)")
    p.add_argument("export", help="export folder or its manifest.json")
    p.add_argument("--image", required=True,
                   help="image file, or 'builtin' for a generated test picture")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _runtime_options(p)

    p = sub.add_parser("bench", help="time exports on this device (table + bench.json)")
    p.add_argument("exports", nargs="+", help="export folders or manifests; 2+ are compared")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("-o", "--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG chart here")
    _runtime_options(p)
    return parser


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="device profile: auto (detect) or a name from `edgevlm devices`")
    p.add_argument("--runtime", default=None, help="onnxruntime or llama.cpp (default: by target)")
    p.add_argument("--threads", type=int, default=None, help="default: the profile's")
    budget_cli.add_option(p)


# -------------------------------------------------------------------------------- commands


def _commands() -> dict:
    from edgevlm import commands, device_commands
    from edgevlm.recovery.commands import cmd_heal

    return {"list": commands.cmd_list, "inspect": commands.cmd_inspect,
            "score": commands.cmd_score, "prune": commands.cmd_prune, "eval": commands.cmd_eval, "heal": cmd_heal,
            "export": commands.cmd_export, "devices": device_commands.cmd_devices,
            "run": device_commands.cmd_run, "bench": device_commands.cmd_bench}


def _quiet_libraries() -> None:
    import logging

    # The ONNX exporters log every graph pass at INFO once anything configures logging.
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    set_quiet(args.quiet)
    if args.command not in ("list", "devices", "run", "bench"):
        _quiet_libraries()
    try:
        return _commands()[args.command](args) or 0
    except EdgeVLMError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.what}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected library failure
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  run again with -v for the full traceback", file=sys.stderr)
        return 1
