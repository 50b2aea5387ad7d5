"""Thin helpers over llama-cpp-python's low-level API: decode token or embedding runs,
greedy steps, and mtmd image embeddings."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from edgevlm.errors import EdgeVLMError
from edgevlm.runtimes.llamacpp_runner import native_error


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
    """The text GGUF with an F32 KV cache: parity measures the file, not the cache's F16.
    `n_ctx` must hold the longest sequence fed (`context_size`)."""
    import llama_cpp

    from edgevlm.runtimes.llamacpp_runner import silence_native_logs

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


def check_fits(n_used: int, n: int, n_ctx: int, n_batch: int, what: str = "tokens") -> None:
    """Refuse, before llama.cpp sees it, a run that would not fit: more than `n_batch` at once
    aborts the whole process inside llama_decode (GGML_ASSERT, a C abort that kills Python),
    and past `n_ctx` (`n_used` cells already filled) llama.cpp fails with a bare code."""
    if n_used + n > n_ctx:
        raise EdgeVLMError(
            f"{n} {what} after {n_used} already decoded do not fit this {n_ctx}-token "
            f"llama.cpp context (they need {n_used + n})",
            "open the context with llamacpp.context_size() of the longest sequence fed")
    if n > n_batch:
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
    """Feeds a sequence of token runs and embedding runs into one llama.cpp context."""

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
                "code 1 means the context is full: verification sizes it from the samples, "
                "so report this with the manifest")

    def tokens(self, ids: list[int]) -> None:
        n = len(ids)
        check_fits(self.n_used, n, self.n_ctx, self.lib.llama_n_batch(self.ctx))
        batch = self.lib.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            self._decode(batch)
        finally:
            self.lib.llama_batch_free(batch)
        self.n_past += n
        self.n_used += n

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
