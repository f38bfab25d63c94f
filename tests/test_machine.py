"""`selectune machine`: the dtype rules per CPU kind (table-driven), the cache keyed by the
machine's identity, and one real calibration of this CPU."""

from __future__ import annotations

import json

import pytest

from models import machine


@pytest.mark.parametrize(
    "flags, cuda, scoring, train",
    [
        (["avx2", "fma"], False, "float32", "float32"),  # AMD Zen 2/3, Intel consumer CPUs
        (["avx2", "fma", "avx512f"], False, "float32", "float32"),  # AVX512 without its bf16 extension
        (["avx2", "fma", "avx512f", "avx512_bf16"], False, "bfloat16", "bfloat16"),  # AMD Zen 4
        (
            ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"],
            False,
            "bfloat16",
            "bfloat16",
        ),  # Intel Xeon with AMX
        ([], True, "bfloat16", "bfloat16"),
        # oneDNN capped below its bf16 instructions (ONEDNN_MAX_CPU_ISA): bf16 would be emulated
        (["avx2", "fma", "avx512f", "avx512_bf16", "cap=AVX2"], False, "float32", "float32"),
        (["avx2", "fma", "avx512f", "avx512_bf16", "cap=AVX512_CORE"], False, "float32", "float32"),
        (["avx2", "fma", "avx512f", "avx512_bf16", "cap=AVX512_CORE_BF16"], False, "bfloat16", "bfloat16"),
        (["avx2", "fma", "avx512f", "amx_tile", "amx_bf16", "cap=ALL"], False, "bfloat16", "bfloat16"),
    ],
)
def test_each_stage_uses_the_dtype_its_rule_gives_on_each_cpu_kind(flags, cuda, scoring, train):
    cap = "".join(f.removeprefix("cap=") for f in flags if f.startswith("cap="))
    flags = [f for f in flags if not f.startswith("cap=")]
    stages = {stage: (dtype, why) for stage, dtype, why in machine.stage_dtypes(flags, cuda, cap)}
    assert stages["select scoring"][0] == scoring and stages["train (QLoRA compute)"][0] == train
    assert stages["merge, parity and train's checks"][0] == "float32"
    assert stages["re-score (local side), cross-checks"][0] == "float32"
    assert ("no native bf16" in stages["select scoring"][1]) == (scoring == "float32")
    assert ("ONEDNN_MAX_CPU_ISA" in stages["select scoring"][1]) == (scoring == "float32" and bool(cap))


@pytest.mark.parametrize("cap", ["", "AVX2", "avx512_core", "AVX512_CORE_BF16"])
def test_onednns_isa_cap_decides_whether_bf16_is_native(cap, monkeypatch):
    """The stages ask torch whether the CPU has bf16 instructions, and oneDNN's cap whether it may
    use them; the calibration's identity records the cap, so a capped run is calibrated apart."""
    from models.loading import cpu_has_bf16

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    hardware = machine.cpu_identity()["flags"]
    native = "avx512_bf16" in hardware or "amx_tile" in hardware
    assert cpu_has_bf16() == (native and cap.upper() in ("", "AVX512_CORE_BF16"))
    assert machine.cpu_identity()["onednn_max_isa"] == cap.upper()


def test_the_flags_read_here_agree_with_torchs_own_probe():
    """The flags come from /proc/cpuinfo; scoring and training ask torch (models.loading.cpu_has_bf16)."""
    from models.loading import cpu_has_bf16

    identity = machine.cpu_identity()
    expected = "bfloat16" if cpu_has_bf16() else "float32"
    stages = machine.stage_dtypes(identity["flags"], onednn_cap=identity["onednn_max_isa"])
    assert dict((s, d) for s, d, _ in stages)["select scoring"] == expected


FAKE = {
    "matmul_gflops": {"float32": 100.0},
    "decode_gflops": {"float32": 50.0},
    "bandwidth_gbs": 20.0,
    "load_gbs": 2.0,
    "measured": "2026-12-07T00:00:00+00:00",
    "seconds": 2.0,
}


