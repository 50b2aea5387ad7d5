"""Issue 14: memory of the onnxruntime runner. The vision encoder's peak memory grows with one
chunk of tiles, not with all of an image's tiles; per-phase peaks are traced. Memory is read
from the kernel's peak-RSS counter (VmHWM, reset per measurement), never from wall time."""

from __future__ import annotations

import pytest

from edgevlm.runtimes import measure

pytestmark = pytest.mark.skipif(not measure._reset_kernel_peak(),
                                reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")

TILES = 384  # tiny:smolvlm tiles are 32 px: ~60 KB of activations each, ~20 MB for all


@pytest.fixture(scope="module")
def smolvlm_onnx(tmp_path_factory):
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny

    out = tmp_path_factory.mktemp("onnx-smolvlm-memory")
    export_onnx(materialize_tiny("tiny:smolvlm"), out, quant="none", verify=False, progress=False)
    return out / "onnx"


# Run in a fresh process with a fixed glibc mmap threshold: every block over 64 KB is mapped
# on malloc and unmapped on free, so RSS follows live memory. (By default glibc raises the
# threshold after the first large free and keeps later blocks resident in its heap: a second
# encode then touches no new pages and its peak growth reads 0 however much it allocates.)
PROBE = """
import json, sys
import numpy as np
from edgevlm.runtimes import measure
from edgevlm.runtimes.ort_generate import OnnxVLM

folder, chunk, tiles = sys.argv[1], int(sys.argv[2]) or None, [int(t) for t in sys.argv[3:]]
vlm = OnnxVLM(folder, threads=1, tile_chunk=chunk)
size = vlm.config["vision_config"]["image_size"]
out = {}
for n in tiles:
    rng = np.random.default_rng(n)
    inputs = {"pixel_values": rng.standard_normal((1, n, 3, size, size), dtype=np.float32),
              "pixel_attention_mask": np.ones((1, n, size, size), dtype=bool)}
    vlm.encode_tiles(inputs)  # first run of a shape: once-only allocations
    measure._reset_kernel_peak()
    before = measure.current_rss_mb()
    features = vlm.encode_tiles(inputs)
    out[n] = {"growth_mb": measure._kernel_peak_mb() - before, "output_mb": features.nbytes / 1e6,
              "checksum": float(np.abs(features).sum())}
print(json.dumps(out))
"""


def _vision_peak_growth(folder, chunk: int | None, tiles: list[int]) -> dict:
    """{tiles: peak RSS growth of one vision encode (MB), its output size, a checksum}."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(chunk or 0),
                          *map(str, tiles)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return {int(k): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def test_vision_peak_memory_grows_with_one_chunk_not_all_tiles(smolvlm_onnx):
    chunked = _vision_peak_growth(smolvlm_onnx, 1, [2, TILES])
    whole = _vision_peak_growth(smolvlm_onnx, None, [TILES])
    assert chunked[TILES]["checksum"] == pytest.approx(whole[TILES]["checksum"], rel=1e-5)
    # Chunked: the features (kept) plus one tile's activations; all at once: every tile's.
    few, many = chunked[2]["growth_mb"], chunked[TILES]["growth_mb"]
    assert many < few + chunked[TILES]["output_mb"] + 2.0, chunked
    assert whole[TILES]["growth_mb"] > many + 5.0, whole  # the measurement sees the difference


# In a fresh process, as above: in the long-lived pytest process the allocator's state left by
# earlier tests decides whether a freed block leaves RSS at all (a CI run once saw "after" equal
# "big"), and that is not what this test is about.
PHASES = """
import json
import numpy as np
from edgevlm.runtimes.measure import PhaseMemory, phase

with PhaseMemory() as memory:
    phase("small")
    small = np.ones(10_000_000 // 8)
    small.sum()
    phase("big")
    big = np.ones(120_000_000 // 8)
    big.sum()
    del big
    phase("after")
print(json.dumps({"exact": memory.exact, **memory.peaks}))
"""


def test_phase_memory_attributes_peaks_to_phases():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    peaks = json.loads(out.stdout.splitlines()[-1])
    assert peaks["exact"], "the kernel's peak counter was not used"
    assert peaks["big"] > peaks["small"] + 100, peaks
    assert peaks["after"] < peaks["big"] - 100, peaks  # the reset forgot the freed block
