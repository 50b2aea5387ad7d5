"""bench(): time an export on this device: load, image encode, TTFT, prefill and decode
tokens/s, peak memory per phase (and Jetson power), over warm-up and repeated runs, and how
close each phase comes to the device profile's roofline. bench_many(): several exports,
each in its own process, repetitions interleaved."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from edgevlm.runtimes.artifact import open_export
from edgevlm.runtimes.base import runner_class, runner_for_target
from edgevlm.runtimes.measure import PhaseMemory, phase
from edgevlm.runtimes.provenance import package_versions
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
    max_image_tokens: int | None = None  # image budget (runtimes/image_budget.py)


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


def make_runner(target, profile=None, *, runtime: str | None = None, threads: int | None = None,
                max_image_tokens: int | None = None):
    """(runner, artifact, root) for an export folder or manifest, hashes checked."""
    klass = make_runner_class(target, profile, runtime)
    artifact, root = open_export(target, check_hashes=False)  # make_runner_class checked them
    return klass(root, artifact, profile, threads, max_image_tokens), artifact, root


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
    with PhaseMemory() as memory:
        phase("image")  # preprocessing counts with the image; the runner marks the rest
        trace = runner.generate(image, config.prompt, max_tokens=config.gen_tokens,
                                ignore_eos=True)
    return {
        "prompt_tokens": trace.prompt_tokens,
        "generated_tokens": len(trace.tokens),
        "image_tokens": getattr(runner, "image_tokens", None),
        "image_ms": trace.image_s * 1e3 if trace.image_s is not None else None,
        "ttft_ms": trace.ttft_s * 1e3,
        "prefill_tok_s": trace.prefill_tok_s,
        "decode_tok_s": trace.decode_tok_s,
        "memory_mb": memory.peaks,
    }


class Session:
    """One export loaded in this process: load (timed, its memory traced), then generations."""

    def __init__(self, target, config: BenchConfig, profile=None):
        self.config = config
        self.image = bench_image(config.image_size)
        with PhaseMemory() as memory:
            phase("load")
            self.runner, self.artifact, self.root = make_runner(
                target, profile, runtime=config.runtime, threads=config.threads,
                max_image_tokens=config.max_image_tokens)
            start = time.perf_counter()
            self.runner.load()
            self.load_s = time.perf_counter() - start
        facts = getattr(self.runner, "model_facts", None)
        self.header = {
            "export": {"path": str(self.root), "target": self.artifact.target,
                       "family": self.artifact.io.family,
                       "quant": self.artifact.quantization["decoder"],
                       "decoder_layers": self.artifact.io.num_layers,
                       "plan": self.artifact.plan.to_dict() if self.artifact.plan else None},
            "runtime": self.runner.name, "threads": self.runner.threads, "load_s": self.load_s,
            "load_mb": memory.peaks.get("load"), "facts": facts() if facts else None,
            "versions": package_versions("edgevlm", "onnxruntime", "llama_cpp_python",
                                                 "numpy")}

    def run(self) -> dict:
        return run_once(self.runner, self.image, self.config)

    def decode_at(self, context: int, new: int) -> dict:
        return decode_at(self.runner, context, new)

    def close(self) -> None:
        self.runner.close()


def decode_at(runner, context: int, new: int) -> dict:
    """Bare decode speed after `context` cached tokens of text: the runner's own step
    function in a greedy loop, no sampling, no streaming (the runtime's figure)."""
    import numpy as np

    def text(vocab: int):  # ordinary token ids, whatever the vocabulary's size
        return np.random.default_rng(0).integers(vocab // 10, vocab // 2, size=(1, context),
                                                 dtype=np.int64)

    if runner.target == "onnx":
        from edgevlm.runtimes.ort_generate import DecodeState

        vlm = runner.vlm
        ids = text(int((vlm.config.get("text_config") or vlm.config)["vocab_size"]))
        positions, delta = vlm.prompt_positions(ids, {})
        cache = vlm.decoder.cache(max_len=context + new + 1)
        logits = cache.run(vlm.embeddings(ids), positions)
        state = DecodeState(cache, context, delta, None)

        def step(token):
            return vlm.step(state, token)
    else:
        from edgevlm.runtimes.llamacpp_runner import Decoder

        decoder = Decoder(runner.llm)  # a cleared KV cache; the runner's own decode step
        decoder.tokens(text(decoder.n_vocab)[0].tolist())
        logits = decoder.last_logits()

        def step(token):
            decoder.tokens([token])
            return decoder.last_logits()
    start = time.perf_counter()
    for _ in range(new):
        logits = step(int(np.argmax(logits)))
    return {"context": context, "tokens": new, "decode_tok_s": new / (time.perf_counter() - start)}


def result_of(header: dict, warmup: list[dict], runs: list[dict], config: BenchConfig,
            profile, facts, tegra=None) -> BenchResult:
    memory = {"load": header["load_mb"]}
    for run in warmup + runs:  # a user's first generation is a warm-up: its peak counts
        for name, value in run["memory_mb"].items():
            memory[name] = max(memory.get(name) or 0.0, value)
    memory = {name: value for name, value in memory.items() if value is not None}
    return BenchResult(
        export=header["export"],
        device={"profile": profile.name if profile else None,
                "facts": facts.to_dict() if facts is not None else None,
                "platform": platform.platform()},
        runtime=header["runtime"],
        config={"runs": config.runs, "warmup": config.warmup, "gen_tokens": config.gen_tokens,
                "threads": header["threads"], "prompt": config.prompt,
                "image_size": list(config.image_size),
                "max_image_tokens": config.max_image_tokens},
        load_s=header["load_s"],
        runs=runs,
        summary=_summary(runs),
        peak_rss_mb=max(memory.values()) if memory else None,
        peak_ram_mb=tegra.peak_ram_mb if tegra else None,
        power_w=({"mean": tegra.mean_power_w, "peak": tegra.peak_power_w}
                 if tegra and tegra.mean_power_w is not None else None),
        versions=header["versions"],
        memory_mb=memory or None,
        roofline=roofline(header["facts"], runs, profile),
    )


def roofline(facts: dict | None, runs: list[dict], profile) -> dict | None:
    """Median run against the profile's bandwidth and peak compute (runtimes/roofline.py).
    Decode's context is the mean over the generated tokens: prompt + half the answer."""
    from edgevlm.runtimes.roofline import compute_fraction, decode_roofline

    if not facts or not runs or profile is None:
        return None
    text, vision = facts["text"], facts["vision"]
    run = sorted(runs, key=lambda r: r.get("decode_tok_s") or 0)[len(runs) // 2]
    context = run["prompt_tokens"] + run["generated_tokens"] // 2
    pp = run.get("prefill_tok_s")
    image_tokens, image_ms = run.get("image_tokens"), run.get("image_ms")
    return {
        "bandwidth_gbs": profile.memory_bandwidth_gbs, "peak_gflops": profile.peak_gflops,
        "decode": decode_roofline(run.get("decode_tok_s"), facts["decoder_weight_bytes"],
                                  text.kv_values_per_token() * facts["kv_bytes_per_value"],
                                  context, profile.memory_bandwidth_gbs),
        "prefill": compute_fraction(text.prefill_flops(run["prompt_tokens"]),
                                    run["prompt_tokens"] / pp if pp else None, profile.peak_gflops),
        "image": compute_fraction(vision.image_flops(image_tokens) if vision and image_tokens else None,
                                  image_ms / 1e3 if image_ms else None, profile.peak_gflops),
    }


def bench(target, config: BenchConfig | None = None, profile=None, facts=None) -> BenchResult:
    """Load the export once, run warm-up + timed generations, and summarise."""
    from edgevlm.devices import TegrastatsSampler

    config = config or BenchConfig()
    session = Session(target, config, profile)
    warmup = [session.run() for _ in range(config.warmup)]
    tegra = None
    if profile is not None and profile.memory_source == "tegrastats":
        with TegrastatsSampler() as sampler:
            runs = [session.run() for _ in range(config.runs)]
        tegra = sampler.summary
    else:
        runs = [session.run() for _ in range(config.runs)]
    session.close()
    return result_of(session.header, warmup, runs, config, profile, facts, tegra)


def _serve(conn, target, config: BenchConfig, profile) -> None:
    """A worker process holding one export: runs Session methods ("run", "decode_at") on
    command until "close"."""
    try:
        session = Session(target, config, profile)
        conn.send(("ok", session.header))
        while (command := conn.recv())[0] != "close":
            conn.send(("ok", getattr(session, command[0])(*command[1:])))
        session.close()
        conn.send(("ok", None))
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    def __init__(self, target, config, profile):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of onnxruntime/llama threads
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, target, config, profile),
                                       daemon=True)
        self.process.start()
        self.header = self._answer()

    def _answer(self):
        from edgevlm.errors import EdgeVLMError

        status, value = self.conn.recv()
        if status == "error":
            raise EdgeVLMError(f"benchmark worker failed: {value}", "run with -v for details")
        return value

    def run(self) -> dict:
        self.conn.send(("run",))
        return self._answer()

    def decode_at(self, context: int, new: int) -> dict:
        self.conn.send(("decode_at", context, new))
        return self._answer()

    def close(self) -> None:
        self.conn.send(("close",))
        self._answer()
        self.process.join()


