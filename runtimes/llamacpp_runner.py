"""llama.cpp runner: a GGUF export (text model + mmproj) through llama-cpp-python and its
multimodal (mtmd) bindings, and the one llama.cpp driver (`Decoder`, `open_text`,
`image_embeddings`) that both the runner and export verification use. Torch-free.

The prompt is the model's own chat template (embedded in the GGUF) with the image
placeholder replaced by mtmd's media marker; mtmd adds each family's image wrapper tokens
and positions (M-RoPE for Qwen2-VL, non-causal image attention for Gemma 3).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from pathlib import Path

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


def threads_for(path) -> int:
    """Threads for verification runs: one for small files (a second thread buys nothing there,
    and llama.cpp's busy-waiting workers slow to a crawl on shared cores), else up to 4."""
    if Path(path).stat().st_size < 64 * 2**20:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def context_size(n_tokens: int) -> int:
    """A context (and batch, so one image decodes in one ubatch) that holds `n_tokens`: the
    longest sequence verification feeds, rounded up to 256."""
    return max(256, -(-n_tokens // 256) * 256)


def open_text(path, n_ctx: int = 1024):
    """The text GGUF for verification: an F32 KV cache (parity measures the file, not the
    cache's F16) and a batch as large as the context. `n_ctx` must hold the longest sequence
    fed (`context_size`)."""
    import llama_cpp

    silence_native_logs()  # clip/mtmd log every image to stderr even with verbose=False

    threads = threads_for(path)
    try:
        return _llama(llama_cpp, path, n_ctx, threads)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise native_error(f"llama.cpp could not load {Path(path).name} ({exc})",
                           "export it again; if it persists, report it with the manifest") from exc


def _llama(llama_cpp, path, n_ctx: int, threads: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=True, n_threads=threads, n_threads_batch=threads,
                           verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def check_fits(n_used: int, n: int, n_ctx: int, n_batch: int | None,
               what: str = "tokens") -> None:
    """Refuse, before llama.cpp sees it, a run that would not fit: more than `n_batch` at once
    aborts the whole process inside llama_decode (GGML_ASSERT, a C abort that kills Python),
    and past `n_ctx` (`n_used` cells already filled) llama.cpp fails with a bare code."""
    if n_used + n > n_ctx:
        raise EdgeVLMError(
            f"{n} {what} after {n_used} already decoded do not fit this {n_ctx}-token "
            f"llama.cpp context (they need {n_used + n})",
            "open the context with context_size() of the longest sequence fed")
    if n_batch is not None and n > n_batch:
        raise EdgeVLMError(
            f"{n} {what} in one llama.cpp batch, more than its batch size {n_batch}",
            "open the context with n_batch = n_ctx (open_text does), or feed fewer at once")


def text_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits for every position of `ids` (fresh KV cache)."""
    check_fits(0, len(ids), llm.n_ctx(), llm.n_batch, "text tokens")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


class Decoder:
    """Feeds token runs and embedding runs into one llama.cpp context at explicit positions:
    the runner's prompt text and decode steps, and verification's PyTorch-aligned sequences.
    (mtmd's own single-chunk text helper ignores n_past after an image chunk in this
    llama.cpp build, so positions are kept here.)"""

    def __init__(self, llm, *, non_causal_images: bool = False):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llm
        self.ctx = llm.ctx
        self.n_embd = llama_cpp.llama_model_n_embd(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        self.non_causal_images = non_causal_images
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = min(llama_cpp.llama_n_batch(self.ctx), llama_cpp.llama_n_ubatch(
            self.ctx)) if non_causal_images else llama_cpp.llama_n_batch(self.ctx)
        self.n_past = 0  # the next position (M-RoPE images advance it less than their count)
        self.n_used = 0  # KV cells filled: one per token or embedding fed
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def _decode(self, batch) -> None:
        rc = self.lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise native_error(
                f"llama_decode failed with code {rc} at position {self.n_past} of a "
                f"{self.lib.llama_n_ctx(self.ctx)}-token context",
                "code 1 means the context is full: give it a larger context or feed less; "
                "otherwise report this with the manifest")

    def tokens(self, ids: list[int], logits: bool = True) -> None:
        """Decode a token run at the next positions, in batches of at most n_batch; with
        `logits`, the last token's logits are kept (`last_logits`)."""
        n = len(ids)
        check_fits(self.n_used, n, self.n_ctx, None)  # batches are split below
        step = self.lib.llama_n_batch(self.ctx)
        for start in range(0, n, step):
            part = ids[start:start + step]
            batch = self.lib.llama_batch_init(len(part), 0, 1)
            try:
                batch.n_tokens = len(part)
                for i, tok in enumerate(part):
                    batch.token[i] = tok
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = logits and start + i == n - 1
                self._decode(batch)
            finally:
                self.lib.llama_batch_free(batch)
            self.n_past += len(part)
            self.n_used += len(part)

    def embeddings(self, embs: np.ndarray, grid: tuple[int, int] | None = None) -> None:
        """Decode one image's embeddings. With `grid` (rows, cols of merged patches) the
        positions are M-RoPE's (t, y, x, 0) sections, as Qwen-VL and mtmd lay them out, and the
        next text position advances by max(rows, cols) instead of the token count."""
        lib = self.lib
        n = embs.shape[0]
        check_fits(self.n_used, n, self.n_ctx, self.n_batch, "image embeddings")
        flat = np.ascontiguousarray(embs, dtype=np.float32).ravel()
        embd = (ctypes.c_float * flat.size).from_buffer_copy(flat.tobytes())
        if grid is None:
            positions = [self.n_past + i for i in range(n)]
            advance = n
        else:
            rows, cols = grid
            if rows * cols != n:
                raise EdgeVLMError(f"image grid {rows}x{cols} does not hold {n} embeddings",
                                   "the mmproj and the processor disagree on the image size")
            # llama.cpp reads an embedding batch's positions as n_tokens entries per section.
            positions = ([self.n_past] * n + [self.n_past + i // cols for i in range(n)]
                         + [self.n_past + i % cols for i in range(n)] + [0] * n)
            advance = max(rows, cols)
        pos = (lib.llama_pos * len(positions))(*positions)
        n_seq = (ctypes.c_int32 * n)(*([1] * n))
        seq0 = (lib.llama_seq_id * 1)(0)
        seq_ids = (ctypes.POINTER(lib.llama_seq_id) * n)(*([ctypes.cast(seq0, ctypes.POINTER(
            lib.llama_seq_id))] * n))
        logits = (ctypes.c_int8 * n)(*([0] * (n - 1) + [1]))
        batch = lib.llama_batch(n_tokens=n, token=None, embd=embd, pos=pos, n_seq_id=n_seq,
                                seq_id=seq_ids, logits=logits)
        if self.non_causal_images:
            lib.llama_set_causal_attn(self.ctx, False)
        try:
            self._decode(batch)
        finally:
            if self.non_causal_images:
                lib.llama_set_causal_attn(self.ctx, True)
        self.n_past += advance
        self.n_used += n

    def last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()


def image_embeddings(llm, mmproj_path, image) -> np.ndarray:
    """The mmproj's embeddings for one PIL image, all image chunks concatenated in order."""
    from llama_cpp import mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = threads_for(mmproj_path)
    params.print_timings = False
    params.warmup = False
    mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    if not mctx:
        raise native_error(f"llama.cpp could not load {mmproj_path}",
                           "export it again; if it persists, report it with the manifest")
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, buf)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len = marker, len(marker)
        text.add_special, text.parse_special = False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise native_error("mtmd_tokenize failed", "report it with the manifest")
        n_embd = llm.n_embd()
        out = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                raise native_error("mtmd_encode_chunk failed", "report it with the manifest")
            ptr = mtmd.mtmd_get_output_embd(mctx)
            out.append(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy())
        return np.concatenate(out) if out else np.zeros((0, n_embd), np.float32)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(mctx)


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

    def __init__(self, *args, n_ctx: int = 4096, kv_f32: bool = False, **kwargs):
        """`kv_f32`: an F32 KV cache instead of llama.cpp's F16 (export verification, which
        measures the files and the prompt path, not the cache's precision)."""
        super().__init__(*args, **kwargs)
        self.n_ctx = n_ctx
        self.kv_f32 = kv_f32
        self.llm = self.mtmd_ctx = None

    def load(self) -> None:
        llama_cpp = self.require(self.profile)
        from llama_cpp import mtmd_cpp as mtmd

        silence_native_logs()
        text = self.root / self.artifact.io.path("text_model")
        mmproj = self.root / self.artifact.io.path("mmproj")
        gpu_layers = self.profile.gpu_layers if self.profile else 0
        threads = self.threads or 0
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if (
            self.kv_f32) else {}
        self.llm = llama_cpp.Llama(
            model_path=str(text), n_ctx=self.n_ctx, n_batch=512, n_gpu_layers=gpu_layers,
            n_threads=threads or None, n_threads_batch=threads or None, verbose=False, **kv)
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

    def prefill(self, image, prompt: str) -> tuple[Decoder, int, float, float]:
        """The prompt (chat template + mtmd's image chunks) decoded into a cleared context:
        (decoder holding the last logits, prompt tokens, image seconds, prefill seconds).
        `generate` continues from it, and export verification checks it."""
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        decoder = Decoder(self.llm)  # a cleared KV cache
        chunks = self._chunks(image, prompt)
        prompt_tokens, image_s = 0, 0.0
        self.image_tokens = 0  # summed over the image's chunks (SmolVLM: one per tile group)
        loop_start = time.perf_counter()
        try:
            count = mtmd.mtmd_input_chunks_size(chunks)
            for i in range(count):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                prompt_tokens += n
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    phase("image")
                    self.image_tokens += n
                    t0 = time.perf_counter()
                    if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                        raise native_error("mtmd could not encode the image",
                                           "check the mmproj file (export it again)")
                    image_s += time.perf_counter() - t0
                    phase("prefill")
                    # mtmd lays out the image's positions (M-RoPE, non-causal attention).
                    new_n_past = llama_cpp.llama_pos(0)
                    embd = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
                    rc = mtmd.mtmd_helper_decode_image_chunk(
                        self.mtmd_ctx, self.llm.ctx, chunk, embd, decoder.n_past, 0,
                        self.llm.n_batch, ctypes.byref(new_n_past), _NO_CALLBACK(), None)
                    if rc != 0:
                        raise native_error(f"llama.cpp failed to decode the image ({rc})",
                                           "the prompt may not fit the context")
                    decoder.n_past, decoder.n_used = new_n_past.value, decoder.n_used + n
                else:
                    phase("prefill")
                    size = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(size))
                    decoder.tokens([ptr[j] for j in range(size.value)], logits=i == count - 1)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return decoder, prompt_tokens, image_s, time.perf_counter() - loop_start - image_s

    def generate(self, image, prompt, *, max_tokens=128, temperature=0.0, top_p=1.0, seed=0,
                 ignore_eos=False, on_text=None) -> Trace:
        import llama_cpp

        start = time.perf_counter()
        decoder, prompt_tokens, image_s, prefill_s = self.prefill(image, prompt)

        def step(token: int) -> np.ndarray:
            if decoder.n_used >= self.n_ctx:
                raise UsageError(
                    f"the answer reached the end of the {self.n_ctx}-token llama.cpp context "
                    f"(prompt {prompt_tokens} tokens)", "ask for fewer tokens (--max-tokens)")
            decoder.tokens([token])
            return decoder.last_logits()

        phase("decode")
        stream = TextStream(lambda ids: self.llm.detokenize(ids))
        tokens, times, stop = decode_loop(
            decoder.last_logits(), step, lambda t: llama_cpp.llama_vocab_is_eog(self.vocab, t),
            stream, start=start, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, ignore_eos=ignore_eos, on_text=on_text)
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
