"""Issue 13 item 2: one verification module (export/parity.py): the report both targets write,
its tolerance table, and the one PyTorch reference."""

from __future__ import annotations

import pytest
from conftest import load_tiny

from edgevlm.errors import VerificationError

# edgevlm.export is imported inside each test, as everywhere in the suite: importing the
# subpackage first rebinds `edgevlm.export` (the API function) to it for the whole session.


def test_checks_pass_by_their_bound_and_none_only_records():
    from edgevlm.export.parity import Check

    assert Check.of("err", 1e-4, "<=", 1e-3).passed
    assert not Check.of("err", 2e-3, "<=", 1e-3).passed
    assert Check.of("agree", 0.95, ">=", 0.9).passed
    assert not Check.of("agree", 0.85, ">=", 0.9).passed
    assert Check.of("q4 top-1", 0.01, ">=", None).passed  # measured, never failed


def test_report_round_trips_and_names_only_failed_checks():
    from edgevlm.export.parity import IMAGE_TOLERANCES, TOLERANCES, ParityReport

    report = ParityReport(target="gguf", samples=2, measured={"n_ctx": 512})
    report.add("text f16 logits error", 2e-3, "<=", TOLERANCES["f16"].logits)
    report.add("mmproj f16 image features error", 0.5, "<=", IMAGE_TOLERANCES["f16"])
    data = report.to_dict()
    assert data["n_ctx"] == 512 and data["passed"] is False  # measured beside the checks
    assert data["checks"][0] == {"name": "text f16 logits error", "value": 2e-3,
                                 "tolerance": 1e-2, "op": "<=", "passed": True}
    assert ParityReport.from_dict(data) == report
    assert report.summary() == ("2 held-out sample(s): text f16 logits error 0.002 (<= 0.01); "
                                "mmproj f16 image features error 0.5 (<= 0.005, FAILED)")
    with pytest.raises(VerificationError) as err:
        report.raise_if_failed("GGUF export disagrees", "report it")
    assert "mmproj" in err.value.what and "logits" not in err.value.what


def test_scaled_error_scales_only_above_one():
    import numpy as np

    from edgevlm.export.parity import scaled_error

    assert scaled_error(np.array([0.5]), np.array([0.25])) == (0.25, 0.25)
    assert scaled_error(np.array([11.0]), np.array([10.0])) == (0.1, 1.0)


def test_one_reference_ignores_eos_and_encodes_the_chat(calib):
    """Every step is compared whatever the model's EOS: making the first greedy token the EOS
    does not shorten the reference (the GGUF verifier used to stop there)."""
    from edgevlm.export.parity import torch_reference
    from edgevlm.prompting import chat_batch, chat_text

    vlm = load_tiny("smolvlm")
    sample = calib.heldout[0]
    ref = torch_reference(vlm, sample, 6)
    assert len(ref["tokens"]) == 6
    saved = vlm.model.generation_config.eos_token_id
    vlm.model.generation_config.eos_token_id = ref["tokens"][0]
    try:
        assert torch_reference(vlm, sample, 6)["tokens"] == ref["tokens"]
    finally:
        vlm.model.generation_config.eos_token_id = saved
    batch = chat_batch(vlm.processor, [chat_text(vlm.processor, sample.prompt)], [[sample.image]],
                       return_tensors="pt")
    assert ref["ids"] == batch["input_ids"][0].tolist()
    assert ref["features"].shape == (sum(ref["mask"]), vlm.config.get_text_config().hidden_size)


def test_family_table_holds_the_llama_cpp_eps_defect_and_its_bound():
    """The Qwen-VL llama.cpp RMSNorm-eps defect and the f32 bound used when it goes
    undetected are family facts (runtimes/families.py), read by gguf_export/verify.py."""
    from edgevlm.export.parity import TOLERANCES
    from edgevlm.runtimes import families

    for f in families.TABLE:
        assert (f.gguf_f32_logits_tol is not None) == f.gguf_rms_eps_ignored, f.name
    assert {f.name for f in families.TABLE if f.gguf_rms_eps_ignored} == {"qwen2-vl",
                                                                           "qwen2.5-vl"}
    assert families.family("qwen2-vl").gguf_f32_logits_tol > TOLERANCES["f32"].logits
