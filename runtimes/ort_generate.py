"""Reference generation loop over an ONNX export: vision encoder -> embeddings -> KV-cache
decoder, with numpy and onnxruntime only (no torch, no transformers), so a device can run it.

The export folder is the transformers.js layout written by `edgevlm.export.onnx_export`:
`config.json` plus `onnx/vision_encoder*.onnx`, `onnx/embed_tokens*.onnx`,
`onnx/decoder_model_merged*.onnx`. Inputs are what the model's processor returns, as numpy.

Speed: past and present KV are bound through IOBinding to one preallocated buffer per layer,
so GroupQueryAttention appends in place (feeding `present` back as `past` cost ~30% decode
speed at 512 cached tokens); `logits` is re-bound before every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import families

# family -> first position id (the family table's onnx_position_start, where not 0).
POSITION_START = {f.name: f.onnx_position_start for f in families.TABLE if f.onnx_position_start}
# Tiles per vision-encoder call: peak memory grows with this, not with the image's tiles.
# Batching tiles buys nothing on a CPU (one 512 px tile is already 1,024 rows per matmul).
VISION_TILE_CHUNK = 1
TILE_KEYS = ("pixel_values", "pixel_attention_mask")  # processor outputs indexed by tile
# ShortV freeze prefill graph's role in manifest.io (export/onnx_export/freeze_prefill.py).
FREEZE_PREFILL = "decoder_prefill_freeze"


@dataclass
class Generation:
    """Output of `OnnxVLM.generate`: greedy (or forced) tokens and what led to them."""

    tokens: list[int]
    prefill_logits: np.ndarray  # (vocab,) at the last prompt position
    argmax: list[int] = field(default_factory=list)  # the graph's own top-1 at every step
    image_features: np.ndarray | None = None


def _ort():
    import onnxruntime as ort

    return ort


def session(path: Path, threads: int | None = None, providers=None, config: dict | None = None,
            arena: bool = True):
    """An InferenceSession with quiet logging, an optional thread count and optional session
    config entries (e.g. {"session.intra_op.allow_spinning": "0"} when several sessions share
    few cores: idle spinning threads of one slow down the other). `arena=False`: activations
    are freed after each run instead of staying in onnxruntime's arena at their peak size."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, str(value))
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OnnxVLM:
    """The three graphs of an export, run together."""

    def __init__(self, folder: str | Path, *, quant: str = "none", vision_quant: str = "none",
                 threads: int | None = None, providers=None, share_buffer: bool | None = None,
                 tile_chunk: int | None = VISION_TILE_CHUNK, freeze: bool = True, io=None):
        """`folder`: the export's `onnx/` folder. `io`: the manifest's ExportIO (default: read
        from the manifest.json above `folder`); the graphs, family and image token come from
        it. `freeze`: prefill prompts with image tokens through the ShortV freeze prefill graph
        when the export has one; False runs the normal decoder for prefill too."""
        folder = Path(folder)
        if io is None:
            from edgevlm.types import ExportArtifact

            io = ExportArtifact.load(folder.parent / "manifest.json").io
        root = folder.parent  # io's paths are relative to the manifest
        self.io = io
        self.tile_chunk = tile_chunk
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())  # vision geometry
        spec = families.family(io.family)
        self.family = spec.name
        self.mrope = spec.mrope
        self.image_token_id = io.image_token_id
        decoder_io = io.graphs["decoder"]
        vision = io.files.get("vision_encoder", {}).get(vision_quant)
        if vision_quant != "none" and vision is None:
            io.path("vision_encoder", vision_quant)  # the one-line error listing what exists
        # The small graphs run right before the decoder: their idle threads must not spin on
        # the cores the decoder needs next.
        quiet = {"session.intra_op.allow_spinning": "0"}
        # The vision encoder runs once per prompt and its activations are the largest of the
        # three graphs: no arena, so they are returned after the image instead of being held
        # through prefill and decode.
        self.vision = (session(root / vision, threads, providers, quiet, arena=False)
                       if vision else None)
        self.embed = session(root / io.path("embed_tokens", "none"), threads, providers, quiet)
        self.decoder = Decoder(root / io.path("decoder", quant),
                               kv_heads=int(decoder_io["num_kv_heads"]),
                               head_dim=int(decoder_io["head_dim"]),
                               threads=threads, providers=providers, share_buffer=share_buffer)
        self.has_position_ids = self.decoder.has_position_ids
        freeze_path = io.files.get(FREEZE_PREFILL, {}).get(quant)
        self.freeze_prefill = (session(root / freeze_path, threads, providers)
                               if freeze and freeze_path else None)

    # --- pieces ------------------------------------------------------------------------
    def encode_image(self, inputs: dict) -> np.ndarray:
        """Image features (num_image_tokens, hidden) from processor outputs."""
        feeds = vision_inputs(self.family, self.config, inputs)
        wanted = {i.name for i in self.vision.get_inputs()}
        return self.vision.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]

    def encode_tiles(self, inputs: dict) -> np.ndarray:
        """`encode_image` over at most `tile_chunk` tiles per call, features concatenated.

        Tiles (SmolVLM's rank-5 pixel_values, axis 1) are encoded independently, so the result
        is the same, but activations (SigLIP's attention matrices alone are 50 MB per tile at
        512 px) scale with one chunk instead of the whole image. Other families: one call."""
        pixels = inputs.get("pixel_values")
        n = pixels.shape[1] if pixels is not None and np.ndim(pixels) == 5 else 0
        if not self.tile_chunk or n <= self.tile_chunk:
            return self.encode_image(inputs)
        parts = []
        for start in range(0, n, self.tile_chunk):
            chunk = {key: (value[:, start:start + self.tile_chunk] if key in TILE_KEYS else value)
                     for key, value in inputs.items()}
            if np.any(chunk["pixel_values"]):  # skip chunks made only of batch padding
                parts.append(self.encode_image(chunk))
        return np.concatenate(parts) if parts else self.encode_image(inputs)

    def embeddings(self, input_ids: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """inputs_embeds with image features written at the image-token positions."""
        embeds = self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})[0]
        if features is not None:
            mask = input_ids == self.image_token_id
            if int(mask.sum()) != len(features):
                raise ValueError(f"{int(mask.sum())} image tokens but {len(features)} image features")
            embeds[mask] = features.astype(embeds.dtype)
        return embeds

    # --- generation --------------------------------------------------------------------
    def prefill(self, inputs: dict, max_new_tokens: int, features: np.ndarray | None = None):
        """Run the prompt; returns (state, logits at the last position). `features`: image
        features already computed (to time the vision encoder apart), else computed here."""
        input_ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        if input_ids.shape[0] != 1:
            raise ValueError("the reference loop runs one prompt at a time (batch 1)")
        if features is None and "pixel_values" in inputs and self.vision:
            features = self.encode_tiles(inputs)
        embeds = self.embeddings(input_ids, features)
        positions, delta = self.prompt_positions(input_ids, inputs)
        cache = self.decoder.cache(max_len=input_ids.shape[1] + max_new_tokens + 1)
        if self.freeze_prefill is not None and features is not None:
            logits, present = self._run_freeze(input_ids, inputs, embeds)
            cache.load(present)
        else:
            logits = cache.run(embeds, positions)
        return DecodeState(cache, input_ids.shape[1], delta, features), logits

    # --- ShortV freeze prefill ---------------------------------------------------------
    def _run_freeze(self, input_ids, inputs, embeds):
        """The freeze prefill graph on a whole prompt: (last logits, present KV list)."""
        positions, _ = self.position_ids(input_ids, inputs)  # the freeze graph always takes them
        text_rows = np.nonzero(input_ids[0] != self.image_token_id)[0].astype(np.int64)
        outputs = self.freeze_prefill.run(None, {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "text_positions": text_rows})
        names = [o.name for o in self.freeze_prefill.get_outputs()]
        present = {"past_key_values." + name[len("present."):]: value
                   for name, value in zip(names, outputs, strict=True) if name.startswith("present.")}
        return outputs[0].reshape(-1, outputs[0].shape[-1])[-1], present

    def freeze_prefill_outputs(self, inputs: dict):
        """Image features -> embeddings -> freeze prefill graph: (last logits, present KV by
        the decode graph's past names, `past_key_values.{i}.key/value`), for checking it."""
        input_ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        features = self.encode_tiles(inputs) if "pixel_values" in inputs and self.vision else None
        return self._run_freeze(input_ids, inputs, self.embeddings(input_ids, features))

    def step(self, state: DecodeState, token: int) -> np.ndarray:
        """Append one token; returns the next logits."""
        pos = state.cache.length
        logits = state.cache.run(self.embeddings(np.array([[token]], dtype=np.int64)),
                                 self.step_positions(pos, state.delta))
        return logits

    def generate(self, inputs: dict, max_new_tokens: int = 16, *, eos_token_id=None,
                 forced_tokens: list[int] | None = None) -> Generation:
        """Greedy decoding for one prompt (batch 1). With `forced_tokens`, those are fed instead
        of the argmax (teacher forcing) and `argmax` records what the graph would have chosen."""
        n_steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
        state, logits = self.prefill(inputs, n_steps)
        prefill = logits.copy()
        tokens, argmax = [], []
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        for step in range(n_steps):
            best = int(np.argmax(logits))
            argmax.append(best)
            token = forced_tokens[step] if forced_tokens is not None else best
            tokens.append(token)
            if token in eos or step == n_steps - 1:
                break
            logits = self.step(state, token)
        features = state.features
        if features is not None:  # without Gemma 3's image-flag channel
            features = features[..., :self.io.hidden_size]
        return Generation(tokens=tokens, prefill_logits=prefill, argmax=argmax,
                          image_features=features)

    def prompt_positions(self, input_ids, inputs):
        """Position ids for the prompt (None where the graph derives them from the mask) and
        the M-RoPE offset that continues them during decode."""
        if not self.has_position_ids:
            return None, 0
        return self.position_ids(input_ids, inputs)

    def position_ids(self, input_ids, inputs):
        """The prompt's position ids (M-RoPE: (3, 1, S)) and the offset that continues them."""
        if self.mrope:
            pos = mrope_position_ids(input_ids[0], inputs.get("image_grid_thw"), self.config,
                                     self.image_token_id)
            return pos[:, None, :], int(pos.max()) + 1 - input_ids.shape[1]
        start = POSITION_START.get(self.family, 0)
        return np.arange(start, start + input_ids.shape[1], dtype=np.int64)[None], start

    def step_positions(self, pos: int, delta: int):
        if not self.has_position_ids:
            return None
        if self.mrope:
            return np.full((3, 1, 1), pos + delta, dtype=np.int64)
        return np.array([[pos + delta]], dtype=np.int64)


