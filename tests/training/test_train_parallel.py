"""Data-parallel SPO training on CPU (gloo, 2 ranks): the same LoRA as one process that sees the same
pairs with twice the accumulation; a killed rank fails the job with the reason; the job resumes; the
ranks' environment holds no token and their collectives listen on loopback only."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spo_runtime import Settings, load_pipeline
from spo_runtime.training.distributed import launch, resolve_world
from spo_runtime.errors import InvalidRequestError
from spo_runtime.training.jobs import JobStore
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.trainer import SPOTrainer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a fox", "a castle", "an owl", "a city at night", "a red car", "a portrait"]
# 2 ranks x 1 prompt, 8 pairs per optimiser step: micro-batch 2 x accumulation 2 on each of 2 ranks;
# one process: 2 prompts, micro-batch 2 x accumulation 4.
CONFIG = dict(scorer="brightness", rank=4, alpha=4, lr=2e-3, num_inference_steps=6, chunk=2, train_t_max=999,
              threshold=0.0, width=32, height=32, micro_batch=2, effective_batch=8, checkpoint_every=1,
              targets=["to_q", "to_k", "to_v", "to_out.0", "conv1"])


def lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint(run: Path, round_: int) -> Path:
    return run / "checkpoints" / f"round-{round_:06d}" / "lora_diffusers.safetensors"


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_job(tmp_path, job_id, env) -> subprocess.CompletedProcess:
    """The trainer process of a job, as the supervisor starts it (which marks the job running first)."""
    JobStore(tmp_path / "data", tmp_path / "adapters").update(job_id, state="running")
    d = tmp_path / "data" / "jobs" / job_id
    return subprocess.run([sys.executable, "-m", "spo_runtime", "train-job", str(d), "--adapter-dir", str(tmp_path / "adapters")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_a_killed_rank_fails_then_resumes(tiny_dir, tmp_path, one_thread):
    env = {**os.environ, "SPO_MODEL": "tiny", "SPO_BASE_MODEL": str(tiny_dir), "SPO_DEVICE": "cpu",
           "SPO_TORCH_THREADS": "1", "SPO_FAULTS": "kill_rank:rank=1:round=3"}
    store = JobStore(tmp_path / "data", tmp_path / "adapters")
    cfg = {**CONFIG, "prompts_per_round": 1, "nproc": 2, "max_rounds": 3}
    rec = store.create(PROMPTS, cfg, None, "parallel")
    job = rec["job_id"]
    t0 = time.time()
    proc = run_job(tmp_path, job, env)
    killed_s = time.time() - t0
    rec = store.read(job)
    # rank 1 was lost as round 3 began: the job failed, saying which rank and how
    assert proc.returncode == 1 and rec["state"] == "failed", (proc.stderr[-3000:], rec)
    assert "rank 1 was killed by signal 9 (SIGKILL)" in rec["error"], rec["error"]
    assert rec["world_size"] == 2 and rec["pairs_per_step"] == 8 and rec["grad_accum"] == 2 and rec["round"] == 2
    run = store.root / job / "run"
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["round"] == 2

    # one process, two prompts per round, twice the accumulation, sampling each prompt in a batch of its
    # own as each rank did (and on one thread, as each rank ran): the same pairs, the same LoRA
    one = TrainConfig(**{**CONFIG, "prompts_per_round": 2, "rollout_batch": 1, "max_rounds": 3})
    assert one.accumulation(1) == 4 and TrainConfig(**{**CONFIG, "prompts_per_round": 1}).accumulation(2) == 2
    ref = SPOTrainer(load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False)), one, PROMPTS, tmp_path / "one")
    start = ref.lora_modules()
    rows = [ref.run_round() for _ in range(2)]
    ref.save_checkpoint()
    single, parallel = lora(checkpoint(tmp_path / "one", 2)), lora(checkpoint(run, 2))
    moved = max(float((start[m].up - ref.lora_modules()[m].up).abs().max()) for m in start)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"2 ranks vs 1 process after 2 rounds: max |dLoRA| {worst(single, parallel):.2e} (LoRA moved {moved:.2e}); "
          f"pairs kept {[r['pairs_kept'] for r in logged]} vs {[r['pairs_kept'] for r in rows]}; killed run {killed_s:.1f}s")
    assert [r["pairs_kept"] for r in logged] == [r["pairs_kept"] for r in rows] and all(r["pairs_kept"] > 0 for r in rows)
    assert [r["optimizer_steps"] for r in logged] == [r["optimizer_steps"] for r in rows]
    assert all(r["world_size"] == 2 and r["pairs_per_step"] == 8 for r in logged)
    assert moved > 1e-3  # the LoRA trained: the tolerance below is far under what a round changes
    assert worst(single, parallel) < 1e-5

    # resume: the job is queued again and finishes round 3 from the round-2 checkpoint, on 2 ranks
    store.resume(job)
    proc = run_job(tmp_path, job, {k: v for k, v in env.items() if k != "SPO_FAULTS"})
    rec = store.read(job)
    assert proc.returncode == 0 and rec["state"] == "completed", (proc.stderr[-3000:], rec)
    assert rec["resumed_from_round"] == 2 and rec["round"] == 3 and rec["world_size"] == 2
    ref.run_round()
    ref.save_checkpoint()
    assert worst(lora(checkpoint(tmp_path / "one", 3)), lora(checkpoint(run, 3))) < 1e-5
    exported = lora(tmp_path / "adapters" / rec["result"]["files"]["diffusers"])
    assert worst(exported, lora(checkpoint(run, 3))) == 0


def _probe_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    """A rank of a real gloo group: one all-reduce, then what it runs with: its environment as the kernel
    holds it and the local addresses of its sockets while the group is up."""
    import psutil

    from spo_runtime.training.distributed import join_group

    group = join_group(rank, world, rendezvous, "cpu", timeout_s=120)
    total = group.all_sum([rank + 1])[0]
    with open("/proc/self/environ", "rb") as fh:
        env = dict(kv.split("=", 1) for kv in fh.read().decode().split("\0") if "=" in kv)
    addresses = sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.laddr})
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"env": env, "sum": total, "addresses": addresses}))
    group.barrier()
    group.close()


@pytest.mark.slow
def test_ranks_get_no_tokens_and_their_collectives_listen_on_loopback(tmp_path, monkeypatch):
    # a trainer process started by hand with the server's tokens and a network interface for gloo
    monkeypatch.setenv("SPO_ADMIN_TOKEN", "admin-secret-0123456789")
    monkeypatch.setenv("SPO_API_TOKEN", "api-secret-0123456789")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    result = launch(2, _probe_rank, (str(tmp_path),), tmp_path / ".rendezvous", error_dir=tmp_path)
    assert result.ok, result.reason
    assert os.environ["SPO_ADMIN_TOKEN"] == "admin-secret-0123456789"  # the launcher's own is left as it was
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        env = seen["env"]
        assert seen["sum"] == 3  # the collective ran
        assert "SPO_ADMIN_TOKEN" not in env and "SPO_API_TOKEN" not in env
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["GLOO_SOCKET_IFNAME"] == "lo"
        assert seen["addresses"] and all(a.startswith("127.") for a in seen["addresses"]), seen["addresses"]


def test_world_resolution_and_the_effective_batch():
    cpu = Settings(device="cpu")
    assert resolve_world(None, cpu) == (1, ["cpu"])
    assert resolve_world(3, cpu) == (3, ["cpu"] * 3)
    assert resolve_world(None, Settings(device="cpu", train_nproc=2)) == (2, ["cpu", "cpu"])
    gpus = Settings(device="cpu", train_devices="2, cuda:3")
    assert resolve_world(None, gpus) == (2, ["cuda:2", "cuda:3"])  # a GPU job takes every training GPU
    assert resolve_world(1, gpus) == (1, ["cuda:2"])
    with pytest.raises(InvalidRequestError) as e:
        resolve_world(3, gpus)
    assert e.value.field == "config.nproc" and "at most 2" in str(e.value)
    # the paper's recipe: 16 pairs per step; accumulation follows the ranks
    paper = TrainConfig()
    assert paper.effective_batch == 16 and paper.micro_batch == 2 and paper.prompts_per_round == 2
    assert [paper.accumulation(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    # grad_accum alone sets the effective batch; both must agree
    legacy = TrainConfig(micro_batch=8, grad_accum=1)
    assert legacy.pairs_per_step(1) == 8 and legacy.pairs_per_step(2) == 16
    TrainConfig(micro_batch=2, grad_accum=2, effective_batch=8).check_world(2)
    with pytest.raises(InvalidRequestError) as e:
        TrainConfig(micro_batch=2, grad_accum=2, effective_batch=8).check_world(1)
    assert e.value.field == "config.grad_accum"
