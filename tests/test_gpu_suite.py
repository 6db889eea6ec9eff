"""The GPU suite's smoke mode: the same code paths on CPU with the tiny preset, so the suite never rots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    for section in ("ceilings", "baselines", "ours", "compile", "train"):
        assert "error" not in rep[section], (section, rep[section])
    assert rep["ceilings"]["matmul_tflops"] > 0 and rep["ceilings"]["copy_gb_s"] > 0
    for row in [rep["baselines"]["A_unfused"], rep["baselines"]["B_fused"], rep["ours"]["b1"], rep["ours"]["b2"], rep["ours"]["b2_mixed"]]:
        assert row["ms_per_step"] > 0 and row["images_s"] > 0 and row["decode_ms"] > 0
    assert rep["ours"]["b2_mixed"]["adapters_in_step"] == ["spo"] and rep["ours"]["b1"]["adapters_in_step"] == []
    assert rep["ours"]["scale_swap_ms"] < 50
    assert rep["compile"]["graphs_compiled_by_second_swap"] == 0
    assert all("round_s" in v for v in rep["train"].values())
    assert "GPU suite:" in r.stdout and "ours b1 / baseline A" in r.stdout