@dataclass
class DecodeState:
    """A prompt in progress: its KV cache and the M-RoPE offset for the next positions."""

    cache: KVCache
    prompt_len: int
    delta: int
    features: np.ndarray | None


class Decoder:
    """The builder's KV-cache decoder graph: `inputs_embeds`, `attention_mask`, optional
    `position_ids`, `past_key_values.{i}.key/value` -> `logits` (last position),
    `present.{i}.key/value`."""

    def __init__(self, path: str | Path, *, kv_heads: int, head_dim: int, threads: int | None = None,
                 providers=None, share_buffer: bool | None = None, config: dict | None = None):
        self.path = Path(path)
        self.session = session(path, threads, providers, config)
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.has_position_ids = "position_ids" in names
        # torch.onnx fallback graphs build their attention biases and take no mask.
        self.has_attention_mask = "attention_mask" in names
        self.kv_heads, self.head_dim = kv_heads, head_dim
        meta = self.session.get_modelmeta().custom_metadata_map
        in_place = meta.get("edgevlm.kv_in_place", "1") == "1"
        self.share_buffer = in_place if share_buffer is None else (share_buffer and in_place)

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2

    def cache(self, max_len: int) -> KVCache:
        """A fresh KV cache able to hold `max_len` tokens."""
        return KVCache(self, max_len)


