"""edgevlm.devices: profiles, detection over recorded host facts, tegrastats parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from edgevlm.devices import (
    DeviceProfile,
    HostFacts,
    TegrastatsSampler,
    builtin_profiles,
    detect,
    get_profile,
    load_profile,
    parse_tegrastats,
    physical_core_count,
)
from edgevlm.errors import EdgeVLMError, UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
EXPECTED_PROFILES = {
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin",
    "apple-silicon",
    "laptop-x86",
    "laptop-arm",
}


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def jetson_facts(model_file: str | None, tegra_release: bool = True) -> HostFacts:
    return HostFacts.from_texts(
        "Linux",
        "aarch64",
        tegra_release=fixture("nv_tegra_release-r36.txt") if tegra_release else None,
        device_tree_model=(FIXTURES / model_file).read_bytes() if model_file else None,
        cpuinfo=fixture("cpuinfo-orin-nano.txt"),
        meminfo=fixture("meminfo-orin-nano.txt"),
        logical_cpus=6,
    )


def builtin_toml(name: str) -> str:
    return resources.files("edgevlm.devices").joinpath(f"profiles/{name}.toml").read_text()


# --- profiles ---------------------------------------------------------------------------


def test_all_builtin_profiles_load_and_round_trip_through_json():
    profiles = builtin_profiles()
    assert set(profiles) == EXPECTED_PROFILES
    for name, profile in profiles.items():
        assert profile.name == name
        again = DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
        assert again == profile


def test_builtin_profile_contents():
    nano = get_profile("jetson-orin-nano")
    assert nano.gpu_layers == -1 and nano.memory_source == "tegrastats"
    assert nano.power_source == "tegrastats" and nano.memory_bandwidth_gbs == 68.0
    assert nano.providers_for("onnx/decoder_model_merged_q4.onnx") == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert "jetson-ai-lab" in nano.install.onnxruntime
    assert "GGML_CUDA=on" in nano.install.llama_cpp
    assert get_profile("jetson-orin-nx").memory_bandwidth_gbs == 102.4
    assert get_profile("jetson-agx-orin").memory_bandwidth_gbs == 204.8

    mac = get_profile("apple-silicon")
    assert mac.providers_for("vision_encoder")[0] == "CoreMLExecutionProvider"
    assert mac.providers_for("decoder") == ["CPUExecutionProvider"]
    assert mac.memory_bandwidth_gbs == 68.25 and "GGML_METAL=on" in mac.install.llama_cpp

    for name in ("laptop-x86", "laptop-arm"):
        laptop = get_profile(name)
        assert laptop.gpu_layers == 0 and laptop.power_source == "none"
        assert laptop.providers_for("embed_tokens") == ["CPUExecutionProvider"]
        assert 'edgevlm[runtime]" onnxruntime llama-cpp-python' in laptop.install.edgevlm


def test_get_profile_normalizes_names_and_accepts_paths(tmp_path):
    assert get_profile("Jetson_Orin_Nano").name == "jetson-orin-nano"
    path = tmp_path / "my-board.toml"
    path.write_text(builtin_toml("laptop-arm").replace('"laptop-arm"', '"my-board"'))
    assert get_profile(str(path)).name == "my-board"


def test_unknown_profile_lists_names_and_suggests():
    with pytest.raises(UsageError) as err:
        get_profile("jetson-orin-nan")
    message = str(err.value)
    assert "did you mean 'jetson-orin-nano'" in message
    assert all(name in message for name in EXPECTED_PROFILES)


def test_unknown_graph_role_is_a_usage_error():
    with pytest.raises(UsageError, match="text_encoder"):
        get_profile("laptop-x86").providers_for("text_encoder.onnx")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("priority = 10", "priority = 10\nprioirty = 3", "prioirty"),
        (
            'machine = ["x86_64", "AMD64"]',
            'machine = ["x86_64"]\nmachines = ["x"]',
            "match.machines",
        ),
        (
            'llama_cpp = "pip install llama-cpp-python"',
            'llama_cpp = "x"\nllama = "y"',
            "install.llama",
        ),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, old, new, key):
    path = tmp_path / "laptop-x86.toml"
    path.write_text(builtin_toml("laptop-x86").replace(old, new))
    with pytest.raises(UsageError) as err:
        load_profile(path)
    assert f"unknown key '{key}'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("old", "key"),
    [
        ("gpu_layers = 0\n", "gpu_layers"),
        ('decoder = ["CPUExecutionProvider"]\n', "providers.decoder"),
    ],
)
def test_missing_key_names_key_and_file(tmp_path, old, key):
    path = tmp_path / "laptop-x86.toml"
    path.write_text(builtin_toml("laptop-x86").replace(old, ""))
    with pytest.raises(UsageError) as err:
        load_profile(path)
    assert f"missing required key '{key}'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("threads = 0", 'threads = "4"', "key 'threads' must be an integer"),
        ("threads = 0", "threads = true", "key 'threads' must be an integer"),
        ("memory_bandwidth_gbs = 60.0", 'memory_bandwidth_gbs = "60"', "must be a number"),
        ("[match]", '[match]\njetson = "no"', "key 'match.jetson' must be true or false"),
        ('machine = ["x86_64", "AMD64"]', 'machine = "x86_64"', "'match.machine' must be a list"),
        ('runtime = "llama.cpp"', 'runtime = "vllm"', "key 'runtime' must be one of"),
        ('decoder = ["CPUExecutionProvider"]', 'decoder = ["CPU"]', "providers.decoder"),
        ('name = "laptop-x86"', 'name = "other"', "file is named 'laptop-x86.toml'"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, old, new, message):
    path = tmp_path / "laptop-x86.toml"
    path.write_text(builtin_toml("laptop-x86").replace(old, new, 1))
    with pytest.raises(UsageError) as err:
        load_profile(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_from_dict_rejects_a_non_table_section():
    data = get_profile("laptop-x86").to_dict()
    with pytest.raises(UsageError, match="x.json: key 'match' must be a table"):
        DeviceProfile.from_dict({**data, "match": 3}, "x.json")


def test_missing_profile_file_and_bad_toml(tmp_path):
    with pytest.raises(UsageError, match="cannot read device profile"):
        load_profile(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_profile(bad)


def test_resolve_threads_uses_physical_cores_within_affinity():
    laptop = get_profile("laptop-x86")
    facts = HostFacts("Linux", "x86_64", physical_cores=4, logical_cpus=8)
    assert laptop.resolve_threads(facts) == 4
    assert (
        laptop.resolve_threads(HostFacts("Linux", "x86_64", physical_cores=4, logical_cpus=2)) == 2
    )
    assert laptop.resolve_threads(HostFacts("Windows", "AMD64")) == 1
    assert laptop.resolve_threads() >= 1  # live host


# --- detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_file", "expected"),
    [
        ("device-tree-model-orin-nano", "jetson-orin-nano"),
        ("device-tree-model-orin-nx", "jetson-orin-nx"),
        ("device-tree-model-agx-orin", "jetson-agx-orin"),
    ],
)
def test_jetson_fixtures_detect_their_profile(model_file, expected):
    facts = jetson_facts(model_file)
    assert facts.is_jetson and facts.l4t_version == "36.4.0"
    assert detect(facts).name == expected
    # In a container without /etc/nv_tegra_release the board model alone still identifies it.
    assert detect(jetson_facts(model_file, tegra_release=False)).name == expected


def test_jetson_facts_from_recorded_files():
    facts = jetson_facts("device-tree-model-orin-nano")
    assert facts.device_tree_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert facts.physical_cores == 6 and facts.total_memory_mb == 7620
    assert "asimd" in facts.cpu_flags


def test_unknown_jetson_board_is_refused_not_treated_as_a_laptop():
    with pytest.raises(UsageError) as err:
        detect(jetson_facts("device-tree-model-xavier-nx"))
    assert "Xavier NX" in str(err.value) and "jetson-orin-nano" in str(err.value)


def test_macos_m2_detects_apple_silicon():
    facts = HostFacts.from_texts("Darwin", "arm64", sysctl=fixture("sysctl-macos-m2.txt"))
    assert facts.cpu_brand == "Apple M2"
    assert facts.physical_cores == 8 and facts.total_memory_mb == 16384
    assert detect(facts).name == "apple-silicon"


def test_rosetta_or_intel_mac_is_an_x86_laptop():
    facts = HostFacts.from_texts("Darwin", "x86_64", sysctl={"hw.physicalcpu": "4"})
    assert detect(facts).name == "laptop-x86"


@pytest.mark.parametrize("system, machine", [("Linux", "x86_64"), ("Windows", "AMD64")])
def test_laptop_x86(system, machine):
    facts = HostFacts.from_texts(system, machine, cpuinfo=fixture("cpuinfo-x86-laptop.txt"))
    assert detect(facts).name == "laptop-x86"
    assert facts.physical_cores == 4  # 8 hyper-threads on 4 cores
    assert facts.cpu_model.startswith("11th Gen Intel") and "avx2" in facts.cpu_flags


@pytest.mark.parametrize(
    "facts",
    [
        HostFacts.from_texts(
            "Linux",
            "aarch64",
            device_tree_model=(FIXTURES / "device-tree-model-raspberry-pi-5").read_bytes(),
        ),
        HostFacts("Windows", "ARM64"),
    ],
)
def test_laptop_arm(facts):
    assert not facts.is_jetson
    assert detect(facts).name == "laptop-arm"


def test_no_match_is_a_usage_error():
    with pytest.raises(UsageError, match="riscv64"):
        detect(HostFacts("Linux", "riscv64"))


def test_physical_core_count_falls_back_to_listed_processors():
    assert physical_core_count(fixture("cpuinfo-x86-laptop.txt")) == 4
    assert physical_core_count(fixture("cpuinfo-orin-nano.txt")) == 6
    assert physical_core_count("") is None


def test_live_host_facts_and_round_trip():
    facts = HostFacts.read()
    assert facts.system and facts.machine
    assert facts.physical_cores is None or facts.physical_cores >= 1
    assert HostFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    with pytest.raises(UsageError, match="unknown host fact 'cores'"):
        HostFacts.from_dict({"system": "Linux", "machine": "x86_64", "cores": 4})


# --- tegrastats -------------------------------------------------------------------------


def test_parse_orin_nano_tegrastats():
    s = parse_tegrastats(fixture("tegrastats-orin-nano.txt"))
    assert s.timestamp == "11-23-2026 10:00:00"
    assert (s.ram_used_mb, s.ram_total_mb) == (3021, 7620)
    assert (s.swap_used_mb, s.swap_total_mb) == (0, 3810)
    assert s.cpu_percent == [12.0, 5.0, 8.0, 3.0, None, None]
    assert s.cpu_freq_mhz == [1510, 1510, 1510, 1510, None, None]
    assert s.gpu_percent == 0.0 and s.emc_percent == 0.0
    assert s.temperatures_c == {
        "cpu": 48.5,
        "soc2": 47.1,
        "soc0": 46.9,
        "gpu": 47.8,
        "tj": 48.5,
        "soc1": 47.6,
    }
    assert s.power_mw == {"VDD_IN": 4523, "VDD_CPU_GPU_CV": 603, "VDD_SOC": 1407}
    assert s.total_power_mw == 4523


def test_parse_agx_orin_tegrastats():
    s = parse_tegrastats(fixture("tegrastats-agx-orin.txt"))
    assert (s.ram_used_mb, s.ram_total_mb) == (8232, 62780)
    assert len(s.cpu_percent) == 12 and s.cpu_percent[4] == 35.0
    assert s.gpu_percent == 45.0 and s.emc_percent == 12.0
    assert "CV0" not in s.temperatures_c  # -256C marks a sensor that is off
    assert s.temperatures_c["Tboard"] == 34.0 and s.temperatures_c["GPU"] == 45.5
    assert s.power_mw["VIN_SYS_5V0"] == 4117 and s.power_avg_mw["VDD_GPU_SOC"] == 5203
    assert s.total_power_mw == 7194 + 1199 + 4117  # no VDD_IN on AGX Orin


def test_parse_jetpack4_tegrastats_without_units():
    s = parse_tegrastats(fixture("tegrastats-nano-jetpack4.txt"))
    assert s.timestamp is None and s.gpu_percent == 0.0
    assert s.power_mw == {"POM_5V_IN": 2117, "POM_5V_GPU": 0, "POM_5V_CPU": 318}
    assert s.total_power_mw == 2117


def test_parse_rejects_other_text():
    with pytest.raises(EdgeVLMError, match="not a tegrastats line"):
        parse_tegrastats("tegrastats: command not found")
    assert parse_tegrastats("RAM 1/2MB").total_power_mw is None


def test_sampler_without_tegrastats_reports_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats on PATH
    for sampler in (TegrastatsSampler(), TegrastatsSampler(executable=str(tmp_path / "nope"))):
        with sampler:
            pass
        summary = sampler.summary
        assert not summary.available and summary.samples == 0
        assert summary.peak_ram_mb is None and summary.baseline_ram_mb is None
        assert summary.mean_power_w is None and summary.peak_power_w is None


@pytest.mark.skipif(os.name != "posix", reason="fake tegrastats is a shebang script")
def test_sampler_reads_a_running_tegrastats(tmp_path):
    fake = tmp_path / "tegrastats"
    lines = [fixture("tegrastats-orin-nano.txt").strip()]
    lines.append(
        lines[0].replace("RAM 3021/", "RAM 3500/").replace("VDD_IN 4523mW", "VDD_IN 6523mW")
    )
    fake.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import sys, time
            assert sys.argv[1:] == ["--interval", "20"], sys.argv
            print("warning: some rails need root", flush=True)
            for line in {lines!r}:
                print(line, flush=True)
            time.sleep(30)
            """
        )
    )
    fake.chmod(0o755)
    with TegrastatsSampler(interval_ms=20, executable=str(fake)) as sampler:
        pass  # stop() waits for the first sample, so an instant block still gets one
    summary = sampler.summary
    assert summary.available and summary.samples >= 1
    assert summary.baseline_ram_mb == 3021 and summary.peak_ram_mb in (3021, 3500)
    assert summary.peak_power_w in (4.523, 6.523) and summary.mean_power_w >= 4.523
    assert sampler.bad_lines <= 1


# --- import guard -----------------------------------------------------------------------


def test_devices_import_without_torch_or_transformers_and_use_only_stdlib():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        before = set(sys.modules)
        import edgevlm.devices as d
        d.builtin_profiles()
        d.HostFacts.read()
        d.get_profile("jetson-orin-nano").to_dict()
        d.parse_tegrastats("RAM 1/2MB")
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        foreign = sorted(new - set(sys.stdlib_module_names) - {"edgevlm", "tomli"})
        assert not foreign, foreign
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_python_without_tomllib_or_tomli_gets_an_install_hint():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tomllib"] = None  # as on Python 3.10 without tomli
        sys.modules["tomli"] = None
        from edgevlm.devices import builtin_profiles
        from edgevlm.errors import MissingDependencyError
        try:
            builtin_profiles()
        except MissingDependencyError as exc:
            print(exc.package)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tomli"
