"""Adapter evaluation jobs: prompts x seeds generated with each entry (an adapter at a scale, or "none": the
base model), scored, compared pairwise, and written as `report.json` and `sheet.png` in the job's directory.

An evaluation is a job of kind "eval" (`jobs.JobStore`): the supervisor queues and starts it like a
training job, in the job process (`job_process.run_job`), which calls `run_eval`. That process loads its
own pipeline from the server's SPO_* settings (uncompiled) and generates with `SpoPipeline.generate`,
the sampler serving uses, so an image equals what /generate answers for the same prompt, seed, adapter
and scale. Entry i's images are generated in batches of `batch` (prompt-major, seed-minor); after each
batch its scores are written to `eval/entry-NN.json`, so a stopped job (cancel, SIGTERM, a dead server)
resumes at the batch where it stopped, with the same batches, so the same images.

The report compares each entry with the first (`reference`) and with the server's default at submission
(`default_entry`), pair by pair (same prompt and seed): see `eval_stats` (ties dropped; a sign test).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from spo_runtime.errors import InvalidRequestError
from spo_runtime.fsutil import atomic_write, write_json_atomic
from spo_runtime.limits import EVAL_MAX_ADAPTERS, EVAL_MAX_SEEDS, MAX_SEED
from spo_runtime.training.eval_stats import ALPHA, mean_ci, sign_test

if TYPE_CHECKING:
    from PIL import Image

    from spo_runtime.model.pipeline import SpoPipeline
    from spo_runtime.training.jobs import JobStore
    from spo_runtime.preference.scorers import PreferenceScorer

__all__ = ["SCORERS", "EvalConfig", "EvalEntry", "build_report", "check_seeds", "contact_sheet", "default_entry", "load_scorer",
           "run_eval"]

SCORERS = ("spm", "brightness", "darkness")
SHEET_CELL = 128  # a contact sheet's cells: each image shrunk to fit, never enlarged
SHEET_ROWS = 64  # its rows: the first prompts (a sheet of 256 x 8 full images would be hundreds of MB)
_HEADER, _LEFT, _PAD = 14, 30, 2  # the sheet's label row and column, and the gap between cells
TIES = "pairs with equal scores are dropped; win_rate = wins / (wins + losses), 0.5 with p_value 1 when all tie"


class EvalEntry(BaseModel):
    """One column of the evaluation: an adapter at a scale, as the submission resolved it."""

    model_config = ConfigDict(extra="forbid")

    adapter: str  # as given: "none", a loaded adapter's name, or a file under SPO_ADAPTER_DIR
    scale: float
    source: Literal["none", "preset", "file"]  # preset: loaded by the preset itself (the job's pipeline has it)
    file: str | None = None  # relative to SPO_ADAPTER_DIR
    sha256: str | None = None  # the weights the submission saw; the job refuses others
    load_as: str | None = None  # the adapter's name in the job's pipeline

    @property
    def label(self) -> str:
        return "none" if self.source == "none" else f"{self.adapter}@{self.scale:g}"


class EvalConfig(BaseModel):
    """An evaluation job's configuration, as /eval/submit resolved it (the record's `config`)."""

    model_config = ConfigDict(extra="forbid")

    entries: list[EvalEntry] = Field(min_length=1, max_length=EVAL_MAX_ADAPTERS)
    seeds: list[int] = Field(min_length=1, max_length=EVAL_MAX_SEEDS)
    request: dict[str, Any] = {}  # the generation fields every image shares (steps, size, guidance, ...)
    scorer: Literal[SCORERS] = "spm"  # type: ignore[valid-type]
    batch: int = Field(8, ge=1, le=256)  # images per generate call
    default_adapter: str | None = None  # the server's default adapter and scale when submitted
    default_lora_scale: float | None = None
    default_entry: int | None = None  # the entry that is that default, if any


def default_entry(entries: list[EvalEntry], adapter: str | None, scale: float) -> int | None:
    """The entry that is what the server serves by default: the default adapter (None: "none") at the default
    scale, else the first entry of that adapter at any scale; None when no entry names it."""
    def same(e: EvalEntry) -> bool:
        return e.source == "none" if adapter is None else e.source != "none" and e.adapter == adapter

    exact = [i for i, e in enumerate(entries) if same(e) and (adapter is None or e.scale == scale)]
    loose = [i for i, e in enumerate(entries) if same(e)]
    return (exact or loose or [None])[0]


def load_scorer(name: str, pipe: SpoPipeline) -> PreferenceScorer:
    """The scorer `name` (SCORERS) for `pipe`: the one place the evaluation gets its scorers from."""
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.scorers import default_scorer

    return default_scorer(TrainConfig(scorer=name), pipe)


def _pipeline() -> SpoPipeline:
    """The job's pipeline: the server's SPO_* settings, device SPO_DEVICE (the supervisor sets the training
    device), without compiling (minutes, for one job) but otherwise as served (fused default, precision).
    No prompt-embedding cache: each batch encodes its own prompts together, so a batch's images do not
    depend on the batches before it (an embedding computed beside other prompts differs in its last bits)
    and a resumed job makes the very images an uninterrupted one makes."""
    from spo_runtime.model.loading import load_pipeline
    from spo_runtime.settings import Settings

    return load_pipeline(Settings.from_env(compile=False, embed_cache_size=0))


def _load_entries(pipe: SpoPipeline, cfg: EvalConfig, adapter_dir: Path) -> list[str | None]:
    """Each entry's adapter loaded into `pipe` (a file not already loaded with the same bytes); its name there.
    An adapter whose bytes differ from those the submission saw fails the job, naming the entry."""
    reg = pipe.registry
    root = Path(adapter_dir).resolve()
    names: list[str | None] = []
    for i, e in enumerate(cfg.entries):
        if e.source == "none":
            names.append(None)
            continue
        have = reg.adapters.get(e.load_as)
        if e.source == "file" and (have is None or have.sha256 != e.sha256):
            path = (root / e.file).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise InvalidRequestError(f"adapters[{i}]", f"{e.file!r} is no longer a file under SPO_ADAPTER_DIR")
            pipe.load_adapter(e.load_as, path, replace=True)
            have = reg.adapters[e.load_as]
        if have is None or have.sha256 != e.sha256:
            got = have.sha256[:16] if have is not None else "not loaded"
            raise InvalidRequestError(f"adapters[{i}]", f"{e.adapter!r} has other weights than when the job was "
                                                        f"submitted (sha256 {e.sha256[:16]}, now {got})")
        names.append(e.load_as)
    return names


def _request(entry: EvalEntry, name: str | None, prompt: str, seed: int, fields: dict) -> dict:
    """The /generate body of one image: "none" is /generate's lora_scale 0 (the default adapter's base)."""
    out = {**fields, "prompt": prompt, "seed": seed, "lora_scale": 0.0 if entry.source == "none" else entry.scale}
    if name is not None:
        out["adapter"] = name
    return out


def _score(scorer: PreferenceScorer, images: list[Image.Image], prompts: list[str], device) -> list[float]:
    """The delivered 8-bit images, as [-1, 1] tensors, scored at timestep 0 (finished images)."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).to(device)
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return [float(v) for v in scorer(x, prompts, torch.zeros(len(images), dtype=torch.long, device=device))]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _partial(work: Path, i: int) -> list[float]:
    path = work / f"entry-{i:02d}.json"
    return json.loads(path.read_text())["scores"] if path.exists() else []


