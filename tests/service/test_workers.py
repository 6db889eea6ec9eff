"""One engine per GPU: the worker/device mapping (pure, for 1, 2 and 8 GPUs and CUDA_VISIBLE_DEVICES
subsets), SPO_WORKERS parsing, and two real BentoML workers serving on CPU."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server import Server
from service import workers
from spo_runtime.errors import ConfigError
from spo_runtime.settings import Settings


def devices(plan):
    return [(w["worker_index"], w["device"], w["gpu"]) for w in plan]


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_auto_starts_one_worker_per_gpu_each_on_its_own(gpus):
    plan = workers.plan("auto", None, gpus, environ={})
    assert devices(plan) == [(i + 1, f"cuda:{i}", str(i)) for i in range(gpus)]
    assert workers.plan("auto", "cuda", gpus, environ={}) == plan  # SPO_DEVICE=cuda: the same spread


@pytest.mark.parametrize("visible, expected", [
    ("3,5", [(1, "cuda:0", "3"), (2, "cuda:1", "5")]),
    ("6", [(1, "cuda:0", "6")]),
    ("7,0,4", [(1, "cuda:0", "7"), (2, "cuda:1", "0"), (3, "cuda:2", "4")]),
    ("GPU-8f1c,GPU-22ab", [(1, "cuda:0", "GPU-8f1c"), (2, "cuda:1", "GPU-22ab")]),
])
def test_cuda_visible_devices_subset_binds_ordinals_within_the_subset(visible, expected):
    """torch renumbers the visible GPUs from 0: worker 2 of CUDA_VISIBLE_DEVICES=3,5 is cuda:1 (GPU 5), never cuda:5."""
    env = {"CUDA_VISIBLE_DEVICES": visible}
    gpus = len(visible.split(","))  # what torch.cuda.device_count() reports under that variable
    assert devices(workers.plan("auto", None, gpus, environ=env)) == expected


def test_visible_gpus_names():
    assert workers.visible_gpus(0, {}) == []
    assert workers.visible_gpus(2, {}) == ["0", "1"]
    assert workers.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": " 4, 2 "}) == ["4", "2"]
    assert workers.visible_gpus(0, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert workers.visible_gpus(0, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    # torch sees more than the variable names (it was changed after CUDA started): plain ordinals
    assert workers.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "1"}) == ["0", "1"]


def test_integer_workers_spread_round_robin_over_the_gpus():
    assert [w["device"] for w in workers.plan(4, None, 2, environ={})] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [w["device"] for w in workers.plan(2, None, 8, environ={})] == ["cuda:0", "cuda:1"]  # 6 GPUs idle
    assert [w["device"] for w in workers.plan(3, None, 1, environ={})] == ["cuda:0"] * 3


def test_resources_ask_for_the_gpus_a_gpu_model_uses():
    assert workers.resources("sdxl-spo", None, 8) == {"gpu": 8}  # BentoML then sets CUDA_VISIBLE_DEVICES=0..7
    assert workers.resources("sdxl-random", "cuda", 2) == {"gpu": 2}
    assert workers.resources("sdxl-spo", None, 0) == {"gpu": 1}  # a bento built on a CPU machine asks for one
    assert workers.resources("auto", None, 1) == {"gpu": 1}
    assert workers.resources("auto", None, 0) == {}  # the CPU demo
    assert workers.resources("tiny", None, 4) == {}
    assert workers.resources("sdxl-spo", "cuda:3", 8) == {}  # a pinned device is the operator's: not hidden
    assert workers.resources("sdxl-spo", "cpu", 8) == {}


def test_pinned_device_and_cpu():
    # SPO_DEVICE names one device: every worker binds it, and auto means one worker
    assert devices(workers.plan("auto", "cuda:1", 8, environ={})) == [(1, "cuda:1", "1")]
    assert devices(workers.plan(2, "cuda:1", 2, environ={"CUDA_VISIBLE_DEVICES": "2,6"})) == [(1, "cuda:1", "6"), (2, "cuda:1", "6")]
    assert devices(workers.plan("auto", "cpu", 2, environ={})) == [(1, "cpu", None)]
    assert devices(workers.plan(2, "cpu", 2, environ={})) == [(1, "cpu", None), (2, "cpu", None)]
    # no GPU: auto is one CPU worker; SPO_WORKERS=2 gives two CPU workers; SPO_DEVICE=cuda stays for the loader to refuse
    assert devices(workers.plan("auto", None, 0, environ={})) == [(1, "cpu", None)]
    assert devices(workers.plan(2, None, 0, environ={})) == [(1, "cpu", None), (2, "cpu", None)]
    assert workers.worker_device(1, "cuda", 0) == "cuda"
    # outside a server (library use, tests) there is no worker index: the first worker's device
    assert workers.worker_device(None, None, 4) == "cuda:0"
    with pytest.raises(ValueError):
        workers.worker_device(0, None, 2)


def test_spo_workers_accepts_auto_or_an_integer():
    assert Settings.from_env({"SPO_WORKERS": "auto"}).workers == "auto"
    assert Settings.from_env({"SPO_WORKERS": "AUTO"}).workers == "auto"
    assert Settings.from_env({"SPO_WORKERS": "3"}).workers == 3
    assert Settings.from_env({}).workers == 1
    for bad in ["0", "65", "two", "1.5", "-1"]:
        with pytest.raises(ConfigError, match=r"SPO_WORKERS: must be an integer in 1\.\.64 or auto"):
            Settings.from_env({"SPO_WORKERS": bad})


def test_server_workers_resolves_auto_on_this_machine(monkeypatch):
    monkeypatch.setattr(workers, "gpu_count", lambda: 8)
    assert workers.server_workers(Settings(workers="auto")) == 8
    assert workers.server_workers(Settings(workers="auto", device="cuda:2")) == 1
    assert workers.server_workers(Settings(workers=3)) == 3
    monkeypatch.setattr(workers, "gpu_count", lambda: 0)
    assert workers.server_workers(Settings(workers="auto")) == 1


def test_bind_records_each_worker_and_info_lists_them(monkeypatch, tmp_path):
    monkeypatch.setattr(workers, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(workers, "worker_index", lambda: 2)
    s = workers.bind(Settings(data_dir=tmp_path))
    assert s.device == "cuda:1" and s.data_dir == tmp_path
    assert workers.bind(Settings(data_dir=tmp_path, device="cpu")).device == "cpu"  # pinned: unchanged
    me = os.getpid()
    assert workers.bindings(tmp_path) == {me: {"worker_index": 2, "device": "cpu", "gpu": None}}
    # a dead worker's record is neither listed nor kept
    dead = tmp_path / "worker_devices" / f"{workers._host()}.999999999.json"
    dead.write_text('{"pid": 999999999, "worker_index": 1, "device": "cuda:0"}')
    assert list(workers.bindings(tmp_path)) == [me]
    workers.record(tmp_path, {"worker_index": 2, "device": "cuda:1", "gpu": "6"})
    assert not dead.exists()
    listed = workers.describe(tmp_path, [{"pid": me, "default_lora_scale": 1.0}, {"pid": 999999999}])
    assert listed[0] == {"pid": me, "default_lora_scale": 1.0, "worker_index": 2, "device": "cuda:1", "gpu": "6"}
    assert listed[1] == {"pid": 999999999}


# -- two real workers on CPU ----------------------------------------------------------------------


def _info(url: str, token: str | None = None) -> dict:
    # a fresh connection each time, so the kernel may hand it to either worker; pids only to the admin token
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url + "/info", timeout=10, headers={"connection": "close", **auth}).json()


@pytest.mark.server
def test_two_workers_serve_on_cpu_with_distinct_indices(tmp_path):
    # its own BENTOML_HOME: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir at start, which
    # would wipe (or mix in) the metrics of any other server running on this machine meanwhile
    env = {"SPO_WORKERS": "2", "SPO_DATA_DIR": str(tmp_path / "data"), "SPO_MAX_BATCH": "4",
           "BENTOML_HOME": str(tmp_path / "bentoml")}
    with Server(env, tmp_path / "server.log") as s:
        seen: dict[int, dict] = {}  # worker index -> its latest /info
        admin = (tmp_path / "data" / "admin_token").read_text().strip()  # no SPO_ADMIN_TOKEN: the one both read

        def poll(times: int) -> None:
            for _ in range(times):
                body = _info(s.url, admin)
                if body.get("ready"):
                    seen[body["worker_index"]] = body

        deadline = time.time() + 60  # the second worker may still be loading when the first is ready
        while set(seen) != {1, 2} and time.time() < deadline:
            poll(1)
            time.sleep(0.05)
        assert set(seen) == {1, 2}, f"ready workers: {sorted(seen)}"
        # rounds of concurrent requests on fresh connections until each worker has served some
        # (2 steps are the warm-up image's: more means requests ran there)
        for round_ in range(30):
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda i: httpx.post(
                    s.url + "/generate", json={"prompt": "a fox", "seed": round_ * 4 + i, "num_inference_steps": 2},
                    timeout=60, headers={"connection": "close"}).status_code, range(4)))
            assert codes == [200] * 4
            poll(8)
            if all(b["engine"]["steps"] > 2 for b in seen.values()):
                break
        else:
            pytest.fail(f"a worker served nothing: {[(k, v['engine']['steps']) for k, v in seen.items()]}")
        assert seen[1]["pid"] != seen[2]["pid"], "two processes"
        assert all(b["device"] == "cpu" for b in seen.values())
        listed = seen[1]["workers"]  # whichever worker answers lists both, each with its index and device
        assert [(w["worker_index"], w["device"], w["pid"]) for w in listed] == [
            (1, "cpu", seen[1]["pid"]), (2, "cpu", seen[2]["pid"])]
        public = _info(s.url)  # without the admin token: indices and devices, no pids or host names
        assert "pid" not in public and [(w["worker_index"], w["device"]) for w in public["workers"]] == [(1, "cpu"), (2, "cpu")]
        assert not any({"pid", "host"} & set(w) for w in public["workers"]), public["workers"]
        m = s.metrics()
        assert sum(v for k, v in m.items() if k.startswith("spo_images_total")) >= 6  # 2 warm-ups + 4 requests, summed
