"""Time to first token (TTFT) of a 640x480 picture, split into image encode and prefill, for
the three levers of issue 11, and what each costs in task accuracy.

Variants: the baseline; vision-tower layers removed (--vision-ratios, `--vision-ratio`);
ShortV visual-token freezing in --freeze-ratio of the decoder layers (`--mode freeze`);
image budgets (--budgets, `--max-image-tokens`, on the baseline export).

`speed` (ONNX, default): each variant is exported once under --work with `edgevlm export`
(fixed plans: with random weights speed depends on how many layers go, not which; exports
listed in --verify are verified against PyTorch, the others `--no-verify`), loaded in its own
`edgevlm bench` worker process (onnxruntime runner, --threads each), and timed with
repetitions interleaved (A B C ... A B C ...). Speed-ups are per-round ratios against the
baseline: median [min-max], next to the ideal from counted FLOPs. The freeze prefill is also
timed alone (one process): the normal decoder, the freeze graph with the prompt's text rows,
and the same graph with every row as "text" (no saving: the same kernels without the cut).

`speed --eager` measures the same variants in PyTorch (vision tower, then the decoder
prefill through edgevlm's freeze forward), for models whose ONNX export does not fit in
memory; --vision-depth / --text-depth shorten the towers (real widths, fewer layers).

`accuracy`: task accuracy (edgevlm.accuracy, greedy exact match, the test split) of each
variant of a trained reference model, layers chosen by vision BI and visual LC on val items.

    python benchmarks/bench_ttft.py speed --model random:smolvlm-256m --budgets 64 320 \\
        -o benchmarks/results/ttft-smolvlm-256m.json
    python benchmarks/bench_ttft.py accuracy --model trained:smolvlm --budgets 9 45 \\
        -o benchmarks/results/ttft-accuracy-smolvlm.json
    python benchmarks/bench_ttft.py plot benchmarks/results/ttft-*.json -o benchmarks/results/ttft.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "Describe this image in detail."


# ----------------------------------------------------------------------------- variants
def variants(args) -> list[dict]:
    """[{name, kind, value}] in measurement order, the baseline first."""
    out = [{"name": "baseline", "kind": "baseline", "value": None}]
    out += [{"name": f"vision-{round(r * 100)}", "kind": "vision", "value": r}
            for r in args.vision_ratios]
    if args.freeze_ratio:
        out.append({"name": f"freeze-{round(args.freeze_ratio * 100)}", "kind": "freeze",
                    "value": args.freeze_ratio})
    out += [{"name": f"budget-{n}", "kind": "budget", "value": n} for n in args.budgets]
    return out


def fixed_plan(kind: str, ratio: float, n_text: int, n_vision: int) -> dict:
    """A plan file's content without scoring. Vision: the layers before the last (the
    projector reads the last one's output). Freeze: the last layers (ShortV's LC ranks late
    layers lowest for visual tokens); for speed only the count matters."""
    from edgevlm.plan import layers_to_drop

    if kind == "vision":
        k = layers_to_drop(n_vision, ratio, None)
        vision = {"method": "fixed", "n_layers": n_vision, "ratio": ratio, "mode": "drop",
                  "layers": list(range(n_vision - 1 - k, n_vision - 1))}
        return {"method": "none", "n_layers": n_text, "layers": [], "vision": vision}
    k = layers_to_drop(n_text, ratio, None)
    return {"method": "fixed", "n_layers": n_text, "ratio": ratio, "mode": "freeze",
            "layers": list(range(n_text - k, n_text))}


def text_and_vision_layers(config) -> tuple[int, int]:
    text = config.get("text_config", config)
    vision = config["vision_config"]
    return int(text["num_hidden_layers"]), int(vision.get("num_hidden_layers") or vision["depth"])


# ------------------------------------------------------------------------- FLOP counts
def vision_gflops(config: dict, layers: int, image_cost: dict) -> float:
    """Vision encoder FLOPs for one image: patch embedding, `layers` transformer layers
    (q/k/v/o, MLP, attention within each encoder call) and the projector, from config.json.
    SmolVLM: one call per tile of (image_size/patch)^2 patches, pixel shuffle + linear.
    Qwen2-VL: one call over all patches, 2x2 merge + 2-layer MLP."""
    v = config["vision_config"]
    text_hidden = int(config.get("text_config", config)["hidden_size"])
    if "depth" in v:  # Qwen2-VL
        hidden = int(v["embed_dim"])
        ffn = int(hidden * float(v.get("mlp_ratio", 4)))
        merge = int(v.get("spatial_merge_size", 2)) ** 2
        calls, seq = 1, image_cost["image_tokens"] * merge
        patch_in = 3 * int(v.get("temporal_patch_size", 2)) * int(v["patch_size"]) ** 2
        projector = 2 * (seq // merge) * (hidden * merge) * (hidden * merge + text_hidden)
    else:  # SigLIP tiles (SmolVLM / Idefics3)
        hidden, ffn = int(v["hidden_size"]), int(v["intermediate_size"])
        calls = image_cost["tiles"]
        seq = (int(v["image_size"]) // int(v["patch_size"])) ** 2
        patch_in = 3 * int(v["patch_size"]) ** 2
        scale = int(config.get("scale_factor", 1)) ** 2
        projector = 2 * (seq // scale) * hidden * scale * text_hidden * calls
    per_layer = 2 * seq * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * hidden * seq * seq
    embed = 2 * seq * patch_in * hidden
    return (calls * (embed + layers * per_layer) + projector) / 1e9


def ideal(config: dict, variant: dict, costs: dict, visual: dict, n_vision: int,
          frozen: list[int]) -> dict:
    """Ideal speed-ups against the baseline from counted FLOPs (and the layer ratio)."""
    from types import SimpleNamespace

    from edgevlm.freeze import prefill_flops

    text = SimpleNamespace(**config.get("text_config", config))
    base_v = vision_gflops(config, n_vision, costs["baseline"])
    base_p = prefill_flops(text, visual["baseline"], []) / 1e9
    kind, name = variant["kind"], variant["name"]
    layers_v, frozen_here = n_vision, []
    if kind == "vision":
        from edgevlm.plan import layers_to_drop

        layers_v = n_vision - layers_to_drop(n_vision, variant["value"], None)
    if kind == "freeze":
        frozen_here = frozen
    vis = vision_gflops(config, layers_v, costs[name])
    pre = prefill_flops(text, visual[name], frozen_here) / 1e9
    out = {"vision_gflops": vis, "prefill_gflops": pre,
           "image": base_v / vis, "prefill": base_p / pre, "ttft": (base_v + base_p) / (vis + pre)}
    if kind == "vision":
        out["layer_ratio"] = n_vision / layers_v
    if kind == "freeze":
        dense = prefill_flops(text, visual[name], frozen_here, causal=False)
        out["prefill_dense"] = prefill_flops(text, visual[name], [], causal=False) / dense
    return out


# ---------------------------------------------------------------------------- helpers
def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def prefill_ms(run: dict) -> float | None:
    pp = run.get("prefill_tok_s")
    return run["prompt_tokens"] / pp * 1e3 if pp else None


def ratios(base_runs: list[dict], runs: list[dict]) -> dict:
    """Per-round speed-ups (baseline time / variant time): median [min-max]."""
    out = {}
    for key, get in (("image", lambda r: r.get("image_ms")), ("prefill", prefill_ms),
                     ("ttft", lambda r: r.get("ttft_ms"))):
        out[key] = spread([get(a) / get(b) for a, b in zip(base_runs, runs, strict=True)
                           if get(a) and get(b)])
    return out


def machine(load_note: str) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "load": load_note}


# ------------------------------------------------------------------------ ONNX exports
def ensure_exports(args, config: dict, todo: list[dict]) -> dict:
    """{variant name: export folder} (budget variants share the baseline's), made with the
    CLI and reused when present; returns also the commands run."""
    n_text, n_vision = text_and_vision_layers(config)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folders, commands = {}, []
    for v in todo:
        if v["kind"] == "budget":
            folders[v["name"]] = work / "baseline"
            continue
        folder = work / v["name"]
        folders[v["name"]] = folder
        cmd = ["edgevlm", "-q", "export", "--model", args.model, "--target", "onnx",
               "--quant", args.quant, "--calib", args.calib, "-o", str(folder), "--force"]
        if v["kind"] != "baseline":
            plan = work / f"plan-{v['name']}.json"
            plan.write_text(json.dumps(fixed_plan(v["kind"], v["value"], n_text, n_vision)))
            cmd += ["--plan", str(plan)] + (["--mode", "freeze"] if v["kind"] == "freeze" else [])
        if v["kind"] not in args.verify and "all" not in args.verify:
            cmd.append("--no-verify")
        record = {"variant": v["name"], "command": " ".join(cmd)}
        if (folder / "manifest.json").exists():
            record["reused"] = True
            record.update(time_log(work / f"{v['name']}-export.log"))
        else:
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            record.update(seconds=round(time.perf_counter() - start, 1), rc=done.returncode,
                          stdout=done.stdout[-3000:], stderr=done.stderr[-3000:])
            print(f"export {v['name']}: rc {done.returncode} in {record['seconds']} s\n"
                  f"{done.stdout[-1500:]}{done.stderr[-1500:]}", flush=True)
            if done.returncode:
                raise SystemExit(f"export of {v['name']} failed: {done.stderr[-800:]}")
        manifest = json.loads((folder / "manifest.json").read_text())
        record["parity"] = manifest.get("parity")
        commands.append(record)
    return folders, commands


def time_log(path: Path) -> dict:
    """Wall time and peak RSS of an export made earlier under `/usr/bin/time -v` (its log)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if "Elapsed (wall clock)" in line:
            out["wall"] = line.rsplit(": ", 1)[1]
        elif "Maximum resident set size" in line:
            out["peak_rss_mb"] = round(int(line.rsplit(": ", 1)[1]) / 1024)
        elif "Exit status" in line:
            out["rc"] = int(line.rsplit(": ", 1)[1])
    return {"time_v": out} if out else {}


def onnx_prompt(folder: Path, budget: int | None):
    """(input_ids, processor outputs, image cost) of the bench picture under a budget, from
    the runners' own preprocessing."""
    from edgevlm.runtimes.bench import bench_image
    from edgevlm.runtimes.image_budget import image_cost, preprocessor

    inputs = preprocessor(folder / "onnx", budget)(bench_image(), PROMPT)
    return inputs, image_cost(folder / "onnx", 640, 480, budget)


def freeze_prefill_alone(folder: Path, threads: int, runs: int) -> dict:
    """The freeze export's prefill in one process, interleaved: normal decoder (what the
    baseline runs), freeze graph on the prompt's text rows, freeze graph on every row (same
    graph, no rows skipped). Image features are random (seeded): time does not depend on
    them, and the vision encoder is timed elsewhere."""
    import numpy as np

    from edgevlm.runtimes.ort_generate import OnnxVLM

    vlm = OnnxVLM(folder / "onnx", threads=threads)
    inputs, _ = onnx_prompt(folder, None)
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    n_image = int((ids == vlm.image_token_id).sum())
    hidden = int(vlm.config.get("text_config", vlm.config)["hidden_size"])
    features = np.random.default_rng(0).standard_normal((n_image, hidden)).astype(np.float32)
    embeds = vlm.embeddings(ids, features)
    positions, _ = vlm.position_ids(ids, inputs)
    rows = {"text rows": np.nonzero(ids[0] != vlm.image_token_id)[0].astype(np.int64),
            "every row": np.arange(ids.shape[1], dtype=np.int64)}

    def normal():
        cache = vlm.decoder.cache(max_len=ids.shape[1] + 2)
        cache.run(embeds, vlm.prompt_positions(ids, inputs)[0])

    def frozen(which):
        vlm.freeze_prefill.run(None, {"inputs_embeds": embeds, "position_ids": positions,
                                      "text_positions": rows[which]})

    calls = {"decoder": normal, "freeze text rows": lambda: frozen("text rows"),
             "freeze every row": lambda: frozen("every row")}
    times = {k: [] for k in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    pair = lambda a, b: spread([x / y for x, y in zip(times[a], times[b], strict=True)])  # noqa: E731
    return {"prompt_tokens": int(ids.shape[1]), "text_rows": len(rows["text rows"]),
            "ms": {k: spread(v) for k, v in times.items()},
            "speedup_same_graph": pair("freeze every row", "freeze text rows"),
            "speedup_vs_decoder": pair("decoder", "freeze text rows"),
            "freeze_graph_no_skip_vs_decoder": pair("decoder", "freeze every row")}


def speed_onnx(args, save) -> dict:
    from edgevlm.loader import resolve
    from edgevlm.runtimes.bench import BenchConfig, Workers
    from edgevlm.runtimes.families import image_token_id

    config = json.loads((resolve(args.model) / "config.json").read_text())
    todo = variants(args)
    folders, commands = ensure_exports(args, config, todo)
    _, n_vision = text_and_vision_layers(config)
    frozen = next((json.loads((args.work / f"plan-{v['name']}.json").read_text())["layers"]
                   for v in todo if v["kind"] == "freeze"), [])
    costs, visual = {}, {}
    for v in todo:
        budget = v["value"] if v["kind"] == "budget" else None
        inputs, costs[v["name"]] = onnx_prompt(folders[v["name"]], budget)
        visual[v["name"]] = (inputs["input_ids"][0] == image_token_id(config)).tolist()
    out = {"runtime": "onnxruntime (edgevlm bench workers)", "quant": args.quant,
           "exports": commands, "frozen_layers": frozen, "results": {},
           "freeze_prefill_alone": None}
    if frozen:  # first: the freeze goal's own measurement, saved before the long rounds
        name = next(v["name"] for v in todo if v["kind"] == "freeze")
        alone = freeze_prefill_alone(folders[name], args.threads, args.runs)
        best = ideal(config, next(v for v in todo if v["name"] == name), costs, visual,
                     n_vision, frozen)
        alone.update(ideal=best["prefill"], ideal_dense=best["prefill_dense"])
        out["freeze_prefill_alone"] = alone
        print(json.dumps(alone, indent=1), flush=True)
        save(out)
    with Workers() as pool:
        workers = {}
        for v in todo:
            bench = BenchConfig(runs=args.runs, warmup=0, gen_tokens=args.gen_tokens,
                                threads=args.threads,
                                max_image_tokens=v["value"] if v["kind"] == "budget" else None)
            workers[v["name"]] = pool.start(folders[v["name"]], bench, None)
        runs = {name: [] for name in workers}
        for round_ in range(args.runs + args.warmup):
            for name, worker in workers.items():
                run = worker.run()
                if round_ >= args.warmup:
                    runs[name].append(run)
                print(f"round {round_} {name}: image {run['image_ms']:.0f} ms, TTFT "
                      f"{run['ttft_ms']:.0f} ms, {run['prompt_tokens']} prompt tokens", flush=True)
            if round_ >= args.warmup:  # partial results survive an interrupted run
                out["results"] = summarise(todo, runs, costs, visual, config, n_vision, frozen)
                out["rounds_done"] = round_ + 1 - args.warmup
                save(out)
    return out


def summarise(todo, runs, costs, visual, config, n_vision, frozen) -> dict:
    results = {}
    for v in todo:
        r = runs[v["name"]]
        results[v["name"]] = {
            **v, "image_tokens": r[0]["image_tokens"] or costs[v["name"]]["image_tokens"],
            "tiles": costs[v["name"]]["tiles"], "prompt_tokens": r[0]["prompt_tokens"],
            "visual_share": sum(visual[v["name"]]) / len(visual[v["name"]]),
            "ms": {"image": spread([x["image_ms"] for x in r]),
                   "prefill": spread([prefill_ms(x) for x in r]),
                   "ttft": spread([x["ttft_ms"] for x in r])},
            "speedup": ratios(runs["baseline"], r),
            "ideal": ideal(config, v, costs, visual, n_vision, frozen), "runs": r}
    return results


# ---------------------------------------------------------------------- PyTorch eager
def eager_model(args):
    """A random-weight model with the preset's real config (fp32), towers optionally
    shortened, plus its processor: (vlm, config dict)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from edgevlm.adapters import adapter_for_config
    from edgevlm.loader import LoadedVLM
    from edgevlm.processors import load_processor
    from edgevlm.tiny.presets import real_folder

    folder = real_folder(args.model)
    config = AutoConfig.from_pretrained(folder)
    if args.text_depth:
        config.get_text_config().num_hidden_layers = args.text_depth
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = args.text_depth
    if args.vision_depth:
        v = config.vision_config
        v.depth = v.num_hidden_layers = args.vision_depth
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for_config(config)
    processor = load_processor(folder, adapter)
    saved = Path(tempfile.mkdtemp(prefix="bench-ttft-"))  # with tokenizer.json, for budgets
    processor.save_pretrained(saved)
    config.save_pretrained(saved)
    vlm = LoadedVLM(model=model, processor=processor, adapter=adapter, name=args.model,
                    path=saved)
    return vlm, config.to_dict()


def budget_processor(vlm, folder: Path, budget: int | None):
    """vlm.processor with the image budget's settings applied to its image processor."""
    import copy

    from edgevlm.runtimes.image_budget import budget_settings
    from edgevlm.runtimes.preprocess.common import CheckpointFiles

    processor = copy.deepcopy(vlm.processor)
    if budget is not None:
        for key, value in budget_settings(CheckpointFiles.read(folder), budget).items():
            if hasattr(processor.image_processor, key):
                setattr(processor.image_processor, key, value)
    return processor


def speed_eager(args) -> dict:
    """Vision encode and decoder prefill in PyTorch, one process, variants interleaved."""
    import torch

    from edgevlm import freeze
    from edgevlm.prompting import chat_batch, chat_text
    from edgevlm.runtimes.bench import bench_image
    from edgevlm.vision_prune import vision_layers_owner

    torch.set_num_threads(args.threads)
    vlm, config = eager_model(args)
    folder = vlm.path
    n_text, n_vision = text_and_vision_layers(config)
    todo = variants(args)
    model = vlm.model
    owner, attr = vision_layers_owner(vlm.adapter, model)
    all_blocks = getattr(owner, attr)
    frozen = fixed_plan("freeze", args.freeze_ratio, n_text, n_vision)["layers"] if (
        args.freeze_ratio) else []
    state = freeze.install(vlm, frozen)
    image_id = config.get("image_token_id")
    prompts, costs, visual = {}, {}, {}
    for v in todo:
        processor = budget_processor(vlm, folder, v["value"] if v["kind"] == "budget" else None)
        text = chat_text(processor, PROMPT, None)
        batch = chat_batch(processor, [text], [[bench_image()]], return_tensors="pt")
        prompts[v["name"]] = batch
        grid = batch["image_grid_thw"]
        tokens = int((batch["input_ids"] == image_id).sum())
        costs[v["name"]] = {"image_tokens": tokens, "tiles": int(grid.shape[0])}
        visual[v["name"]] = (batch["input_ids"][0] == image_id).tolist()

    def one(v) -> dict:
        batch = prompts[v["name"]]
        blocks = all_blocks
        if v["kind"] == "vision":
            plan = fixed_plan("vision", v["value"], n_text, n_vision)["vision"]
            blocks = torch.nn.ModuleList(b for i, b in enumerate(all_blocks)
                                         if i not in plan["layers"])
        setattr(owner, attr, blocks)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                features = model.model.get_image_features(
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
                image_s = time.perf_counter() - start
                features = features.pooler_output if hasattr(features, "pooler_output") else features
                features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
                ids = batch["input_ids"]
                embeds = model.model.get_input_embeddings()(ids)
                embeds[ids == image_id] = features.to(embeds.dtype)
                positions = model.model.get_rope_index(
                    ids, mm_token_type_ids=(ids == image_id).int(),
                    image_grid_thw=batch["image_grid_thw"],
                    attention_mask=batch["attention_mask"])[0]
                if v["kind"] == "freeze":
                    state.set(*freeze.rows_to_compute(ids == image_id))
                else:
                    state.clear()
                start = time.perf_counter()
                hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                    attention_mask=batch["attention_mask"],
                                                    use_cache=True).last_hidden_state
                model.lm_head(hidden[:, -1:])
                prefill_s = time.perf_counter() - start
                state.clear()
        finally:
            setattr(owner, attr, all_blocks)
        return {"image_ms": image_s * 1e3, "prompt_tokens": int(ids.shape[1]),
                "prefill_tok_s": ids.shape[1] / prefill_s, "ttft_ms": (image_s + prefill_s) * 1e3,
                "image_tokens": costs[v["name"]]["image_tokens"]}

    runs = {v["name"]: [] for v in todo}
    for round_ in range(args.runs + args.warmup):
        for v in todo:
            run = one(v)
            if round_ >= args.warmup:
                runs[v["name"]].append(run)
            print(f"round {round_} {v['name']}: image {run['image_ms']:.0f} ms, prefill "
                  f"{prefill_ms(run):.0f} ms, {run['prompt_tokens']} prompt tokens", flush=True)
    results = summarise(todo, runs, costs, visual, config, n_vision, frozen)
    return {"runtime": "PyTorch eager (fp32): vision tower, then the decoder prefill (edgevlm's "
                       "freeze forward for the freeze variant); no ONNX",
            "depth": {"text": n_text, "vision": n_vision}, "frozen_layers": frozen,
            "results": results}


# --------------------------------------------------------------------------- accuracy
def accuracy(args) -> dict:
    """Task accuracy of each variant of a trained model on the first --items test items."""
    import copy

    import torch

    from edgevlm import freeze, pipeline
    from edgevlm.accuracy import task_accuracy
    from edgevlm.loader import LoadedVLM, load
    from edgevlm.scoring.vision import score_vision
    from edgevlm.tasks import task_samples
    from edgevlm.vision_prune import make_vision_plan, prune_vision_

    torch.set_num_threads(args.threads)
    base = load(args.model)
    test = task_samples(args.items, "test", 0)
    calib = pipeline.calibration(f"tasks:{args.calib_items}")  # val split: chooses layers

    def fresh(processor=None):
        return LoadedVLM(model=copy.deepcopy(base.model), processor=processor or base.processor,
                         adapter=base.adapter, name=base.name, path=base.path)

    def image_tokens(vlm) -> float:
        from edgevlm.prompting import encode

        ids = encode(vlm, test[:32])["input_ids"]
        return float(vlm.adapter.visual_mask(ids, vlm.config).sum(1).float().mean())

    def measure(name, vlm, extra=None):
        start = time.perf_counter()
        acc = task_accuracy(vlm, test, batch_size=16)
        row = {"accuracy": acc["average"], "per_task": acc["per_task"], "n": acc["n"],
               "mean_image_tokens_first32": image_tokens(vlm),
               "seconds": round(time.perf_counter() - start, 1), **(extra or {})}
        print(f"{args.model} {name}: accuracy {row['accuracy']:.3f}, image tokens "
              f"{row['mean_image_tokens_first32']:.1f} ({row['seconds']} s)", flush=True)
        return row

    rows = {"baseline": measure("baseline", base)}
    n_vision = base.config.vision_config.num_hidden_layers
    if args.vision_ratios:
        scores = score_vision(base, calib.scoring, "bi", batch_size=8, progress=False,
                              calibration=calib.description)
        for r in args.vision_ratios:
            plan = make_vision_plan(scores, base.config, ratio=r)
            vlm = fresh()
            prune_vision_(vlm, plan)
            rows[f"vision-{round(r * 100)}"] = measure(
                f"vision {r}", vlm, {"dropped": plan.layers, "of": n_vision})
    if args.freeze_ratio:
        scores = pipeline.score_model(base, calib, "lc", batch_size=8)
        plan = pipeline.plan_for(base, scores, ratio=args.freeze_ratio, mode="freeze")
        vlm = fresh()
        freeze.install(vlm, plan.layers)
        rows[f"freeze-{round(args.freeze_ratio * 100)}"] = measure(
            f"freeze {args.freeze_ratio}", vlm,
            {"frozen": plan.layers, "of": base.adapter.num_layers(base.config)})
    for n in args.budgets:
        vlm = LoadedVLM(model=base.model, processor=budget_processor(base, base.path, n),
                        adapter=base.adapter, name=base.name, path=base.path)
        rows[f"budget-{n}"] = measure(f"budget {n}", vlm)
    for name, row in rows.items():
        row["retention"] = row["accuracy"] / rows["baseline"]["accuracy"]
        if name.startswith("budget"):
            row["no_op"] = (row["mean_image_tokens_first32"]
                            == rows["baseline"]["mean_image_tokens_first32"])
    return {"items": args.items, "split": "test", "calib": f"tasks:{args.calib_items} (val)",
            "results": rows}


# ------------------------------------------------------------------------- plot, table
def _fmt(s, digits=2) -> str:
    if not s:
        return "-"
    return f"x{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def layers_text(row: dict) -> str:
    layers = row.get("dropped") or row.get("frozen")
    return f"{layers} of {row['of']}" if layers else "-"


def table(payloads: list[dict]) -> str:
    lines = []
    for p in payloads:
        if p.get("mode") == "accuracy":
            a = p["accuracy"]
            lines += [f"`{p['model']}` ({a['items']} {a['split']} items)", "",
                      "| variant | accuracy | retention | image tokens (mean) | layers |",
                      "|---|---|---|---|---|"]
            for name, r in a["results"].items():
                lines.append(f"| {name} | {r['accuracy']:.3f} | {r['retention']:.1%} | "
                             f"{r['mean_image_tokens_first32']:.1f}"
                             f"{' (no-op)' if r.get('no_op') else ''} | "
                             f"{layers_text(r)} |")
            lines.append("")
            continue
        rounds = p["speed"].get("rounds_done", p["runs"])
        lines += [f"`{p['model']}` ({p['speed']['runtime']}, {p['threads']} thread(s), "
                  f"{rounds} interleaved rounds)", "",
                  "| variant | image tokens | prompt tokens | image encode ms | prefill ms | TTFT ms "
                  "| image speed-up (ideal) | prefill speed-up (ideal) | TTFT speed-up (ideal) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in p["speed"]["results"].items():
            ms, sp, ide = r["ms"], r["speedup"], r["ideal"]
            lines.append(
                f"| {name} | {r['image_tokens']} | {r['prompt_tokens']} | "
                f"{ms['image']['median']:.0f} | {ms['prefill']['median']:.0f} | "
                f"{ms['ttft']['median']:.0f} | {_fmt(sp['image'])} ({ide['image']:.2f}) | "
                f"{_fmt(sp['prefill'])} ({ide['prefill']:.2f}) | "
                f"{_fmt(sp['ttft'])} ({ide['ttft']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def plot(payloads: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [p for p in payloads if p.get("mode") == "speed" and p["speed"]["results"]]
    fig, axes = plt.subplots(1, len(speed), figsize=(6 * len(speed), 4.2), squeeze=False)
    for ax, p in zip(axes[0], speed, strict=True):
        names = list(p["speed"]["results"])
        img = [p["speed"]["results"][n]["ms"]["image"]["median"] / 1e3 for n in names]
        pre = [p["speed"]["results"][n]["ms"]["prefill"]["median"] / 1e3 for n in names]
        ax.bar(names, img, label="image encode")
        ax.bar(names, pre, bottom=img, label="prefill")
        for i, n in enumerate(names):
            s = p["speed"]["results"][n]["speedup"]["ttft"]
            if n != "baseline" and s:
                ax.text(i, img[i] + pre[i], f"x{s['median']:.2f}", ha="center", va="bottom",
                        fontsize=8)
        depth = p["speed"].get("depth")
        how = (f"PyTorch, {depth['vision']} vision / {depth['text']} text layers" if p.get("eager")
               else "onnxruntime")
        ax.set_title(f"{p['model']} ({how})", fontsize=10)
        ax.set_ylabel("seconds (median)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle("640x480 image, 1 thread: image encode + prefill (medians); "
                 "labels: TTFT speed-up, per-round median", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("speed", "accuracy"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="random:smolvlm-256m" if name == "speed"
                       else "trained:smolvlm")
        p.add_argument("--vision-ratios", type=float, nargs="*", default=[0.25, 0.5])
        p.add_argument("--freeze-ratio", type=float, default=0.6)
        p.add_argument("--budgets", type=int, nargs="*", default=[])
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--load", default="", help="what else ran on the machine (recorded)")
        p.add_argument("-o", "--out", type=Path, required=True)
    speed = sub.choices["speed"]
    speed.add_argument("--work", type=Path, default=Path("/tmp/bench-ttft"))
    speed.add_argument("--quant", default="none")
    speed.add_argument("--calib", default="builtin:4", help="held-out samples verify exports")
    speed.add_argument("--verify", nargs="*", default=["freeze"],
                       help="variant kinds whose export is verified (baseline vision freeze, all)")
    speed.add_argument("--runs", type=int, default=3)
    speed.add_argument("--warmup", type=int, default=0, help="rounds run first, not recorded")
    speed.add_argument("--gen-tokens", type=int, default=2)
    speed.add_argument("--eager", action="store_true", help="PyTorch instead of ONNX")
    speed.add_argument("--text-depth", type=int, default=None)
    speed.add_argument("--vision-depth", type=int, default=None)
    acc = sub.choices["accuracy"]
    acc.add_argument("--items", type=int, default=160)
    acc.add_argument("--calib-items", type=int, default=64)
    plot_p = sub.add_parser("plot")
    plot_p.add_argument("inputs", type=Path, nargs="+")
    plot_p.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.mode == "plot":
        payloads = [json.loads(p.read_text()) for p in args.inputs]
        plot(payloads, args.out)
        print(table(payloads))
        return 0
    started = time.time()
    payload = {"mode": args.mode, "model": args.model, "threads": args.threads,
               "image_size": [640, 480], "prompt": PROMPT, "command": " ".join(sys.argv),
               "machine": machine(args.load)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(part=None) -> None:
        if part is not None:
            payload["speed"] = part
        payload["seconds"] = round(time.time() - started)
        args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")

    if args.mode == "speed":
        payload.update(runs=args.runs, warmup=args.warmup, eager=args.eager)
        save(speed_eager(args) if args.eager else speed_onnx(args, save))
    else:
        payload["accuracy"] = accuracy(args)
        save()
    if args.mode == "speed":
        print(table([payload]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
