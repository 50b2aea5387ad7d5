"""The image budget on the command line (issue 11, item 3): `--max-image-tokens N` on run,
bench and export, and `inspect MODEL --image-size WxH [--max-image-tokens N]`. The budget
itself (per-family knobs, costs) lives in edgevlm.runtimes.image_budget."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("at most N image tokens per image, through the family's own knob (SmolVLM: tiles / "
        "splitting off, Qwen: max_pixels, Gemma 3: pan-and-scan off; LLaVA: fixed)")


def add_option(p: argparse.ArgumentParser, export: bool = False) -> None:
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help=HELP + ("; written into the export's processor config and manifest"
                                if export else "; default: the export's own budget, if any"))


def add_inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", default=None, metavar="WxH",
                   help="also print the image tokens and tiles an image of this size costs")
    add_option(p)


def early_check(args) -> None:
    """0 or negative: refused before anything loads."""
    from edgevlm.runtimes.image_budget import check_value, parse_image_size

    check_value(getattr(args, "max_image_tokens", None))
    if hasattr(args, "image_size"):  # inspect
        if args.image_size:
            parse_image_size(args.image_size)
        elif args.max_image_tokens is not None:
            from edgevlm.errors import UsageError

            raise UsageError("--max-image-tokens on inspect needs --image-size",
                             "e.g. edgevlm inspect MODEL --image-size 640x480 --max-image-tokens 64")


def check_model(args, model_dir) -> None:
    """Before an export starts: a budget below the family's minimum is refused."""
    if getattr(args, "max_image_tokens", None) is None:
        return
    from edgevlm.runtimes.image_budget import budget_settings
    from edgevlm.runtimes.preprocess import CheckpointFiles

    budget_settings(CheckpointFiles.read(model_dir), args.max_image_tokens)


def apply_to_export(args, out, artifact) -> dict | None:
    """After the exporter wrote `out`: the budget into its processor config and manifest."""
    if getattr(args, "max_image_tokens", None) is None:
        return None
    from edgevlm.runtimes.image_budget import record_in_export

    return record_in_export(out, artifact, args.max_image_tokens)


def describe_budget(record: dict | None) -> str | None:
    if not record:
        return None
    where = ", ".join(record.get("written_to") or ["manifest.json (llama.cpp's mtmd cap "
                                                   f"{record.get('llama_cpp_image_max_tokens')})"])
    return f"  image budget: at most {record['max_image_tokens']} image tokens per image ({where})"


def inspect_cost(args, model_path) -> dict | None:
    """`inspect --image-size WxH`: what that image costs, without and with the budget."""
    early_check(args)
    if not getattr(args, "image_size", None):
        return None
    from edgevlm.runtimes.image_budget import image_cost, parse_image_size

    width, height = parse_image_size(args.image_size)
    out = {"image_size": [width, height], "default": image_cost(Path(model_path), width, height)}
    if args.max_image_tokens is not None:
        out["max_image_tokens"] = args.max_image_tokens
        out["budgeted"] = image_cost(Path(model_path), width, height, args.max_image_tokens)
    return out


def format_cost(cost: dict) -> list[str]:
    width, height = cost["image_size"]

    def one(c):
        return f"{c['image_tokens']} image tokens, {c['tiles']} tile{'s' if c['tiles'] != 1 else ''}"

    lines = [f"image {width}x{height}  {one(cost['default'])}"]
    if "budgeted" in cost:
        lines.append(f"  --max-image-tokens {cost['max_image_tokens']}: {one(cost['budgeted'])}")
    return lines
