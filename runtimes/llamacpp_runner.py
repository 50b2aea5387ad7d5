"""llama.cpp runner: a GGUF export (text model + mmproj) through llama-cpp-python and its
multimodal (mtmd) bindings. Torch-free.

The prompt is the model's own chat template (embedded in the GGUF) with the image
placeholder replaced by mtmd's media marker; mtmd adds each family's image wrapper tokens
and positions (M-RoPE for Qwen2-VL, non-causal image attention for Gemma 3).
"""

from __future__ import annotations

import ctypes
import time
from collections import deque

import numpy as np

from edgevlm.errors import EdgeVLMError, UsageError
from edgevlm.runtimes import families
from edgevlm.runtimes.base import Runner, Trace
from edgevlm.runtimes.families import user_turn
from edgevlm.runtimes.image_budget import check_llamacpp_count, llamacpp_image_max_tokens
from edgevlm.runtimes.measure import phase
from edgevlm.runtimes.preprocess.prompt import compile_template
from edgevlm.runtimes.sampling import TextStream, decode_loop


def _NO_CALLBACK():
    from llama_cpp import mtmd_cpp as mtmd

    return ctypes.cast(None, mtmd.mtmd_helper_post_decode_callback)


def silence_native_logs() -> None:
    """llama.cpp and mtmd log every step to stderr; keep their log in memory instead, so an
    error can quote its last lines (`native_error`) while our own output stays clean."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    global _LOG_SINK
    if _LOG_SINK is None:
        def keep(level, text, _user_data):
            if level != 1 and text:  # 1: GGML_LOG_LEVEL_DEBUG
                _LOG.append(text.decode("utf-8", "replace"))

        _LOG_SINK = llama_cpp.llama_log_callback(keep)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(_LOG_SINK, ctypes.c_void_p(0))


_LOG_SINK = None
_LOG: deque[str] = deque(maxlen=500)  # log fragments (llama.cpp writes lines in pieces)


def native_log_tail(n: int = 6) -> list[str]:
    """The last `n` non-empty lines llama.cpp / mtmd logged since the log was captured."""
    lines = [line.strip() for line in "".join(_LOG).splitlines() if line.strip()]
    return lines[-n:]


def native_error(what: str, fix: str) -> EdgeVLMError:
    """An error for a failed llama.cpp call, quoting the end of llama.cpp's captured log (the
    log itself is never shown, so "see the log" would send the user nowhere)."""
    tail = native_log_tail()
    said = (" — llama.cpp's last log lines: " + " | ".join(tail)) if tail else (
        " (llama.cpp logged nothing)")
    return EdgeVLMError(what + said, fix)


def render_chat(template, prompt: str, *, bos: str = "", eos: str = "") -> str:
    """One user turn (image, then text), ready for the answer, rendered by a chat template
    compiled as transformers compiles it (`compile_template`)."""
    return template.render(messages=user_turn(prompt), tools=None, documents=None,
                           add_generation_prompt=True, bos_token=bos, eos_token=eos)


class LlamaCppRunner(Runner):
    """Runs `gguf` exports."""

    name = "llama.cpp"
    target = "gguf"
    package = "llama_cpp"
    pip_name = "llama-cpp-python"

    def __init__(self, *args, n_ctx: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_ctx = n_ctx
        self.llm = self.mtmd_ctx = None

    def load(self) -> None:
        llama_cpp = self.require(self.profile)
        from llama_cpp import mtmd_cpp as mtmd

        silence_native_logs()
        text = self.root / self.artifact.io.path("text_model")
        mmproj = self.root / self.artifact.io.path("mmproj")
        gpu_layers = self.profile.gpu_layers if self.profile else 0
        threads = self.threads or 0
        self.llm = llama_cpp.Llama(
            model_path=str(text), n_ctx=self.n_ctx, n_batch=512, n_gpu_layers=gpu_layers,
            n_threads=threads or None, n_threads_batch=threads or None, verbose=False)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu_layers != 0
        params.n_threads = threads or 1
        params.print_timings = False
        params.warmup = False
        # The image budget: mtmd's own pixel cap (runtimes/image_budget.py says what it does
        # per family); 0 keeps the model's default.
        params.image_max_tokens = llamacpp_image_max_tokens(self.artifact, self.max_image_tokens)
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.mtmd_ctx:
            raise native_error(f"llama.cpp could not load the mmproj {mmproj}",
                               "check the file; export it again if it is damaged")
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise EdgeVLMError(f"{text.name} has no tokenizer.chat_template",
                               "export it again with edgevlm (it embeds the template)")
        self.template = compile_template(template)  # once, not per prompt
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = self._piece(self.llm.token_bos())
        self.eos = self._piece(self.llm.token_eos())

    def _piece(self, token: int) -> str:
        if token is None or token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def prompt_text(self, prompt: str) -> str:
        from llama_cpp import mtmd_cpp as mtmd

        text = render_chat(self.template, prompt, bos=self.bos, eos=self.eos)
        spec = families.family(self.artifact.io.family)
        placeholder = spec.gguf_image_text
        marker = mtmd.mtmd_default_marker().decode()
        if placeholder not in text:
            raise EdgeVLMError("the chat template did not place the image",
                               f"expected '{placeholder}' in the rendered prompt")
        before, after = spec.gguf_around_image
        return text.replace(placeholder, before + marker + after, 1)

    def _chunks(self, image, prompt: str):
        from llama_cpp import mtmd_cpp as mtmd

        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        height, width = rgb.shape[:2]
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, buf)
        chunks = mtmd.mtmd_input_chunks_init()
        encoded = self.prompt_text(prompt).encode()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len = encoded, len(encoded)
        text.add_special, text.parse_special = False, True  # the template wrote BOS itself
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            if mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise native_error("mtmd could not tokenize the prompt with the image",
                                   "check the image file and the mmproj")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        image_tokens = sum(
            mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
            for i in range(mtmd.mtmd_input_chunks_size(chunks))
            if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
            == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        try:
            check_llamacpp_count(self.artifact.io.family, image_tokens, self.max_image_tokens)
            self._check_fits(chunks, image_tokens)
        except UsageError:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        return chunks

    def _check_fits(self, chunks, image_tokens: int) -> None:
        """Refuse a prompt the context cannot hold before llama.cpp sees it: past n_ctx it fails
        with a bare code, and an image chunk that must decode in one batch (Gemma 3's
        non-causal image attention) larger than the batch aborts the process (GGML_ASSERT)."""
        from llama_cpp import mtmd_cpp as mtmd

        chunk_list = [mtmd.mtmd_input_chunks_get(chunks, i)
                      for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        total = sum(mtmd.mtmd_input_chunk_get_n_tokens(c) for c in chunk_list)
        if total >= self.n_ctx:  # the first answer token needs one more cell
            raise UsageError(
                f"the prompt with its image is {total} tokens ({image_tokens} of them the "
                f"image), more than this {self.n_ctx}-token llama.cpp context holds",
                "shorten the prompt or cap the image with --max-image-tokens")
        for chunk in chunk_list:
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if (mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
                    and mtmd.mtmd_decode_use_non_causal(self.mtmd_ctx, chunk)
                    and n > self.llm.n_batch):
                raise UsageError(
                    f"an image of {n} tokens must decode in one llama.cpp batch of at most "
                    f"{self.llm.n_batch}", "cap the image with --max-image-tokens")

    def _logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _decode_text(self, ids: list[int], n_past: int, logits_last: bool) -> int:
        """Decode tokens at explicit positions n_past.. (mtmd's single-chunk text helper
        ignores n_past after an image chunk in this llama.cpp build)."""
        import llama_cpp

        for start in range(0, len(ids), self.llm.n_batch):
            part = ids[start:start + self.llm.n_batch]
            batch = llama_cpp.llama_batch_init(len(part), 0, 1)
            try:
                batch.n_tokens = len(part)
                for i, token in enumerate(part):
                    batch.token[i] = token
                    batch.pos[i] = n_past + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = logits_last and start + i == len(ids) - 1
                rc = llama_cpp.llama_decode(self.llm.ctx, batch)
            finally:
                llama_cpp.llama_batch_free(batch)
            if rc != 0:
                return rc
        return 0

    def generate(self, image, prompt, *, max_tokens=128, temperature=0.0, top_p=1.0, seed=0,
                 ignore_eos=False, on_text=None) -> Trace:
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        start = time.perf_counter()
        chunks = self._chunks(image, prompt)
        n_past, prompt_tokens, image_s = 0, 0, 0.0
        self.image_tokens = 0  # summed over the image's chunks (SmolVLM: one per tile group)
        loop_start = time.perf_counter()
        try:
            count = mtmd.mtmd_input_chunks_size(chunks)
            for i in range(count):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                prompt_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                new_n_past = llama_cpp.llama_pos(0)
                last = i == count - 1
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    phase("image")
                    self.image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    t0 = time.perf_counter()
                    if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                        raise native_error("mtmd could not encode the image",
                                           "check the mmproj file (export it again)")
                    image_s += time.perf_counter() - t0
                    phase("prefill")
                    embd = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
                    rc = mtmd.mtmd_helper_decode_image_chunk(
                        self.mtmd_ctx, self.llm.ctx, chunk, embd, n_past, 0, self.llm.n_batch,
                        ctypes.byref(new_n_past), _NO_CALLBACK(), None)
                else:
                    phase("prefill")
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    rc = self._decode_text([ptr[j] for j in range(n.value)], n_past, last)
                    new_n_past.value = n_past + n.value
                if rc != 0:
                    raise native_error(f"llama.cpp failed to evaluate prompt chunk {i} ({rc})",
                                       "the prompt may not fit the context")
                n_past = new_n_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        prefill_s = time.perf_counter() - loop_start - image_s
        position = [n_past]

        used = [prompt_tokens]  # KV cells filled (M-RoPE positions advance less than this)

        def step(token: int) -> np.ndarray:
            if used[0] >= self.n_ctx:
                raise UsageError(
                    f"the answer reached the end of the {self.n_ctx}-token llama.cpp context "
                    f"(prompt {prompt_tokens} tokens)", "ask for fewer tokens (--max-tokens)")
            if self._decode_text([token], position[0], True) != 0:
                raise native_error("llama_decode failed",
                                   "the context is full: ask for fewer tokens")
            position[0] += 1
            used[0] += 1
            return self._logits()

        phase("decode")
        stream = TextStream(lambda ids: self.llm.detokenize(ids))
        tokens, times, stop = decode_loop(
            self._logits(), step, lambda t: llama_cpp.llama_vocab_is_eog(self.vocab, t), stream,
            start=start, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            ignore_eos=ignore_eos, on_text=on_text)
        return Trace(prompt_tokens=prompt_tokens, tokens=tokens, text=stream.text, image_s=image_s,
                     prefill_s=prefill_s, token_times=times, stop=stop)

    def model_facts(self) -> dict:
        """Shapes and bytes for the roofline (runtimes/roofline.py); llama.cpp's KV is f16."""
        from edgevlm.runtimes.roofline import (
            gguf_decode_bytes,
            read_gguf,
            text_shape_from_gguf,
            vision_shape_from_gguf,
        )

        text, tensors = read_gguf(self.root / self.artifact.io.path("text_model"))
        mmproj, _ = read_gguf(self.root / self.artifact.io.path("mmproj"))
        return {"text": text_shape_from_gguf(text), "vision": vision_shape_from_gguf(mmproj),
                "decoder_weight_bytes": gguf_decode_bytes(tensors), "kv_bytes_per_value": 2}

    def close(self) -> None:
        if self.mtmd_ctx:
            from llama_cpp import mtmd_cpp as mtmd

            mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None
