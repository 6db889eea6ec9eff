"""Adapter evaluation: the statistics against hand-computed values, the default entry, and evaluation jobs
run in process on the tiny model (the job process's body, `run_eval`, on a real JobStore): the win rate of
an adapter a scorer prefers by construction, ties of identical adapters, cancel and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import darkening_adapter, max_pixel_diff
from spo_runtime.lora.format import LoraModuleWeights, save_lora_file
from spo_runtime.training.eval_stats import binomial_two_sided_p, mean_ci, sign_test, t_quantile, wilson_interval
from spo_runtime.training.evaluation import EvalConfig, EvalEntry, default_entry, run_eval
from spo_runtime.training.jobs import JobStore

pytestmark = pytest.mark.usefixtures("one_thread")


# -- statistics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (10, 2.2281),
                                   (30, 2.0423), (1000, 1.9623)])
def test_t_quantiles_are_the_tables(df, t):  # Student's t, two-sided 95%: any statistics table
    assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)


def test_mean_and_interval_by_hand():
    out = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample variance 10/4, interval 3 +- t(0.975, 4) sqrt(2.5 / 5) = 3 +- 2.776445 x 0.707107
    assert out["n"] == 5 and out["mean"] == 3.0 and out["std"] == pytest.approx(math.sqrt(2.5))
    assert out["ci95"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-6)
    assert mean_ci([0.25]) == {"n": 1, "mean": 0.25, "std": None, "ci95": None}
    with pytest.raises(ValueError):
        mean_ci([])


def test_the_exact_sign_test_by_hand():
    assert binomial_two_sided_p(9, 1) == 2 * (1 + 10) / 1024  # 2 P(X <= 1), X ~ B(10, 1/2)
    assert binomial_two_sided_p(1, 9) == 2 * 11 / 1024
    assert binomial_two_sided_p(10, 0) == 2 / 1024
    assert binomial_two_sided_p(6, 0) == 0.03125  # the fewest pairs that can be significant at 5%
    assert binomial_two_sided_p(5, 0) == 0.0625
    assert binomial_two_sided_p(5, 5) == 1.0 and binomial_two_sided_p(0, 0) == 1.0
    assert binomial_two_sided_p(60, 40) == pytest.approx(2 * 0.0284440, abs=2e-7)  # 2 P(X >= 60), X ~ B(100, 1/2)
    assert binomial_two_sided_p(3000, 2900) == pytest.approx(0.19744, abs=1e-4)  # big n: exact integers
    for wins, losses in [(0, 1), (2, 7), (13, 4), (20, 20), (31, 2)]:  # the definition, with math.comb
        n = wins + losses
        assert binomial_two_sided_p(wins, losses) == min(1.0, 2 * sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n)


def test_sign_test_drops_ties_and_all_ties_is_one_half():
    ref = [0.0] * 12
    out = sign_test([1.0] * 9 + [-1.0] + [0.0, 0.0], ref)  # 9 wins, 1 loss, 2 ties
    assert (out["wins"], out["losses"], out["ties"]) == (9, 1, 2)
    assert out["win_rate"] == 0.9 and out["p_value"] == 22 / 1024 and out["significant"]
    z = 1.959963985  # Wilson by hand for 9 of 10
    center, half = (0.9 + z * z / 20) / (1 + z * z / 10), z * math.sqrt(0.09 / 10 + z * z / 400) / (1 + z * z / 10)
    assert out["win_rate_ci95"] == pytest.approx([center - half, center + half], abs=1e-9)
    assert out["win_rate_ci95"] == pytest.approx([0.5958, 0.9821], abs=1e-4)
    same = sign_test([0.3, 0.1, 0.2], [0.3, 0.1, 0.2])
    assert same == {"wins": 0, "losses": 0, "ties": 3, "win_rate": 0.5, "win_rate_ci95": [0.0, 1.0], "p_value": 1.0,
                    "significant": False}
    lost = sign_test([0.0] * 6, [1.0] * 6)
    assert lost["win_rate"] == 0.0 and lost["p_value"] == 0.03125 and not lost["significant"]  # significant: a win
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    with pytest.raises(ValueError):
        sign_test([1.0], [1.0, 2.0])


def test_the_default_entry_is_the_served_default():
    e = [EvalEntry(adapter="none", scale=0.0, source="none"),
         EvalEntry(adapter="spo", scale=0.5, source="preset", sha256="x", load_as="spo"),
         EvalEntry(adapter="spo", scale=1.0, source="preset", sha256="x", load_as="spo")]
    assert default_entry(e, "spo", 1.0) == 2  # the default adapter at the default scale
    assert default_entry(e, "spo", 0.8) == 1  # else its first entry
    assert default_entry(e, None, 1.0) == 0  # no default adapter: the base model
    assert default_entry(e, "mine", 1.0) is None and default_entry(e[1:], None, 1.0) is None


# -- evaluation jobs in process -----------------------------------------------------------------------

PROMPTS = ["a fox", "a castle at dusk"]
SEEDS = [3, 4, 5]
REQUEST = {"num_inference_steps": 2, "width": 32, "height": 32}


@pytest.fixture
def store(tmp_path, monkeypatch, tiny_dir):
    """A job store whose job pipeline (SPO_* of this process) is the `pipe` fixture's."""
    for name in ("SPO_DEVICE", "SPO_COMPILE", "SPO_QUANT", "SPO_LORA_FUSE", "SPO_LORA_SCALE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPO_MODEL", "tiny")
    monkeypatch.setenv("SPO_BASE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SPO_LORA", str(tiny_dir / "spo_tiny_lora_webui.safetensors"))
    (tmp_path / "adapters").mkdir()
    return JobStore(tmp_path / "data", tmp_path / "adapters")