class Workers:
    """Worker processes that end together: each closed when the block ends, and any still
    alive killed if it fails (a worker must never outlive its benchmark)."""

    def __init__(self):
        self.started: list[Worker] = []

    def start(self, target, config, profile) -> Worker:
        worker = Worker(target, config, profile)
        self.started.append(worker)
        return worker

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                for worker in self.started:
                    worker.close()
        finally:
            for worker in self.started:
                if worker.process.is_alive():
                    worker.process.kill()


def bench_many(targets: list, config: BenchConfig | None = None, profile=None,
               facts=None) -> list[BenchResult]:
    """Several exports, each in its own process (its memory is its own), loaded one after the
    other, then repetitions interleaved A B C A B C ...: on a shared machine, load changes hit
    every export alike, and per-round ratios (`ratios`) pair runs made side by side.
    Jetson's tegrastats is system-wide, so it is not attributed to one export here."""
    config = config or BenchConfig()
    for target in targets:  # refuse a bad export or a missing runtime before starting any
        make_runner_class(target, profile, config.runtime)
    with Workers() as pool:
        workers = [pool.start(target, config, profile) for target in targets]
        warmups = [[w.run() for _ in range(config.warmup)] for w in workers]
        runs = [[] for _ in workers]
        for _ in range(config.runs):
            for worker, out in zip(workers, runs, strict=True):
                out.append(worker.run())
    return [result_of(w.header, warm, r, config, profile, facts)
            for w, warm, r in zip(workers, warmups, runs, strict=True)]