def run_eval(store: JobStore, job_id: str, stop_requested: Callable[[], bool]) -> int:
    """The body of an evaluation job in the job process: generate, score, report; resumes from its files.
    Stops between batches on a cancel (canceled) or `stop_requested` (SIGTERM: interrupted, queued again)."""
    d = store.dir(job_id)
    cfg = EvalConfig.model_validate(store.read(job_id)["config"])
    prompts = [p for p in (d / "prompts.txt").read_text().splitlines() if p.strip()]
    pipe = _pipeline()
    names = _load_entries(pipe, cfg, store.adapter_dir)
    scorer = load_scorer(cfg.scorer, pipe)
    work = d / "eval"
    work.mkdir(exist_ok=True)
    items = [(p, s) for p in range(len(prompts)) for s in range(len(cfg.seeds))]
    scores = [_partial(work, i) for i in range(len(cfg.entries))]
    total, first = len(items) * len(cfg.entries), sum(map(len, scores))
    store.update(job_id, images_total=total, images_done=first, resumed_from_image=first or None)
    t0, done = time.time(), first
    for i, entry in enumerate(cfg.entries):
        (work / f"entry-{i:02d}").mkdir(exist_ok=True)
        while len(scores[i]) < len(items):
            if stop_requested() or (d / "cancel").exists():
                return _stopped(store, job_id, d)
            batch = items[len(scores[i]): len(scores[i]) + cfg.batch]
            results = pipe.generate([_request(entry, names[i], prompts[p], cfg.seeds[s], cfg.request) for p, s in batch])
            images = [r.image for r in results]
            for (p, s), image in zip(batch, images):
                if s == 0 and p < SHEET_ROWS:  # the sheet's cell: the first seed
                    cell = image.copy()
                    cell.thumbnail((SHEET_CELL, SHEET_CELL))
                    atomic_write(work / f"entry-{i:02d}" / f"p{p:04d}.png", _png(cell))
            scores[i] += _score(scorer, images, [prompts[p] for p, _ in batch], pipe.device)
            write_json_atomic(work / f"entry-{i:02d}.json", {"scores": scores[i]})
            done += len(batch)
            eta = (time.time() - t0) / (done - first) * (total - done)
            store.update(job_id, images_done=done, entry=i, eta_s=round(eta, 1))
    report = build_report(cfg, len(prompts), scores)
    sheet, report["sheet"] = contact_sheet(work, cfg, min(len(prompts), SHEET_ROWS))
    atomic_write(d / "sheet.png", _png(sheet))
    write_json_atomic(d / "report.json", {"job_id": job_id, **report})
    store.update(job_id, state="completed", finished_at=time.time(), eta_s=0.0,
                 beats_default=[e["label"] for e in report["entries"] if e["beats_default"]])
    return 0