def test_a_calibration_is_measured_once_per_identity_and_again_when_asked(tmp_path, monkeypatch):
    calls = []
    identity = {"cpu": "AMD EPYC", "flags": ["avx2"], "torch": "2.13.0", "threads": 2}
    monkeypatch.setattr(machine, "cpu_identity", lambda: dict(identity))
    monkeypatch.setattr(
        machine, "measure", lambda cache: calls.append(1) or {**FAKE, "identity": machine.cpu_identity()}
    )
    first = machine.calibration(tmp_path)
    assert machine.calibration(tmp_path) == first and len(calls) == 1
    assert (
        machine.calibration(tmp_path, again=True)["matmul_gflops"] == {"float32": 100.0} and len(calls) == 2
    )
    identity["torch"] = "2.14.0"  # another torch: another file, measured again
    machine.calibration(tmp_path)
    assert len(calls) == 3 and len(list((tmp_path / "machine").glob("*.json"))) == 2


def test_a_damaged_calibration_is_refused_with_one_line(tmp_path, monkeypatch):
    from core.errors import UserError

    path = machine.calibration_path(tmp_path, machine.cpu_identity())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**FAKE, "identity": {}, "schema_version": 1, "bandwidth_gbs": "fast"}))
    with pytest.raises(UserError) as err:
        machine.calibration(tmp_path)
    assert (
        str(err.value).startswith(f"{path}: ")
        and "bandwidth_gbs" in str(err.value)
        and "\n" not in str(err.value)
    )


def test_the_real_calibration_of_this_cpu(tmp_path, capsys):
    from models.loading import cpu_has_bf16
    from selectune.cli import main

    assert main(["--cache-dir", str(tmp_path), "machine"]) == 0
    printed = capsys.readouterr().out
    record = machine.calibration(tmp_path)  # the cached one
    assert set(record["matmul_gflops"]) == ({"float32", "bfloat16"} if cpu_has_bf16() else {"float32"})
    assert all(rate > 1 for rate in record["matmul_gflops"].values())
    assert record["bandwidth_gbs"] > 0.5 and record["load_gbs"] > 0.05 and record["seconds"] < 30
    assert set(record["decode_gflops"]) == set(record["matmul_gflops"])
    assert (
        f"matmul float32: {record['matmul_gflops']['float32']:.0f} GFLOP/s; at a decoding step's 16 rows"
        in printed
    )
    assert "measured now" in printed and list((tmp_path / "machine").iterdir()) == [
        machine.calibration_path(tmp_path, machine.cpu_identity())
    ]
    assert main(["--cache-dir", str(tmp_path), "machine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == record


@pytest.mark.parametrize(
    "stored, factors",
    [
        # before `factors` was named so, scoring's factors were kept under `scoring`
        ({"scoring": {"gen float32": {"factor": 0.6}}}, {"gen float32": {"factor": 0.6}}),
        # a factor kept since wins over the legacy one under the same key
        (
            {
                "scoring": {"gen float32": {"factor": 0.6}, "ppl float32": {"factor": 0.7}},
                "factors": {"gen float32": {"factor": 0.9}},
            },
            {"gen float32": {"factor": 0.9}, "ppl float32": {"factor": 0.7}},
        ),
        (
            {"scoring": "damaged", "factors": {"train float32": {"factor": 0.8}}},
            {"train float32": {"factor": 0.8}},
        ),
        ({"starts": {"vllm m": 120.0}}, None),
    ],
)
def test_what_was_measured_here_reads_the_legacy_scoring_section_as_factors(tmp_path, stored, factors):
    path = machine._measured_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    record = machine.measured_here(tmp_path)
    assert record.get("factors") == factors and "scoring" not in record
    # the next record rewrites the file under the current section names only
    machine.record_measured(tmp_path, "starts", "vllm m", 130.0)
    assert (
        "scoring" not in json.loads(path.read_text())
        and machine.measured_here(tmp_path).get("factors") == factors
    )
