"""A LoRA state dict under the names diffusers' `StableDiffusionXLPipeline.load_lora_weights` gives its
tensors, reached through the same diffusers functions in the same order (`to_diffusers_names`), each tensor
followed by identity back to its key in the file; and the kohya/webui and diffusers-name checks made before.
`format` validates the result against the model and builds the per-module weights."""

from __future__ import annotations

from typing import Collection

import torch

from spo_runtime.errors import LoraFormatError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")


def fail(problem: str, problems: list[tuple[str, str]]) -> None:
    """Raise one LoraFormatError listing every (key, detail) pair."""
    if not problems:
        return
    keys = [k for k, _ in problems]
    lines = [f"{k}: {detail}" for k, detail in problems[:10]]
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise LoraFormatError(f"{problem}: " + "; ".join(lines) + more, keys=keys)


_KOHYA_PARTS = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
                ("lora_te2_", "text_encoder_2"))


def _kohya_part(name: str) -> str:
    return next(part for prefix, part in _KOHYA_PARTS if name.startswith(prefix))


def _kohya_groups(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """{kohya module name: {role: key}}; every key must be `<name>.lora_down.weight/lora_up.weight/alpha`.
    Within one part (UNet, each text encoder) every module has its `.alpha` or none has: without alphas,
    diffusers and kohya agree on alpha = rank; a module without one among modules with theirs is given the
    part's most common alpha by diffusers but its rank by kohya, so we refuse it as ambiguous."""
    groups: dict[str, dict[str, str]] = {}
    problems = []
    for key in state_dict:
        name, _, suffix = key.partition(".")
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if role is None:
            problems.append((key, "does not fit the webui layout (<name>.lora_down.weight / lora_up.weight / alpha)"))
        else:
            groups.setdefault(name, {})[role] = key
    fail("LoRA keys do not match the webui layout", problems)
    for name, roles in groups.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            problems += [(k, f"module {name!r} has no {missing} weight") for k in roles.values()]
    fail("incomplete LoRA modules", problems)
    by_part: dict[str, list[str]] = {}
    for name in groups:
        by_part.setdefault(_kohya_part(name), []).append(name)
    for part, names in by_part.items():
        with_alpha = sum("alpha" in groups[n] for n in names)
        if 0 < with_alpha < len(names):
            problems += [(groups[n]["down"], f"module {n!r} lacks its {n + '.alpha'!r} key while {with_alpha} other "
                          f"module(s) of the {part} have theirs (kohya would use its rank, diffusers the most common "
                          "alpha: ambiguous)") for n in names if "alpha" not in groups[n]]
    fail("incomplete LoRA modules", problems)
    sgm = [roles["down"] for name, roles in groups.items() if name.startswith("lora_unet_") and
           name.removeprefix("lora_unet_").startswith(SGM_BLOCKS)]
    plain = [roles["down"] for name, roles in groups.items() if name.startswith("lora_unet_") and
             name.removeprefix("lora_unet_").startswith(("down_blocks_", "mid_block_", "up_blocks_"))]
    if sgm and plain:  # diffusers' converter would drop the SGM-named half without a word
        fail("mixed block names (SGM input_blocks/middle_block/output_blocks and diffusers down_blocks/mid_block/"
              "up_blocks) in one file", [(k, "SGM block name in a file that also has diffusers block names") for k in sgm])
    return groups


_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


def _diffusers_alphas(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{`<module>.alpha` key: its module's down key} of a file with diffusers/PEFT names. diffusers itself
    refuses such keys (its LoRA keys must all contain 'lora'); we read them, as PEFT-style trainers write them."""
    alphas, problems = {}, []
    for key in state_dict:
        if not key.endswith(".alpha"):
            continue
        base = key.removesuffix(".alpha")
        down = next((base + s for s in _DOWN_SUFFIXES if base + s in state_dict), None)
        if down is None:
            problems.append((key, f"module {base!r} has no down weight"))
        else:
            alphas[key] = down
    fail("incomplete LoRA modules", problems)
    return alphas


def _convert(fn, items: dict[str, tuple[str, torch.Tensor]], what: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Apply a diffusers converter to {key: tensor} and follow each tensor by identity back to its file key.
    A tensor the converter drops or overwrites is an error naming its key; so is the converter's own refusal."""
    by_id = {id(t): src for src, t in items.values()}
    try:
        out = fn({k: t for k, (_, t) in items.items()})
    except Exception as e:  # diffusers raises ValueError/KeyError, with the offending names in the message or not
        named = [src for src, _ in items.values() if src in str(e)]
        keys = named or [src for src, _ in items.values()]
        where = "" if named else f"; first of its keys: {keys[0]!r}"
        raise LoraFormatError(f"diffusers' {what} refused the file ({type(e).__name__}: {e}){where} "
                              "(StableDiffusionXLPipeline.load_lora_weights refuses it the same way)", keys=keys) from e
    result = {}
    for k, t in out.items():
        src = by_id.get(id(t))
        if src is None:
            raise LoraFormatError(f"diffusers' {what} changed the tensor of {k!r}: only renaming is supported", keys=[k])
        result[k] = (src, t)
    seen = {src for src, _ in result.values()}
    lost = [src for src, _ in items.values() if src not in seen]
    fail(f"diffusers' {what} dropped or overwrote keys", [(k, "has no place in the converted LoRA") for k in lost])
    return result


def to_diffusers_names(
    state_dict: dict[str, torch.Tensor], layout: str, modules: Collection[str], unet_config
) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, str]]:
    """The file's weights under the names diffusers' `StableDiffusionXLPipeline.load_lora_weights` hands to peft,
    reached by the same diffusers functions in the same order: ({name: (file key, tensor)}, {alpha key: down key}).

    1. `lora_state_dict` (kohya/webui and SGM names -> diffusers names; other files as they are);
    2. UNet part, as `UNet2DConditionModel.load_lora_adapter`: `convert_unet_state_dict_to_peft` unless the
       part's first key already holds `lora_A`;
    3. each text-encoder part, as `_load_lora_into_text_encoder`: `convert_state_dict_to_diffusers`, then
       `convert_state_dict_to_peft`, then `text_model.` dropped when the encoder has no `text_model` submodule
       (recent transformers' flattened CLIPTextModel; in `modules`, the model's layer names as
       `module_specs_of` gives them: no layer of the encoder lies under it).
    peft then matches these names to modules exactly, as `format.parse_lora_state_dict` does."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    tensors = dict(state_dict)
    seen: set[int] = set()
    for k, t in tensors.items():  # identity tracking needs one object per key
        if id(t) in seen:
            tensors[k] = t.view(t.shape)
        seen.add(id(t))
    if layout == "webui":
        groups = _kohya_groups(tensors)
        alphas = {roles["alpha"]: roles["down"] for roles in groups.values() if "alpha" in roles}
        if unet_config is None and any(n.removeprefix("lora_unet_").startswith(SGM_BLOCKS) for n in groups):
            raise LoraFormatError("SGM block names need the UNet's config to be mapped",
                                  keys=[next(r["down"] for n, r in groups.items() if n.removeprefix("lora_unet_").startswith(SGM_BLOCKS))])
        weights = {k: (k, t) for k, t in tensors.items() if k not in alphas}
        # diffusers reads alphas as numbers (network_alphas); we take them from the file by kohya name
        converted = _convert(
            lambda sd: Loader.lora_state_dict({**sd, **{a: tensors[a] for a in alphas}}, unet_config=unet_config)[0],
            weights, "converter (StableDiffusionXLPipeline.lora_state_dict)")
    else:
        alphas = _diffusers_alphas(tensors)
        converted = _convert(lambda sd: Loader.lora_state_dict(sd, unet_config=unet_config)[0],
                             {k: (k, t) for k, t in tensors.items() if k not in alphas}, "lora_state_dict")
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for prefix in ("unet",) + TEXT_ENCODERS:
        part = {k.removeprefix(prefix + "."): v for k, v in converted.items() if k.split(".", 1)[0] == prefix}
        if not part:
            continue
        if prefix == "unet":
            peft_names = [v[0] for k, v in part.items() if ".lora_A." in k or ".lora_B." in k]
            if peft_names and len(peft_names) < len(part):
                # diffusers picks one renaming by the first key, so which keys it then refuses depends on the
                # file's key order; name both kinds, whatever the order
                others = [v[0] for k, v in part.items() if not (".lora_A." in k or ".lora_B." in k)]
                fail("LoRA keys do not match the UNet",
                     [(k, "a peft name (lora_A/lora_B) in a file that also holds older diffusers names")
                      for k in peft_names] +
                     [(k, "an older diffusers name in a file that also holds peft names (lora_A/lora_B)")
                      for k in others])
            if "lora_A" in next(iter(part)):
                renamed = part
            else:  # key by key, so that two keys landing on one name are both named
                renamed = {}
                for k, v in part.items():
                    for new, item in _convert(convert_unet_state_dict_to_peft, {k: v}, "UNet renaming").items():
                        if new in renamed:
                            fail("LoRA keys do not match the UNet", [(renamed[new][0], f"{new!r} given twice"),
                                                                      (item[0], f"{new!r} given twice")])
                        renamed[new] = item
        else:
            renamed = _convert(lambda sd: convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd)), part,
                               f"{prefix} renaming (convert_state_dict_to_diffusers, convert_state_dict_to_peft)")
            if not any(m.startswith(f"{prefix}.text_model.") for m in modules):
                renamed = _convert(lambda sd: {k.removeprefix("text_model."): t for k, t in sd.items()}, renamed,
                                   f"{prefix} renaming (text_model. prefix of a flattened CLIPTextModel)")
        out.update({f"{prefix}.{k}": v for k, v in renamed.items()})
    return out, alphas
