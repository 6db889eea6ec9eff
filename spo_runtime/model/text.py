"""Prompts to SDXL's text conditioning: both CLIP encoders in one batched call each over every text not yet
cached, and an LRU cache of the embeddings (SPO_EMBED_CACHE). A text is cached on its own, or, when the
row's adapter has text-encoder layers and a non-zero scale, together with that adapter's name, sha256 and scale.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.requests import ActiveRequest


@dataclass
class _Embedding:
    hidden: torch.Tensor  # (1, 77, D1 + D2)
    pooled: torch.Tensor  # (1, P)
    truncated: bool


class PromptEncoder:
    """Prompt (and, with CFG, negative prompt) embeddings for rows, through both text encoders."""

    def __init__(self, tokenizers: list, text_encoders: list[torch.nn.Module], registry: LoraRegistry,
                 device: torch.device, dtype: torch.dtype, cache_size: int, force_zeros_for_empty_prompt: bool = True):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.cache_size = cache_size  # 0: nothing is kept
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        # prompt -> embedding; with an adapter's text-encoder layers: (prompt, adapter, sha256, scale) -> embedding
        self._cache: OrderedDict[str | tuple, _Embedding] = OrderedDict()

    @property
    def dims(self) -> tuple[int, int]:
        """(D, P): the width of the concatenated hidden states and of the pooled embedding."""
        first, second = (e.config for e in self.text_encoders)
        return first.hidden_size + second.hidden_size, second.projection_dim

    def forget(self, adapter: str) -> None:
        """Drop cached prompt embeddings computed with `adapter`'s text-encoder layers."""
        for key in [k for k in list(self._cache) if isinstance(k, tuple) and k[1] == adapter]:
            self._cache.pop(key, None)

    @torch.inference_mode()
    def encode(self, states: list[ActiveRequest]) -> None:
        """Attach prompt (and, with CFG, negative) embeddings to each state. An adapter's text-encoder
        layers run at the row's LoRA scale (as diffusers' `set_adapters` scales them); one batched call
        per encoder covers every uncached (prompt, adapter, scale)."""
        t0 = time.perf_counter()
        keys = []
        for s in states:
            keys.append(self._text_key(s.request.prompt, s))
            if s.cfg and not (s.request.negative_prompt is None and self.force_zeros_for_empty_prompt):
                keys.append(self._text_key(s.request.negative_prompt or "", s))
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        fresh = {}
        if missing:
            texts = [k if isinstance(k, str) else k[0] for k in missing]
            if all(isinstance(k, str) for k in missing):
                fresh = dict(zip(missing, self._encode_texts(texts)))
            else:
                rows = [{} if isinstance(k, str) else {k[1]: k[3]} for k in missing]
                fresh = dict(zip(missing, self._encode_texts(texts, rows)))
        for s in states:
            e = self._lookup(self._text_key(s.request.prompt, s), fresh)
            s.prompt_embeds, s.pooled, s.prompt_truncated = e.hidden, e.pooled, e.truncated
            if s.cfg:
                if s.request.negative_prompt is None and self.force_zeros_for_empty_prompt:
                    s.negative_embeds, s.negative_pooled = torch.zeros_like(e.hidden), torch.zeros_like(e.pooled)
                else:
                    n = self._lookup(self._text_key(s.request.negative_prompt or "", s), fresh)
                    s.negative_embeds, s.negative_pooled = n.hidden, n.pooled
        ms = (time.perf_counter() - t0) * 1e3
        for s in states:
            s.timings["encode_ms"] = ms

    def _text_key(self, text: str, s: ActiveRequest) -> str | tuple:
        """Cache key of `text` encoded for row `s`: the text alone, or with the adapter (name, sha256) and
        scale when the row's adapter has text-encoder layers and a non-zero scale."""
        a = s.adapter
        if a is None or s.lora_scale == 0.0 or not self.registry.get(a).has_text_encoder:
            return text
        return (text, a, self.registry.get(a).sha256, float(s.lora_scale))

    def _lookup(self, key: str | tuple, fresh: dict) -> _Embedding:
        e = fresh.get(key) or self._cache[key]
        if self.cache_size:
            self._cache[key] = e
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return e

    def _encode_texts(self, texts: list[str], rows: list[dict[str, float]] | None = None) -> list[_Embedding]:
        """Both CLIP encoders over `texts` in one call each; penultimate hidden states, concatenated,
        and the second encoder's projected pooled output (as diffusers' SDXL pipeline). `rows`: each
        text's {adapter: scale} for the adapters' text-encoder layers (absent: none)."""
        hidden, truncated, pooled = [], [False] * len(texts), None
        with self.registry.text_scales(rows or [{} for _ in texts]):
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
                full = tok(texts, padding=False, truncation=False).input_ids
                truncated = [t or len(f) > tok.model_max_length for t, f in zip(truncated, full)]
                out = enc(ids.to(self.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
        h = torch.cat(hidden, dim=-1).to(self.dtype)
        pooled = pooled.to(self.dtype)
        return [_Embedding(h[i : i + 1], pooled[i : i + 1], truncated[i]) for i in range(len(texts))]