def _config(store, pipe, scorer="darkness", batch=4, **kw) -> dict:
    sha = darkening_adapter(store.adapter_dir / "dark.safetensors")
    dark = {"scale": 1.0, "source": "file", "file": "dark.safetensors", "sha256": sha}
    entries = [EvalEntry(adapter="none", scale=0.0, source="none"),
               EvalEntry(adapter="dark", load_as="dark", **dark),
               EvalEntry(adapter="dark.safetensors", load_as="eval-dark", **dark),  # the same weights, another name
               EvalEntry(adapter="spo", scale=1.0, source="preset", sha256=pipe.registry.adapters["spo"].sha256, load_as="spo")]
    return EvalConfig(entries=entries, seeds=SEEDS, request=REQUEST, scorer=scorer, batch=batch, default_adapter="spo",
                      default_lora_scale=1.0, default_entry=3, **kw).model_dump()


def _report(store, job_id) -> dict:
    return json.loads((store.dir(job_id) / "report.json").read_text())


def test_an_adapter_the_scorer_prefers_by_construction_wins_every_pair_and_twins_tie(store, pipe):
    rec = store.create(PROMPTS, _config(store, pipe), kind="eval")
    assert run_eval(store, rec["job_id"], lambda: False) == 0
    done = store.read(rec["job_id"])
    assert done["state"] == "completed" and done["images_done"] == done["images_total"] == 24
    assert done["beats_default"] == ["dark@1", "dark.safetensors@1"]
    report = _report(store, rec["job_id"])
    none, dark, twin, spo = report["entries"]
    assert [e["n"] for e in report["entries"]] == [6] * 4 and report["default_entry"] == 3
    # the darkening adapter against the base: every one of the 6 pairs, p = 2 / 2^6
    assert (dark["wins"], dark["losses"], dark["ties"], dark["win_rate"]) == (6, 0, 0, 1.0)
    assert dark["p_value"] == 0.03125 and dark["significant"] and dark["beats_default"]
    assert dark["vs_default"]["wins"] == 6 and dark["mean"] > max(none["scores"] + spo["scores"])
    # identical weights give identical images: all ties, win rate 1/2, p = 1, against each other and the same
    # outcomes against the base
    assert twin["scores"] == dark["scores"] and twin["win_rate"] == 1.0 and twin["beats_default"]
    # the first entry against itself: all ties, win rate 1/2, p = 1
    assert (none["wins"], none["losses"], none["ties"], none["win_rate"], none["p_value"]) == (0, 0, 6, 0.5, 1.0)
    assert none["win_rate_ci95"] == [0.0, 1.0] and none["beats_default"] is False
    assert spo["vs_default"] is None and spo["beats_default"] is False  # the default itself
    lo, hi = dark["ci95"]
    assert lo < dark["mean"] < hi and dark["mean"] == pytest.approx(sum(dark["scores"]) / 6)
    # the sheet: prompts x entries of the first seed; a cell is the delivered image, whose darkness score is
    # minus the mean of its [-1, 1] pixels
    sheet = report["sheet"]
    assert (sheet["rows"], sheet["columns"], sheet["cell"], sheet["seed"]) == (2, 4, [32, 32], 3)
    from PIL import Image

    with Image.open(store.dir(rec["job_id"]) / "sheet.png") as im:
        assert im.size == (sheet["origin"][0] + 4 * 34, sheet["origin"][1] + 2 * 34)
        x, y = sheet["origin"][0] + 1 * 34, sheet["origin"][1] + 1 * 34  # dark, prompt 1, the first seed
        cell = [v / 127.5 - 1 for px in im.crop((x, y, x + 32, y + 32)).get_flattened_data() for v in px]
    assert -sum(cell) / len(cell) == pytest.approx(dark["scores"][1 * len(SEEDS) + 0], abs=1e-6)


