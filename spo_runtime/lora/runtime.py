"""LoRA at run time: named adapters, per-sample scales inside one UNet forward, a fused fast path.

Every targeted nn.Linear / nn.Conv2d is wrapped once (`LoraLinear`, `LoraConv2d`, original kept as
`.base_layer`). Each UNet call runs inside `with registry.row_scales(rows):`, which sets, on the
shared `LoraContext`, one scale per batch row for each adapter whose rows need its branch (and puts
back what was there on exit). A wrapped layer computes

    y = base(x) + sum_a  s_a[row] * (alpha_a / r_a) * up_a(down_a(x))

One adapter may be fused into the base weights at a scale s_f: rows at s_f then cost no LoRA
compute, and other rows run only the residual s_i - s_f. Fusing always starts from a pristine copy
of the base weight, so re-fusing at another scale accumulates no rounding. With SPO_LORA_ROW_SUBSET,
rows at s_f also skip the branch when the others are few (it runs on those rows alone). A base
quantized by SPO_QUANT keeps its branch in the pipeline's dtype; unfusing re-quantizes the restored weight.

Text-encoder layers of an adapter (`text_encoder.<path>`, `text_encoder_2.<path>`) are wrapped the same
way but read their scales from a second context, `te_ctx`, set by `with registry.text_scales(rows):`
(one row per prompt being encoded); they are never fused, so a row's scale is applied as it is.

We wrap layers ourselves instead of using peft: peft's layers take one scale per adapter for the
whole batch and skip the LoRA branch entirely once merged, so they cannot express per-row scales
over several adapters on top of a fused base.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from spo_runtime.errors import AdapterInUseError, AdapterMemoryError, AdapterNotFoundError, LoraFormatError
from spo_runtime.lora.format import (PARTS, LoraFile, LoraModuleWeights, is_text_encoder_module, module_part,
                                      module_specs_of, read_lora_file)


class LoraContext:
    """Per-forward scales shared by every wrapped layer: {adapter: (B,) residual scale}, and for an adapter
    whose branch only some rows need, those rows: {adapter: (k,) row indices} (absent: every row)."""

    def __init__(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}


def _row_view(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if s.shape[0] != h.shape[0]:
        raise RuntimeError(f"LoRA scales hold {s.shape[0]} rows but the layer input has {h.shape[0]}")
    return s.view(-1, *([1] * (h.dim() - 1)))  # [B,1,1] for linear tokens, [B,1,1,1] for convs


class _LoraLayer(nn.Module):
    def __init__(self, base: nn.Module, ctx: LoraContext):
        super().__init__()
        self.base_layer = base
        object.__setattr__(self, "ctx", ctx)  # shared, not a submodule
        # adapter -> (down, up * alpha / r); plain tensors: never part of the UNet's state_dict
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pristine: torch.Tensor | None = None  # base weight before fusing

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update at scale 1, in float32, shaped like the base weight."""
        down, up = self.adapters[name]
        d = up.float().flatten(1) @ down.float().flatten(1)
        return d.view_as(self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name, s in self.ctx.terms.items():
            w = self.adapters.get(name)
            if w is None:
                continue
            idx = self.ctx.rows.get(name)
            if idx is not None and not torch.is_grad_enabled() and not _fp32_branch(x, w[0]):
                # Only rows idx need the branch (the others sit at the fused scale): run it on them alone,
                # so they cost only their own LoRA FLOPs, and add the result into their rows of `out`.
                sub = self.add_branch(out.index_select(0, idx), x.index_select(0, idx), s.index_select(0, idx), *w)
                out.index_copy_(0, idx, sub)  # `out` is this call's own fresh tensor (no grad here)
            else:
                out = self.add_branch(out, x, s, *w)
        return out


def _fp32_branch(x: torch.Tensor, down: torch.Tensor) -> bool:
    """A float32 adapter (the trainer's parameters) on a lower-precision base runs its branch in float32:
    the LoRA math and its gradients keep fp32 precision while the base layer runs in bf16/fp16.
    Serving adapters are stored in the pipeline's dtype, so this is False for them."""
    return down.dtype == torch.float32 and x.dtype != torch.float32


class LoraLinear(_LoraLayer):
    def add_branch(self, out, x, s, down, up):
        if _fp32_branch(x, down):
            h = F.linear(x.float(), down)
            h = h * _row_view(s, h).float()
            return out + F.linear(h, up).to(out.dtype)
        # y += (s_row * x D^T) U^T: the scale multiplies the rank-r activation (cheapest place),
        # and the up-projection accumulates into y in one addmm.
        h = F.linear(x, down.to(x.dtype))
        h = h * _row_view(s, h)
        return out.view(-1, out.shape[-1]).addmm(h.reshape(-1, h.shape[-1]), up.to(x.dtype).t()).view(out.shape)


class LoraConv2d(_LoraLayer):
    def add_branch(self, out, x, s, down, up):
        b = self.base_layer
        if _fp32_branch(x, down):
            h = F.conv2d(x.float(), down, None, b.stride, b.padding, b.dilation, b.groups)
            return out + F.conv2d(h * _row_view(s, h).float(), up).to(out.dtype)
        h = F.conv2d(x, down.to(x.dtype), None, b.stride, b.padding, b.dilation, b.groups)
        return out + F.conv2d(h * _row_view(s, h), up.to(x.dtype))


@dataclass
class Adapter:
    """A loaded adapter: where it came from and what it costs."""

    name: str
    layout: str
    rank: int
    targets: list[str]
    modules: list[str]
    nbytes: int
    sha256: str
    source: str  # file path, or a description for built-in adapters

    @property
    def text_encoder_modules(self) -> list[str]:
        return [m for m in self.modules if is_text_encoder_module(m)]

    @property
    def unet_modules(self) -> list[str]:
        return [m for m in self.modules if not is_text_encoder_module(m)]

    @property
    def has_text_encoder(self) -> bool:
        return any(is_text_encoder_module(m) for m in self.modules)

    @property
    def layers_by_part(self) -> dict[str, int]:
        """How many layers the adapter targets in each part: {'unet': n, 'text_encoder': n, 'text_encoder_2': n}."""
        counts = dict.fromkeys(PARTS, 0)
        for m in self.modules:
            counts[module_part(m)] += 1
        return counts

    def info(self, show_source: bool = True) -> dict:
        te = self.text_encoder_modules
        return {
            "name": self.name,
            "layout": self.layout,
            "text_encoder": bool(te),
            "rank": self.rank,
            "targets": self.targets,
            "layers": len(self.modules),
            "unet_layers": len(self.modules) - len(te),
            "text_encoder_layers": len(te),
            "layers_by_part": self.layers_by_part,
            "memory_bytes": self.nbytes,
            "sha256": self.sha256,
            **({"source": self.source} if show_source else {}),
        }


class LoraRegistry:
    """The adapters loaded into one UNet, the fused one, and the per-row scales of the next forward."""

    def __init__(
        self,
        unet: nn.Module,
        device: torch.device | str,
        dtype: torch.dtype,
        memory_limit_bytes: int | None = None,
        pristine_device: torch.device | str = "cpu",
        text_encoders: dict[str, nn.Module] | None = None,
    ):
        self.unet = unet
        self.text_encoders = dict(text_encoders or {})  # {"text_encoder": ..., "text_encoder_2": ...}
        self.te_ctx = LoraContext()
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_limit_bytes = memory_limit_bytes
        self.pristine_device = torch.device(pristine_device)
        self.ctx = LoraContext()
        self.adapters: dict[str, Adapter] = {}
        self.fused: tuple[str, float] | None = None
        self.lock = threading.RLock()  # loads/unloads vs. the step loop
        self._layers: dict[str, _LoraLayer] = {}
        # Rows whose residual is 0 skip an adapter's branch when at most this share of the batch needs it
        # (SPO_LORA_ROW_SUBSET; 0: never. Eager only: each subset size would be a new compiled graph).
        self.row_subset_share = 0.0
        # SPO_QUANT: re-quantizes a Linear whose float weight was just restored (unfuse); None: not quantized
        self.requantize: Callable[[nn.Module], None] | None = None

    # -- loading -----------------------------------------------------------------------------

    def specs(self):
        return module_specs_of(self.unet, self.text_encoders)

    def read(self, path: str | Path) -> LoraFile:
        return read_lora_file(path, self.specs(), unet_config=self.unet.config)

    def load(self, name: str, lora: LoraFile, source: str | None = None, replace: bool = False) -> Adapter:
        """Load `lora` as adapter `name`; refused if the name is taken (unless replace) or over the cap."""
        with self.lock:
            if name in self.adapters and not replace:
                raise LoraFormatError(f"adapter: {name!r} is already loaded; unload it first")
            nbytes = sum((m.down.numel() + m.up.numel()) * _itemsize(self.dtype) for m in lora.modules.values())
            used = sum(a.nbytes for n, a in self.adapters.items() if n != name)
            if self.memory_limit_bytes is not None and used + nbytes > self.memory_limit_bytes:
                raise AdapterMemoryError(
                    f"adapter: loading {name!r} needs {nbytes / 2**20:.1f} MiB; {used / 2**20:.1f} MiB of the "
                    f"{self.memory_limit_bytes / 2**20:.1f} MiB cap (SPO_ADAPTER_MEMORY_MB) is in use"
                )
            if name in self.adapters:
                self.unload(name)
            for module, w in lora.modules.items():
                layer = self._wrap(module)
                down = w.down.to(self.device, self.dtype)
                up = (w.up.float() * w.scale).to(self.device, self.dtype)  # fold alpha / r into up
                layer.adapters[name] = (down, up)
            adapter = Adapter(
                name=name,
                layout=lora.layout,
                rank=lora.rank,
                targets=lora.targets,
                modules=sorted(lora.modules),
                nbytes=nbytes,
                sha256=lora.sha256,
                source=source or (str(lora.path) if lora.path else "built-in"),
            )
            self.adapters[name] = adapter
            return adapter

    def unload(self, name: str) -> None:
        """Remove adapter `name` and free its tensors (unfusing it first if fused)."""
        with self.lock:
            adapter = self.get(name)
            if self.fused and self.fused[0] == name:
                self.unfuse()
            for module in adapter.modules:
                self._layers[module].adapters.pop(name, None)
            del self.adapters[name]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def get(self, name: str) -> Adapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise AdapterNotFoundError(name, list(self.adapters)) from None

    def module_weights(self, name: str) -> dict[str, LoraModuleWeights]:
        """Adapter `name` as format-level weights on the CPU (alpha folded in: alpha = rank). Copies:
        later changes to the adapter (a training step) do not reach them."""
        out = {}
        for module, down, up in self.tensors(name):
            out[module] = LoraModuleWeights(module, down.detach().to("cpu", copy=True), up.detach().to("cpu", copy=True),
                                            float(down.shape[0]))
        return out

    def tensors(self, name: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, down, up) of adapter `name`, in module order; `up` has alpha / rank folded in.
        The live tensors (parameters once `make_trainable`): the branch uses them as they are."""
        for module in self.get(name).modules:
            down, up = self._layers[module].adapters[name]
            yield module, down, up

    def make_trainable(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Turn adapter `name` into float32 parameters, {module: (down, up)}; the layers' branches then
        carry gradients to them. `up` has alpha / rank folded in."""
        out: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        with self.lock:
            for module in self.get(name).modules:
                layer = self._layers[module]
                down, up = layer.adapters[name]
                out[module] = (nn.Parameter(down.detach().float().clone()), nn.Parameter(up.detach().float().clone()))
                layer.adapters[name] = out[module]
        return out

    def _wrap(self, module: str) -> _LoraLayer:
        if module in self._layers:
            return self._layers[module]
        root, ctx, path = self.unet, self.ctx, module
        if is_text_encoder_module(module):
            prefix, _, path = module.partition(".")
            root, ctx = self.text_encoders[prefix], self.te_ctx
        parent_name, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        base = getattr(parent, child)
        cls = LoraConv2d if isinstance(base, nn.Conv2d) else LoraLinear
        layer = cls(base, ctx)
        setattr(parent, child, layer)
        self._layers[module] = layer
        return layer

    # -- fusing ------------------------------------------------------------------------------

    def fuse(self, name: str, scale: float) -> float:
        """Fuse adapter `name` at `scale` (replacing any fused adapter). Returns seconds taken."""
        t0 = time.perf_counter()
        with self.lock:
            adapter = self.get(name)
            self.unfuse()
            if scale != 0.0:
                for module in adapter.unet_modules:  # text-encoder layers are never fused
                    layer = self._layers[module]
                    w = layer.base_layer.weight
                    if _quantized(w):
                        raise LoraFormatError(f"adapter: {name!r} cannot be fused into quantized (SPO_QUANT) weights; "
                                              "the default adapter is fused at load, before quantizing")
                    layer.pristine = w.detach().to(self.pristine_device, copy=True)
                    fused = layer.pristine.to(w.device, torch.float32) + scale * layer.delta(name)
                    w.data.copy_(fused.to(w.dtype))
                self.fused = (name, float(scale))
        return time.perf_counter() - t0

    def unfuse(self) -> None:
        """Restore every fused layer's pristine weight, bit for bit."""
        with self.lock:
            for layer in self._layers.values():
                if layer.pristine is None:
                    continue
                base = layer.base_layer
                if _quantized(base.weight):  # SPO_QUANT: restore the float weight, then quantize it again
                    base.weight = nn.Parameter(layer.pristine.to(base.weight.device), requires_grad=False)
                    self.requantize(base)
                else:
                    base.weight.data.copy_(layer.pristine.to(base.weight.device))
                layer.pristine = None
            self.fused = None

    # -- per-row scales ----------------------------------------------------------------------

    @contextlib.contextmanager
    def row_scales(self, rows: list[dict[str, float]]) -> Iterator[dict[str, torch.Tensor]]:
        """`with registry.row_scales(rows):` the UNet calls inside run with these LoRA scales, one
        {adapter: scale} dict per UNet batch row (CFG rows included); on exit the scales that were
        in force before are back. Yields the per-adapter residual scales (adapters whose branch runs).

        Backward after the block is safe with gradient checkpointing enabled through
        `enable_gradient_checkpointing`: its recomputation re-enters the scales of the forward."""
        residuals = self._residuals(rows)
        terms = {n: torch.tensor(r, dtype=self.dtype, device=self.device) for n, r in residuals.items()}
        prev = self.ctx.terms, self.ctx.rows
        self.ctx.terms, self.ctx.rows = terms, self._row_subsets(residuals)
        try:
            yield terms
        finally:
            self.ctx.terms, self.ctx.rows = prev

    @contextlib.contextmanager
    def text_scales(self, rows: list[dict[str, float]]) -> Iterator[dict[str, torch.Tensor]]:
        """`with registry.text_scales(rows):` the text-encoder calls inside run each adapter's text-encoder
        layers at these scales, one {adapter: scale} dict per encoded prompt (no fused residual)."""
        for row in rows:
            for name in row:
                if name not in self.adapters:
                    raise AdapterNotFoundError(name, list(self.adapters))
        names = sorted({n for row in rows for n, v in row.items() if v != 0.0 and self.adapters[n].has_text_encoder})
        terms = {n: torch.tensor([row.get(n, 0.0) for row in rows], dtype=self.dtype, device=self.device) for n in names}
        prev = self.te_ctx.terms
        self.te_ctx.terms = terms
        try:
            yield terms
        finally:
            self.te_ctx.terms = prev

    def _residuals(self, rows: list[dict[str, float]]) -> dict[str, list[float]]:
        """{adapter: each row's scale minus the fused scale}, for adapters with a non-zero residual somewhere."""
        for row in rows:
            for name in row:
                if name not in self.adapters:
                    raise AdapterNotFoundError(name, list(self.adapters))
        fused_name, fused_scale = self.fused or (None, 0.0)
        names = {n for row in rows for n in row} | ({fused_name} if fused_name else set())
        terms = {}
        for name in sorted(names):
            base = fused_scale if name == fused_name else 0.0
            residual = [row.get(name, 0.0) - base for row in rows]
            if any(r != 0.0 for r in residual):
                terms[name] = residual
        return terms

    def _row_subsets(self, residuals: dict[str, list[float]]) -> dict[str, torch.Tensor]:
        """{adapter: indices of the rows with a non-zero residual}, for adapters where they are at most
        `row_subset_share` of the batch (the others run the branch on every row)."""
        out = {}
        for name, r in residuals.items():
            idx = [i for i, v in enumerate(r) if v != 0.0]
            if len(idx) < len(r) and len(idx) <= self.row_subset_share * len(r):
                out[name] = torch.tensor(idx, dtype=torch.long, device=self.device)
        return out

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's blocks (recompute their forward in backward, to save activation
        memory) with the per-row scales in force during the original forward: a block's recomputation
        re-enters the scales it first ran with, so backward may run after `row_scales` has exited."""
        ctx = self.ctx

        def checkpoint(module, *args, **kwargs):
            terms = ctx.terms  # this forward's scales; row_scales replaces the dict, never mutates it

            def run(*a, **k):
                prev = ctx.terms
                ctx.terms = terms
                try:
                    return module(*a, **k)
                finally:
                    ctx.terms = prev

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        self.unet.enable_gradient_checkpointing(checkpoint)

    def in_use(self, name: str, running: list[dict[str, float]]) -> None:
        """Raise AdapterInUseError if any running row uses `name`."""
        n = sum(1 for row in running if row.get(name, 0.0) != 0.0)
        if n:
            raise AdapterInUseError(f"adapter: {name!r} is used by {n} running request(s)")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.values())


def _quantized(w: torch.Tensor) -> bool:
    """A weight replaced by a tensor subclass (torchao's float8 tensors)."""
    return type(w) not in (torch.Tensor, nn.Parameter)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