def _stopped(store: JobStore, job_id: str, d: Path) -> int:
    if (d / "cancel").exists():
        store.update(job_id, state="canceled", finished_at=time.time())
    else:
        store.update(job_id, state="interrupted", interruptions=store.read(job_id).get("interruptions", 0) + 1)
    return 0


def build_report(cfg: EvalConfig, n_prompts: int, scores: list[list[float]]) -> dict:
    """Per entry: the score's mean and 95% interval over its images, the sign test against the first entry
    (`wins` ... `significant`) and against the default entry (`vs_default`), and `beats_default`: a
    significant win against the default entry (None when no entry is the default). `scores[i][p * S + s]`
    is entry i's score of prompt p with seed s (S seeds)."""
    dflt = cfg.default_entry
    entries = []
    for i, (e, sc) in enumerate(zip(cfg.entries, scores)):
        vs_default = sign_test(sc, scores[dflt]) if dflt is not None and i != dflt else None
        entries.append({
            "index": i, "label": e.label, "adapter": e.adapter, "scale": e.scale, "sha256": e.sha256,
            **mean_ci(sc), **sign_test(sc, scores[0]), "vs_default": vs_default,
            "beats_default": None if dflt is None else bool(vs_default and vs_default["significant"]),
            "scores": sc,
        })
    return {"scorer": cfg.scorer, "prompts": n_prompts, "seeds": cfg.seeds, "request": cfg.request,
            "images": n_prompts * len(cfg.seeds) * len(cfg.entries), "reference": 0,
            "default_adapter": cfg.default_adapter, "default_lora_scale": cfg.default_lora_scale,
            "default_entry": dflt, "alpha": ALPHA, "ties": TIES, "entries": entries}


def contact_sheet(work: Path, cfg: EvalConfig, rows: int) -> tuple[Image.Image, dict]:
    """Prompts (rows) x entries (columns) of the first seed's images, labelled #entry and prompt number; and
    where cell (r, c) lies: x = origin[0] + c * (cell[0] + pad), y = origin[1] + r * (cell[1] + pad)."""
    from PIL import Image, ImageDraw

    first = Image.open(work / "entry-00" / "p0000.png")
    cw, ch = first.size
    cols = len(cfg.entries)
    sheet = Image.new("RGB", (_LEFT + cols * (cw + _PAD), _HEADER + rows * (ch + _PAD)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for c in range(cols):
        draw.text((_LEFT + c * (cw + _PAD) + 1, 1), f"#{c}", fill=(230, 230, 230))
        for r in range(rows):
            with Image.open(work / f"entry-{c:02d}" / f"p{r:04d}.png") as cell:
                sheet.paste(cell.convert("RGB"), (_LEFT + c * (cw + _PAD), _HEADER + r * (ch + _PAD)))
    for r in range(rows):
        draw.text((2, _HEADER + r * (ch + _PAD) + 1), str(r), fill=(230, 230, 230))
    return sheet, {"rows": rows, "columns": cols, "cell": [cw, ch], "origin": [_LEFT, _HEADER], "pad": _PAD,
                   "seed": cfg.seeds[0], "labels": [e.label for e in cfg.entries]}


def check_seeds(seeds: list[int]) -> list[int]:
    """1..EVAL_MAX_SEEDS seeds in 0..MAX_SEED (InvalidRequestError naming `seeds` or `seeds[i]`)."""
    if not 1 <= len(seeds) <= EVAL_MAX_SEEDS:
        raise InvalidRequestError("seeds", f"must hold 1..{EVAL_MAX_SEEDS} seeds, got {len(seeds)}")
    for j, s in enumerate(seeds):
        if not 0 <= s <= MAX_SEED:
            raise InvalidRequestError(f"seeds[{j}]", f"must be in 0..{MAX_SEED}, got {s}")
    return seeds