def test_twins_first_give_one_half_and_the_same_images_as_the_pipeline(store, pipe):
    cfg = _config(store, pipe, scorer="brightness")
    cfg["entries"] = cfg["entries"][1:3]  # the twins: dark, then the same file under another name
    cfg["default_entry"] = None
    rec = store.create(PROMPTS[:1], cfg, kind="eval")
    assert run_eval(store, rec["job_id"], lambda: False) == 0
    dark, twin = _report(store, rec["job_id"])["entries"]
    assert (twin["wins"], twin["losses"], twin["ties"], twin["win_rate"], twin["p_value"]) == (0, 0, 3, 0.5, 1.0)
    assert twin["beats_default"] is None and dark["beats_default"] is None
    # an eval image is what the pipeline (and so /generate) makes for the same request
    from PIL import Image

    pipe.load_adapter("dark", store.adapter_dir / "dark.safetensors", replace=True)
    try:
        [want] = pipe.generate([{"prompt": PROMPTS[0], "seed": SEEDS[0], "adapter": "dark", "lora_scale": 1.0, **REQUEST}])
    finally:
        pipe.unload_adapter("dark")
    with Image.open(store.dir(rec["job_id"]) / "eval" / "entry-01" / "p0000.png") as got:
        assert max_pixel_diff(got, want.image) <= 1


def test_cancel_and_resume_continue_at_the_batch_where_it_stopped(store, pipe):
    cfg = _config(store, pipe, batch=4)
    whole = store.create(PROMPTS, cfg, kind="eval")
    run_eval(store, whole["job_id"], lambda: False)
    rec = store.create(PROMPTS, cfg, kind="eval")
    job_id = rec["job_id"]
    calls = []

    def stop_after(n):  # SIGTERM after n batches
        calls.clear()
        return lambda: calls.append(1) or len(calls) > n

    store.update(job_id, state="running")
    assert run_eval(store, job_id, stop_after(3)) == 0
    rec = store.read(job_id)
    assert rec["state"] == "interrupted" and rec["images_done"] == 10 and rec["interruptions"] == 1  # 4 + 2, 4
    store.resume(job_id)
    store.update(job_id, state="running")
    store.cancel(job_id)  # a running job: the cancel file, seen at the next batch
    run_eval(store, job_id, lambda: False)
    assert store.read(job_id)["state"] == "canceled"
    store.resume(job_id)
    assert run_eval(store, job_id, lambda: False) == 0
    rec = store.read(job_id)
    assert rec["state"] == "completed" and rec["resumed_from_image"] == 10 and rec["images_done"] == 24
    states = [h["state"] for h in rec["history"]]
    assert states == ["queued", "running", "interrupted", "queued", "running", "canceled", "queued", "completed"]
    # the same batches, so the same images and the same scores as the run that never stopped
    assert _report(store, job_id)["entries"] == _report(store, whole["job_id"])["entries"]
    assert (store.dir(job_id) / "sheet.png").read_bytes() == (store.dir(whole["job_id"]) / "sheet.png").read_bytes()


def test_the_preference_model_scores_and_changed_weights_fail_the_job(store, pipe):
    cfg = _config(store, pipe, scorer="spm")
    cfg["entries"] = [cfg["entries"][0], cfg["entries"][3]]
    cfg["default_entry"] = 1
    rec = store.create(PROMPTS[:1], {**cfg, "seeds": [0, 1]}, kind="eval")
    assert run_eval(store, rec["job_id"], lambda: False) == 0
    base, spo = _report(store, rec["job_id"])["entries"]
    assert all(math.isfinite(s) for s in base["scores"] + spo["scores"]) and len(set(spo["scores"])) == 2
    assert base["vs_default"]["wins"] + base["vs_default"]["losses"] + base["vs_default"]["ties"] == 2
    # the file changed since submission: the job refuses to measure other weights than were named
    cfg = _config(store, pipe)
    other = LoraModuleWeights("conv_out", torch.ones(1, 32, 3, 3), torch.ones(4, 1, 1, 1), 1.0)
    save_lora_file(store.adapter_dir / "dark.safetensors", {"conv_out": other}, "diffusers")
    rec = store.create(PROMPTS[:1], cfg, kind="eval")
    with pytest.raises(Exception, match=r"adapters\[1\]: 'dark' has other weights than when the job was submitted"):
        run_eval(store, rec["job_id"], lambda: False)
