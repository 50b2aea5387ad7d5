"""bench(): time an export on this device: load, image encode, TTFT, prefill and decode
tokens/s, peak memory (and Jetson power), over warm-up and repeated runs."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from edgevlm.runtimes.artifact import open_export
from edgevlm.runtimes.base import runner_class, runner_for_target
from edgevlm.runtimes.measure import RssSampler
from edgevlm.types import BenchResult

METRICS = ("image_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s")
BENCH_PROMPT = "Describe this image in detail."


@dataclass
class BenchConfig:
    runs: int = 5
    warmup: int = 1
    gen_tokens: int = 128
    threads: int | None = None
    runtime: str | None = None  # default: the export target's runner
    prompt: str = BENCH_PROMPT
    image_size: tuple[int, int] = (640, 480)


def bench_image(size=(640, 480)):
    """A deterministic photo-like test image (gradients + shapes), no files needed."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                    (x + y) * 255 // max(w + h - 2, 1)], -1).astype("uint8")
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 5, h // 5, w // 2, h // 2), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 2, 4 * w // 5, 4 * h // 5), fill=(30, 90, 200))
    return image


def make_runner(target, profile=None, *, runtime: str | None = None, threads: int | None = None):
    """(runner, artifact, root) for an export folder or manifest, hashes checked."""
    artifact, root = open_export(target)
    klass = runner_class(runtime) if runtime else runner_for_target(artifact.target)
    if klass.target != artifact.target:
        from edgevlm.errors import UsageError

        raise UsageError(f"runtime '{klass.name}' cannot run a {artifact.target} export",
                         f"use the {runner_for_target(artifact.target).name} runtime")
    klass.require(profile)
    return klass(root, artifact, profile, threads), artifact, root


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in METRICS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values),
                        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}
        else:
            out[key] = None
    return out


def run_once(runner, image, config: BenchConfig) -> dict:
    trace = runner.generate(image, config.prompt, max_tokens=config.gen_tokens, ignore_eos=True)
    return {
        "prompt_tokens": trace.prompt_tokens,
        "generated_tokens": len(trace.tokens),
        "image_ms": trace.image_s * 1e3 if trace.image_s is not None else None,
        "ttft_ms": trace.ttft_s * 1e3,
        "prefill_tok_s": trace.prefill_tok_s,
        "decode_tok_s": trace.decode_tok_s,
    }


def bench(target, config: BenchConfig | None = None, profile=None, facts=None) -> BenchResult:
    """Load the export once, run warm-up + timed generations, and summarise."""
    from edgevlm.devices import TegrastatsSampler

    config = config or BenchConfig()
    image = bench_image(config.image_size)
    use_tegra = profile is not None and profile.memory_source == "tegrastats"
    with RssSampler() as rss:
        runner, artifact, root = make_runner(target, profile, runtime=config.runtime,
                                             threads=config.threads)
        start = time.perf_counter()
        runner.load()
        load_s = time.perf_counter() - start
        for _ in range(config.warmup):
            run_once(runner, image, config)
        if use_tegra:
            with TegrastatsSampler() as tegra:
                runs = [run_once(runner, image, config) for _ in range(config.runs)]
        else:
            tegra = None
            runs = [run_once(runner, image, config) for _ in range(config.runs)]
        runner.close()
    summary = tegra.summary if tegra else None
    return BenchResult(
        export={"path": str(root), "target": artifact.target, "family": artifact.family,
                "quant": artifact.quantization.get("type") or artifact.quantization,
                "decoder_layers": artifact.io.get("num_layers") or artifact.io.get("n_layers"),
                "plan": artifact.plan},
        device={"profile": profile.name if profile else None,
                "facts": facts.to_dict() if facts is not None else None,
                "platform": platform.platform()},
        runtime=runner.name,
        config={"runs": config.runs, "warmup": config.warmup, "gen_tokens": config.gen_tokens,
                "threads": runner.threads, "prompt": config.prompt,
                "image_size": list(config.image_size)},
        load_s=load_s,
        runs=runs,
        summary=_summary(runs),
        peak_rss_mb=rss.peak_mb,
        peak_ram_mb=summary.peak_ram_mb if summary else None,
        power_w=({"mean": summary.mean_power_w, "peak": summary.peak_power_w}
                 if summary and summary.mean_power_w is not None else None),
        versions=_versions(runner),
    )


def _versions(runner) -> dict:
    from importlib import metadata

    from edgevlm import __version__

    out = {"edgevlm": __version__}
    for name in ("onnxruntime", "llama_cpp_python", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def format_table(results: list[BenchResult], names: list[str] | None = None) -> str:
    """llama-bench style table; with several results, ratios against the first."""
    names = names or [Path(r.export["path"]).name for r in results]
    header = f"{'export':24s} {'runtime':11s} {'layers':>6s} {'load s':>7s} {'img ms':>8s} " \
             f"{'TTFT ms':>8s} {'pp tok/s':>9s} {'tg tok/s':>9s} {'peak MB':>8s}"
    lines = [header, "-" * len(header)]

    def med(result, key):
        s = result.summary.get(key)
        return s["median"] if s else None

    def cell(value, width, fmt="{:.1f}"):
        return f"{fmt.format(value) if value is not None else 'n/a':>{width}s}"

    for name, r in zip(names, results, strict=True):
        lines.append(f"{name[:24]:24s} {r.runtime:11s} {str(r.export.get('decoder_layers') or '?'):>6s} "
                     f"{cell(r.load_s, 7, '{:.2f}')} {cell(med(r, 'image_ms'), 8)} "
                     f"{cell(med(r, 'ttft_ms'), 8)} {cell(med(r, 'prefill_tok_s'), 9)} "
                     f"{cell(med(r, 'decode_tok_s'), 9)} {cell(r.peak_rss_mb, 8, '{:.0f}')}")
    if len(results) > 1:
        base = results[0]
        for name, r in zip(names[1:], results[1:], strict=True):
            ratios = []
            for key, label in (("prefill_tok_s", "pp"), ("decode_tok_s", "tg")):
                a, b = med(base, key), med(r, key)
                if a and b:
                    ratios.append(f"{label} x{b / a:.2f}")
            a, b = med(base, "ttft_ms"), med(r, "ttft_ms")
            if a and b:
                ratios.append(f"TTFT x{b / a:.2f}")
            lines.append(f"{name} vs {names[0]}: " + ", ".join(ratios))
    return "\n".join(lines)
