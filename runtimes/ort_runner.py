"""onnxruntime runner: an ONNX export (vision encoder, embeddings, KV-cache decoder) with
numpy/Pillow preprocessing that reproduces the HF processor. Torch-free."""

from __future__ import annotations

import time

from edgevlm.runtimes.base import Runner, Trace
from edgevlm.runtimes.measure import phase
from edgevlm.runtimes.sampling import decode_loop


class OrtRunner(Runner):
    """Runs `onnx` exports with the decoder variant the export was made for."""

    name = "onnxruntime"
    target = "onnx"
    package = "onnxruntime"
    pip_name = "onnxruntime"

    def __init__(self, *args, decoder_quant: str | None = None, vision_quant: str | None = None,
                 **kwargs):
        """`decoder_quant`/`vision_quant` pick another variant of the export (e.g. "none" for
        the fp32 graphs); default: the quantization the export was made for."""
        super().__init__(*args, **kwargs)
        self.decoder_quant, self.vision_quant = decoder_quant, vision_quant

    def load(self) -> None:
        self.require(self.profile)
        from edgevlm.runtimes.image_budget import preprocessor
        from edgevlm.runtimes.ort_generate import OnnxVLM

        folder = self.root / "onnx"
        quant = self.artifact.quantization
        providers = self.profile.providers_for("decoder") if self.profile else None
        self.vlm = OnnxVLM(folder, quant=self.decoder_quant or quant.get("decoder", "none"),
                           vision_quant=self.vision_quant or quant.get("vision_encoder", "none"),
                           threads=self.threads, providers=_available(providers),
                           io=self.artifact.io)
        self.pre = preprocessor(folder, self.max_image_tokens)  # the budget, if any

    def generate(self, image, prompt, *, max_tokens=128, temperature=0.0, top_p=1.0, seed=0,
                 ignore_eos=False, on_text=None) -> Trace:
        start = time.perf_counter()
        inputs = self.pre(image, prompt)
        phase("image")
        t0 = time.perf_counter()
        features = self.vlm.encode_tiles(inputs) if self.vlm.vision else None
        t1 = time.perf_counter()
        self.image_tokens = len(features) if features is not None else 0
        phase("prefill")
        state, logits = self.vlm.prefill(inputs, max_tokens, features)
        prefill_s = time.perf_counter() - t1
        phase("decode")
        eos = set(self.pre.eos_token_ids)
        tokens, times, stop = decode_loop(
            logits, lambda token: self.vlm.step(state, token), eos.__contains__,
            self.pre.stream(), start=start, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, ignore_eos=ignore_eos, on_text=on_text)
        return Trace(prompt_tokens=int(inputs["input_ids"].shape[1]), tokens=tokens,
                     text=self.pre.decode(tokens), image_s=t1 - t0, prefill_s=prefill_s,
                     token_times=times, stop=stop)


    def model_facts(self) -> dict:
        """Shapes and bytes for the roofline (runtimes/roofline.py): the decoder graph's file
        is what a decode step reads (embeddings are a separate, looked-up graph); KV is fp32."""
        from edgevlm.runtimes.roofline import text_shape_from_config, vision_shape_from_config

        path = self.vlm.decoder.path
        data = path.with_name(path.name + ".data")
        weights = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        return {"text": text_shape_from_config(self.vlm.config),
                "vision": vision_shape_from_config(self.vlm.config),
                "decoder_weight_bytes": weights, "kv_bytes_per_value": 4}


def _available(providers):
    """The profile's providers that this onnxruntime build has, in the profile's order."""
    if not providers:
        return None
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in providers if p in have]
    return chosen or ["CPUExecutionProvider"]