def make_runner_class(target, profile=None, runtime: str | None = None):
    """The runner class for an export (checked: hashes, runtime installed), without loading."""
    artifact, _ = open_export(target)
    klass = runner_class(runtime) if runtime else runner_for_target(artifact.target)
    if klass.target != artifact.target:
        from edgevlm.errors import UsageError

        raise UsageError(f"runtime '{klass.name}' cannot run a {artifact.target} export",
                         f"use the {runner_for_target(artifact.target).name} runtime")
    klass.require(profile)
    return klass


def ratios(results: list[BenchResult]) -> dict:
    """Each result against the first, per round (run i of each): median, min and max of the
    ratios. Speeds: higher is better for tok/s, so x1.2 = 20% faster; TTFT: x0.8 = 20% less."""
    out = {}
    base = results[0]
    for index, result in enumerate(results[1:], start=1):
        entry = {}
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "image_ms"):
            pairs = [(a.get(key), b.get(key)) for a, b in zip(base.runs, result.runs, strict=False)]
            values = [b / a for a, b in pairs if a and b]
            if values:
                entry[key] = {"median": statistics.median(values), "min": min(values),
                              "max": max(values)}
        if base.peak_rss_mb and result.peak_rss_mb:
            entry["peak_rss_mb"] = result.peak_rss_mb / base.peak_rss_mb
        out[str(index)] = entry
    return out


def format_table(results: list[BenchResult], names: list[str] | None = None) -> str:
    """llama-bench style table, then peak memory per phase and the roofline; with several
    results, per-round ratios against the first (median [min-max])."""
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
    roof = next((r.roofline for r in results if r.roofline), None)
    lines.append("")
    lines.append("peak RSS MB per phase" + (
        f"; roofline of the profile ({roof['bandwidth_gbs']:g} GB/s, {roof['peak_gflops']:g} "
        "GFLOP/s): decode % of bandwidth, prefill and image % of peak compute" if roof else ""))
    header = f"{'export':24s} {'load':>7s} {'image':>7s} {'prefill':>7s} {'decode':>7s} " \
             f"{'tg MB/tok':>9s} {'tg %BW':>7s} {'pp %peak':>8s} {'img %peak':>9s}"
    lines += [header, "-" * len(header)]
    for name, r in zip(names, results, strict=True):
        memory = r.memory_mb or {}
        roof = r.roofline or {}

        def pct(part, roof=roof):
            return cell(roof[part]["fraction"] * 100 if roof.get(part) else None, 0, "{:.0f}%")

        decode = roof.get("decode")
        lines.append(f"{name[:24]:24s} " + " ".join(cell(memory.get(k), 7, "{:.0f}")
                                                    for k in ("load", "image", "prefill", "decode"))
                     + f" {cell(decode['bytes_per_token'] / 1e6 if decode else None, 9)}"
                     + f" {pct('decode'):>7s} {pct('prefill'):>8s} {pct('image'):>9s}")
    if len(results) > 1:
        labels = {"prefill_tok_s": "pp", "decode_tok_s": "tg", "ttft_ms": "TTFT", "image_ms": "img"}
        lines.append("")
        lines.append("ratios against the first, per interleaved round: median [min-max]")
        for name, entry in zip(names[1:], ratios(results).values(), strict=True):
            parts = [f"{labels[k]} x{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
                     for k, v in entry.items() if k in labels]
            if "peak_rss_mb" in entry:
                parts.append(f"peak MB x{entry['peak_rss_mb']:.2f}")
            lines.append(f"{name} vs {names[0]}: " + ", ".join(parts))
    return "\n".join(lines)
