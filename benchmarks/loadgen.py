"""HTTP load generators for POST /generate: closed loop (N clients) and open loop (Poisson arrivals).

Both return one Record per request; benchmarks/report.py turns records into summaries. Requests come
from seeded RNGs, so two systems measured with the same seed see the same requests (and, in the open
loop, the same arrival times).

    workload = Workload(load_prompts())
    records = asyncio.run(closed_loop(url, workload, clients=4, run_s=45, seed=0))
    records = asyncio.run(open_loop(url, poisson_schedule(2.0, 60, seed=0, workload=workload)))
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.txt"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUEST_TIMEOUT_S = 300.0
MAX_REQUESTS_PER_CLIENT = 5000  # a bound on every closed loop, whatever its duration
MAX_ARRIVALS = 100_000  # a bound on every open-loop schedule


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


@dataclass(frozen=True)
class Workload:
    """What each request asks for: a prompt, a step count (both drawn uniformly) and a random seed."""

    prompts: list[str]
    steps: tuple[int, ...] = (10, 20, 30)
    guidance_scale: float = 5.0
    size: int = 64

    def request(self, rng: random.Random) -> dict:
        return {
            "prompt": rng.choice(self.prompts),
            "num_inference_steps": rng.choice(self.steps),
            "seed": rng.randrange(2**32),
            "guidance_scale": self.guidance_scale,
            "width": self.size,
            "height": self.size,
        }

    def warmup_requests(self) -> list[dict]:
        """One request per step count: what every system (and the in-process replay) runs before measuring."""
        return [{**self.request(random.Random(s)), "num_inference_steps": s} for s in self.steps]


@dataclass
class Record:
    """One request. Times in seconds since the run began; t0 is when the request was sent (closed loop)
    or scheduled (open loop: latency then includes any delay in sending it)."""

    t0: float
    t1: float
    latency: float
    ok: bool
    error: str | None  # kind: http_<status>, not_png, or the client exception's class name
    detail: str | None
    steps: int
    client: int | None = None
    request: dict | None = None


async def post_generate(http: httpx.AsyncClient, url: str, req: dict) -> tuple[bool, str | None, str | None]:
    """POST one request -> (ok, error kind, error detail). Only a 200 with a PNG body is a success."""
    try:
        r = await http.post(url, json=req)
    except Exception as e:  # whatever the client raises is an error of the system under test
        return False, type(e).__name__, str(e)[:300]
    if r.status_code != 200:
        return False, f"http_{r.status_code}", r.text[:300]
    if not r.content.startswith(PNG_MAGIC):
        return False, "not_png", r.content[:100].decode("latin-1")
    return True, None, None


def new_client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
                             limits=httpx.Limits(max_connections=max(64, 4 * n), max_keepalive_connections=max(64, 4 * n)))


async def closed_loop(url: str, workload: Workload, clients: int, run_s: float, seed: int) -> list[Record]:
    """`clients` clients, each sending one request at a time, for run_s seconds (then the requests in
    flight are awaited). After an error a client pauses 0.1 s, so a failing server sees no hot loop."""
    records: list[Record] = []
    t_begin = time.perf_counter()
    t_end = t_begin + run_s

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(f"closed-{seed}-{clients}-{i}")
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= t_end:
                return
            req = workload.request(rng)
            t0 = time.perf_counter()
            ok, kind, detail = await post_generate(http, url, req)
            t1 = time.perf_counter()
            records.append(Record(t0 - t_begin, t1 - t_begin, t1 - t0, ok, kind, detail, req["num_inference_steps"], i, req))
            if not ok:
                await asyncio.sleep(0.1)

    async with new_client(clients) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return records


def arrival_times(rng: random.Random, rate: float, duration: float):
    """Poisson arrivals: exponential gaps at `rate` per second, within `duration` s, at most MAX_ARRIVALS.
    A generator, so a caller that draws each arrival's request from the same `rng` between two times
    keeps one seeded sequence."""
    t = 0.0
    for _ in range(MAX_ARRIVALS):
        t += rng.expovariate(rate)
        if t > duration:
            return
        yield t


def poisson_schedule(rate: float, duration: float, seed: int, workload: Workload) -> list[tuple[float, dict]]:
    """Arrival times (exponential gaps at `rate` per second, within `duration` s) and their requests."""
    rng = random.Random(f"open-{seed}")
    return [(t, workload.request(rng)) for t in arrival_times(rng, rate, duration)]


async def open_loop(url: str, schedule: list[tuple[float, dict]]) -> list[Record]:
    """Send each request at its scheduled time, whatever the responses so far; records in schedule order."""
    records: list[Record] = []

    async def fire(at: float, req: dict, http: httpx.AsyncClient, t_begin: float) -> None:
        await asyncio.sleep(max(0.0, t_begin + at - time.perf_counter()))
        ok, kind, detail = await post_generate(http, url, req)
        t1 = time.perf_counter() - t_begin
        records.append(Record(at, t1, t1 - at, ok, kind, detail, req["num_inference_steps"], None, req))

    async with new_client(64) as http:
        t_begin = time.perf_counter()
        await asyncio.gather(*(fire(at, req, http, t_begin) for at, req in schedule))
    return sorted(records, key=lambda r: r.t0)


async def warm_up(url: str, workload: Workload) -> list[str]:
    """Workload.warmup_requests, one at a time; returns the errors (reported, not fatal)."""
    errs = []
    async with new_client(1) as http:
        for req in workload.warmup_requests():
            ok, kind, detail = await post_generate(http, url, req)
            if not ok:
                errs.append(f"{kind}: {detail}")
    return errs
