"""Issue 14: the roofline figures bench reports (runtimes/roofline.py), on known shapes."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.runtimes.roofline import (
    decode_roofline,
    gguf_decode_bytes,
    read_gguf,
    text_shape_from_config,
    text_shape_from_gguf,
)

SMOLVLM_TEXT = {"text_config": {"num_hidden_layers": 21, "hidden_size": 576, "num_attention_heads": 9,
                                "num_key_value_heads": 3, "intermediate_size": 1536,
                                "vocab_size": 49280}}


def test_decode_bytes_per_token_are_weights_plus_kv_at_that_context():
    shape = text_shape_from_config(SMOLVLM_TEXT)
    assert shape.head_dim == 64
    assert shape.kv_values_per_token() == 21 * 2 * 3 * 64
    roof = decode_roofline(100.0, 90_000_000, shape.kv_values_per_token() * 4, 512, 60.0)
    expected = 90_000_000 + 21 * 2 * 3 * 64 * 4 * 512
    assert roof["bytes_per_token"] == expected
    assert roof["fraction"] == pytest.approx(100.0 * expected / 60e9)
    assert decode_roofline(None, 1, 1, 1, 60.0) is None  # unmeasured stays unmeasured


def _write_gguf(path, *, tied: bool):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_token_list([f"t{i}".encode() for i in range(100)])  # longer than kept arrays
    writer.add_tensor("token_embd.weight", np.zeros((100, 8), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 8), np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((100, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_header_gives_shapes_and_the_bytes_a_decode_step_reads(tmp_path):
    _write_gguf(tmp_path / "untied.gguf", tied=False)
    _write_gguf(tmp_path / "tied.gguf", tied=True)
    meta, tensors = read_gguf(tmp_path / "untied.gguf")
    shape = text_shape_from_gguf(meta)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn,
            shape.vocab) == (2, 8, 2, 1, 4, 16, 100)
    assert tensors["token_embd.weight"] >= 100 * 8 * 4 and tensors["blk.0.ffn_up.weight"] >= 16 * 8 * 4
    # Untied: the embedding table is only looked up; tied: it is the output matrix, read whole.
    assert gguf_decode_bytes(tensors) == sum(tensors.values()) - tensors["token_embd.weight"]
    _, tied = read_gguf(tmp_path / "tied.gguf")
    assert gguf_decode_bytes(tied) == sum(tied.values())