class KVCache:
    """Per-layer KV buffers of the final length, bound as both past and present.

    A decode step is ~10 ms on a small model, so what the host does around `run` shows: the
    KV buffers are bound once (a binding keeps its value until rebound by name), the
    attention mask is a view of one preallocated row, and a one-token step writes its logits
    into one preallocated buffer, so no outputs are fetched and nothing is allocated per
    token."""

    def __init__(self, decoder: Decoder, max_len: int):
        ort = _ort()
        self.decoder = decoder
        self.length = 0
        self.max_len = max_len
        self.binding = decoder.session.io_binding()
        shape = (1, decoder.kv_heads, max_len, decoder.head_dim)
        if decoder.share_buffer:
            # OrtValues over numpy arrays share their memory: `load` writes through `arrays`.
            self.arrays = {n: np.zeros(shape, np.float32) for n in decoder.past_names}
            self.buffers = {n: ort.OrtValue.ortvalue_from_numpy(self.arrays[n])
                            for n in decoder.past_names}
            for past, present in zip(decoder.past_names, decoder.present_names, strict=True):
                self.binding.bind_ortvalue_input(past, self.buffers[past])
                self.binding.bind_ortvalue_output(present, self.buffers[past])
        else:
            empty = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), np.float32)
            self.past = {n: empty for n in decoder.past_names}
        self.mask = np.ones((1, max_len), dtype=np.int64)
        vocab = next(o.shape[-1] for o in decoder.session.get_outputs() if o.name == "logits")
        self.step_logits = (np.empty((1, 1, vocab), np.float32)
                            if decoder.share_buffer and isinstance(vocab, int) else None)
        if self.step_logits is not None:
            self.step_value = ort.OrtValue.ortvalue_from_numpy(self.step_logits)

    def load(self, present: dict) -> None:
        """Start from a prompt's KV cache computed elsewhere (the freeze prefill graph):
        `present` maps each of the decoder's past names to (1, kv_heads, length, head_dim)."""
        names = self.decoder.past_names
        if set(present) != set(names):
            raise ValueError(f"KV cache names differ: got {sorted(present)[:2]}..., the decoder "
                             f"takes {names[:2]}...")
        length = present[names[0]].shape[2]
        if self.length or length > self.max_len:
            raise ValueError(f"cannot load {length} cached tokens into a cache of "
                             f"{self.max_len} holding {self.length}")
        if self.decoder.share_buffer:
            for name in names:
                self.arrays[name][:, :, :length] = present[name]
        else:
            self.past = {name: np.ascontiguousarray(present[name], dtype=np.float32)
                         for name in names}
        self.length = length

    def run(self, embeds: np.ndarray, positions) -> np.ndarray:
        """One decoder call (prefill or a decode step); returns logits (vocab,) at the end."""
        dec, b = self.decoder, self.binding
        if self.length + embeds.shape[1] > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; "
                             f"{self.length + embeds.shape[1]} requested")
        total = self.length + embeds.shape[1]
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        if dec.has_attention_mask:
            b.bind_cpu_input("attention_mask", self.mask[:, :total])
        if positions is not None:
            b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        if not dec.share_buffer:
            for past, present in zip(dec.past_names, dec.present_names, strict=True):
                b.bind_cpu_input(past, self.past[past])
                b.bind_output(present)
        one_token = embeds.shape[1] == 1 and self.step_logits is not None
        if one_token:
            b.bind_ortvalue_output("logits", self.step_value)
        else:
            b.bind_output("logits")
        dec.session.run_with_iobinding(b)
        self.length = total
        if one_token:
            return self.step_logits[0, -1].copy()  # the buffer is overwritten next step
        outputs = b.get_outputs()
        if not dec.share_buffer:
            # get_outputs() follows binding order: presents first, logits last.
            self.past = {past: value.numpy() for past, value in zip(dec.past_names, outputs, strict=False)}
        logits = outputs[-1].numpy()
        return logits.reshape(-1, logits.shape[-1])[-1]


