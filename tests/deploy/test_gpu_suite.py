"""The GPU suite's smoke mode: the same code paths on CPU with the tiny preset, so the suite never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",  # OMP_WAIT_POLICY: as make test sets it
                            **{k: os.environ[k] for k in ("OMP_WAIT_POLICY",) if k in os.environ}})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    for section in ("ceilings", "baselines", "ours", "compile", "train", "fp8", "vae", "sdpa"):
        assert "error" not in rep[section] and "skipped" not in rep[section], (section, rep[section])
    assert rep["ceilings"]["matmul_tflops"] > 0 and rep["ceilings"]["copy_gb_s"] > 0
    for row in [rep["baselines"]["A_unfused"], rep["baselines"]["B_fused"], rep["ours"]["b1"], rep["ours"]["b2"], rep["ours"]["b2_mixed"],
                rep["compile"]["b1"], rep["compile"]["b1_mixed"], rep["fp8"]["b1"]]:
        assert row["ms_per_step"] > 0 and row["images_s"] > 0 and row["decode_ms"] > 0
    assert rep["ours"]["b2_mixed"]["adapters_in_step"] == ["spo"] and rep["ours"]["b1"]["adapters_in_step"] == []
    assert rep["ours"]["scale_swap_ms"] < 50
    train = rep["train"]
    assert all("round_s" in v and v["pairs_per_s"] > 0 and v["pairs_per_step"] == 16 for v in train.values())
    assert train["checkpointing"]["lora_dtype"] == "float32" and train["checkpointing"]["ranks"] == 1
    assert train["ranks_2"]["world_size"] == 2 and train["ranks_2"]["pairs"] > 0  # the CLI's --nproc 2 (gloo)
    # compile (eager backend on CPU): the warm-up compiled the fused and the residual-LoRA graph of the bucket
    # requests land in, so nothing after it compiles a graph, and the images equal eager's
    comp = rep["compile"]
    assert set(comp["warm_up"]["unet"]) == {"fused_b2", "residual_b2"} and set(comp["warm_up"]["vae"]) == {"b1"}
    assert comp["graphs_after_warm_up"] == 0 and comp["graphs_compiled_by_scale_changes"] == 0
    assert comp["fidelity"]["max_diff"] <= 1 and comp["fidelity"]["psnr_db"] >= 40
    assert comp["info"]["compile"]["on"] and comp["info"]["compile"]["vae"] and comp["info"]["batch_buckets"]["unet"] == [1, 2]
    assert comp["cold_start_s"] > 0 and comp["warm_start"]["ready_s"] > 0 and comp["warm_start"]["compiled"] is False
    # fp8: torchao's float8 on the tiny model (bf16, CPU): quantized, finite with CFG's zero embedding, close to bf16
    f = rep["fp8"]
    assert f["quant"]["quant"] == "fp8" and f["quant"]["layers"] > 0 and f["non_finite_rows"] == 0
    assert f["fidelity"]["psnr_db"] >= 25 and f["fidelity"]["max_diff"] < 64, f["fidelity"]
    assert rep["vae"]["fidelity"]["max_diff"] <= 1 and rep["vae"]["compiled_ms"] > 0
    assert rep["sdpa"]["pick"]["backend"] in ("flash", "math") and rep["sdpa"]["fidelity"]["max_diff"] <= 1
    assert rep["cudagraphs"]["skipped"]
    assert "GPU suite:" in r.stdout and "ours b1 / baseline A" in r.stdout and "fp8 vs bf16 eager" in r.stdout