# --- feeding the vision encoder (what transformers.js feeds it) ----------------------------
def vision_inputs(family: str, config: dict, inputs: dict) -> dict:
    """Vision-encoder feeds from processor outputs (numpy), as transformers.js 4 feeds them:
    SmolVLM rank-5 pixel_values + bool pixel_attention_mask; Qwen patches + grid (`grid_thw` for
    Qwen2-VL, `image_grid_thw` for Qwen2.5-VL); others pixel_values."""
    pv = np.asarray(inputs["pixel_values"], dtype=np.float32)
    if family == "smolvlm":
        pv = pv.reshape(-1, *pv.shape[-4:]) if pv.ndim == 5 else pv[None]
        mask = inputs.get("pixel_attention_mask")
        mask = (np.ones((*pv.shape[:2], *pv.shape[-2:]), bool) if mask is None
                else np.asarray(mask).reshape(*pv.shape[:2], *pv.shape[-2:]).astype(bool))
        return {"pixel_values": pv, "pixel_attention_mask": mask}
    if family in ("qwen2-vl", "qwen2.5-vl"):
        grid = families.family(family).onnx_vision_inputs[1]  # Qwen2-VL: grid_thw
        return {"pixel_values": pv, grid: np.asarray(inputs["image_grid_thw"], dtype=np.int64)}
    return {"pixel_values": pv}


def mrope_position_ids(input_ids: np.ndarray, image_grid_thw, config: dict,
                       image_id: int) -> np.ndarray:
    """Qwen2-VL/2.5-VL 3-D (temporal, height, width) position ids (3, S) for one prompt."""
    merge = int(config["vision_config"].get("spatial_merge_size", 2))
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    is_image = input_ids == image_id
    out, pos, i, n = [], 0, 0, len(input_ids)
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
            pos += j - i
        else:
            t, h, w = next(grids)
            gt, gh, gw = t, h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh) + pos, np.arange(gw) + pos,
                                     indexing="ij")
            block = np.stack([tt + pos, hh, ww]).reshape(3, -1)
            out.append(block[:, : j - i])
            pos += max(h, w) // merge
        i = j
    return np.concatenate(out, axis=1).astype(np.int64)
