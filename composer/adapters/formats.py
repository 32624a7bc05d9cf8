"""LoRA state-dict formats -> canonical ``{module path: LayerDelta}``.

Key renaming is delegated to diffusers' own converters (``lora_conversion_utils`` and
``state_dict_utils``) so that a file means here exactly what it means to ``load_lora_weights``.
What this module adds: grouping keys per layer, alphas (``.alpha`` tensors, the
``lora_adapter_metadata`` header diffusers writes, or ``alpha = rank``), validation, the LyCORIS and
PEFT kinds beyond ``(down, up)`` (LoHa, LoKr, Tucker LoCon, full/diff, DoRA, IA3, OFT, BOFT: see
:mod:`.kinds`, one file per kind), and clear refusals for what we do not load yet (LyCORIS ``oft_diag``, PEFT
OFT from before 0.14).

Canonical keys: ``<component>.<module path>`` with components ``unet``, ``text_encoder``,
``text_encoder_2`` and ``transformer``. Text-encoder keys never carry CLIP's ``text_model.``
level (transformers 5's ``CLIPTextModel`` has none; ``CLIPTextModelWithProjection`` still has
it): use :func:`resolve_module` to find the module in a pipeline.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kinds
from .kinds import NOT_LOADED, KindError, PeftLayer
from .types import LayerDelta

from ..errors import ComposerError
from .flux_layouts import KOHYA_FLUX_LAYERS, ONETRAINER_PREFIX, bfl_to_kohya, onetrainer_to_diffusers
from ..vocab import COMPONENTS
from ..vocab import TEXT_ENCODERS as TEXT_COMPONENTS

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# Key fragments of formats we recognise but do not load yet: (fragment, what it is).
_UNSUPPORTED = NOT_LOADED

_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding")
_DIFFUSERS_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",  # PEFT
    ".lora.down.weight",
    ".lora.up.weight",  # older diffusers (LoCon, generic layers)
    "_lora.down.weight",
    "_lora.up.weight",  # older diffusers attention processors (to_q_lora...)
    ".lora_linear_layer.down.weight",
    ".lora_linear_layer.up.weight",  # older diffusers text encoders
    ".alpha",
)


class FormatError(ComposerError, ValueError):
    """The state dict is not a LoRA we can load; the message is the one-line cause."""


@dataclass
class _UNetConfig:
    """What ``_maybe_map_sgm_blocks_to_diffusers`` reads from a UNet config (SD1.5/SD2/SDXL all use 2)."""

    layers_per_block: int = 2


def strip_text_model(key: str) -> str:
    """``text_encoder.text_model.encoder...`` -> ``text_encoder.encoder...`` (other keys unchanged)."""
    comp, _, rest = key.partition(".")
    if comp in TEXT_COMPONENTS and rest.startswith("text_model."):
        return f"{comp}.{rest[len('text_model.') :]}"
    return key


def resolve_module(root: torch.nn.Module, key: str) -> torch.nn.Module:
    """The module a canonical key names inside ``root`` (a pipeline or anything with the components as
    attributes), adding CLIP's ``text_model.`` level where the text encoder has one."""
    comp, _, rest = key.partition(".")
    component = getattr(root, comp, None)
    if component is None:
        raise KeyError(f"{key}: no component {comp!r}")
    if comp in TEXT_COMPONENTS and hasattr(component, "text_model") and not rest.startswith("text_model."):
        rest = "text_model." + rest
    return component.get_submodule(rest)


# ----------------------------------------------------------------------------------------------- detection


def _example(keys) -> str:
    keys = list(keys)
    return keys[0] if keys else "<none>"


def detect_format(keys) -> str:
    """``"kohya"``, ``"kohya-flux"``, ``"bfl-flux"``, ``"onetrainer-flux"``, ``"xlabs-flux"`` or ``"diffusers"``;
    raises :class:`FormatError` otherwise."""
    keys = list(keys)
    if not keys:
        raise FormatError("no tensors in file")
    for fragment, what in _UNSUPPORTED:
        hit = [k for k in keys if fragment in k]
        if hit:
            raise FormatError(f"{what} adapters are not supported yet (key {hit[0]!r})")
    if bfl_to_kohya(keys) is not None:  # before XLabs: both start with double_blocks / single_blocks
        return "bfl-flux"
    if any(k.startswith(ONETRAINER_PREFIX) for k in keys) and all(
        k.startswith((ONETRAINER_PREFIX, *KOHYA_PREFIXES[1:])) for k in keys
    ):
        return "onetrainer-flux"
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        known = kinds.kohya_suffixes()
        odd = [k for k in keys if not k.split(".", 1)[-1] in known or "." not in k]
        if odd:
            raise FormatError(f"unknown key format (key {odd[0]!r})")
        if any("double_blocks" in k or "single_blocks" in k or k.startswith(KOHYA_FLUX_LAYERS) for k in keys):
            return "kohya-flux"
        return "kohya"
    if all(k.removeprefix("diffusion_model.").startswith(("double_blocks.", "single_blocks.")) for k in keys):
        return "xlabs-flux"
    if all(k.split(".", 1)[0] in _UNET_ROOTS and k.endswith(_DIFFUSERS_SUFFIXES) for k in keys):
        return "unet-no-prefix"  # UNet2DConditionModel.save_attn_procs: the UNet's keys without "unet."
    ends = _DIFFUSERS_SUFFIXES + tuple("." + s for s in kinds.peft_suffixes())
    diffusers_like = [k for k in keys if k.split(".", 1)[0] in COMPONENTS and k.endswith(ends)]
    if len(diffusers_like) == len(keys):
        return "diffusers"
    odd = [k for k in keys if k not in set(diffusers_like)]
    raise FormatError(f"unknown key format (key {odd[0]!r})")


# ----------------------------------------------------------------------------------------------- parsing


def parse_state_dict(state_dict: dict[str, torch.Tensor], header: dict[str, str] | None = None):
    """Canonical deltas and source format (``"diffusers"``, ``"kohya"``, ``"bfl"``, ``"onetrainer"`` or
    ``"xlabs"``) of a LoRA state dict.

    Pure: ``state_dict`` is not modified. Raises :class:`FormatError` with a one-line cause.
    """
    header = header or {}
    fmt = detect_format(state_dict.keys())
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"value of {k!r} is not a tensor")
    if fmt == "kohya":
        return _parse_kohya(state_dict), "kohya"
    if fmt == "kohya-flux":
        return _parse_kohya_flux(state_dict), "kohya"
    if fmt == "unet-no-prefix":
        return _parse_diffusers({f"unet.{k}": v for k, v in state_dict.items()}, header), "diffusers"
    if fmt == "bfl-flux":
        names = bfl_to_kohya(state_dict)
        return _parse_kohya_flux({names[k]: v for k, v in state_dict.items()}), "bfl"
    if fmt == "onetrainer-flux":
        return _parse_onetrainer_flux(state_dict), "onetrainer"
    if fmt == "xlabs-flux":
        return _parse_xlabs_flux(state_dict), "xlabs"
    return _parse_diffusers(state_dict, header), "diffusers"


def _pair(name: str, down, up, alpha) -> LayerDelta:
    """Validate one layer's factors and build its delta."""
    if down is None or up is None:
        missing = "up" if up is None else "down"
        raise FormatError(f"layer {name} has no {missing} weight")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise FormatError(f"layer {name}: unexpected shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
    if down.shape[0] != up.shape[1]:
        raise FormatError(f"layer {name}: rank mismatch, down has rank {down.shape[0]} but up expects {up.shape[1]}")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise FormatError(f"layer {name}: up weight {tuple(up.shape)} is not a 1x1 convolution")
    rank = int(down.shape[0])
    if rank == 0:
        raise FormatError(f"layer {name} has rank 0")
    return LayerDelta(down=down, up=up, alpha=float(rank if alpha is None else alpha))


def _alpha_value(name: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise FormatError(f"layer {name}: alpha is not a scalar (shape {tuple(t.shape)})")
    value = float(t.float().item())
    if not math.isfinite(value):
        raise FormatError(f"layer {name}: alpha is {value}")
    return value


def _to_peft_keys(component: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename component-relative keys to PEFT's ``<module>.lora_A.weight``/``lora_B.weight`` with diffusers'
    converters (the same calls ``load_lora_weights`` makes for that component)."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component in TEXT_COMPONENTS:
        sd = convert_state_dict_to_diffusers(sd, original_type=StateDictType.DIFFUSERS_OLD)
        sd = convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS)
    else:
        sd = convert_unet_state_dict_to_peft(sd)
    out = {}
    for k, v in sd.items():
        # Generic old-diffusers LoCon spelling that the text-encoder mappings leave alone.
        k = k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")
        out[k] = v
    return out


def _collect(component: str, peft_sd: dict[str, torch.Tensor], origin: dict[str, str]):
    """``{canonical module: (down, up)}`` from PEFT keys of one component."""
    layers: dict[str, list] = {}
    for k, v in peft_sd.items():
        if k.endswith(".lora_A.weight"):
            module, slot = k[: -len(".lora_A.weight")], 0
        elif k.endswith(".lora_B.weight"):
            module, slot = k[: -len(".lora_B.weight")], 1
        else:
            raise FormatError(f"unknown key format (key {origin.get(k, k)!r})")
        canonical = strip_text_model(f"{component}.{module}")
        layers.setdefault(canonical, [None, None])[slot] = v
    return layers


def _parse_kohya(state_dict):
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sd = dict(state_dict)
    if any(p in k for k in sd for p in ("input_blocks", "middle_block", "output_blocks")):
        # SDXL kohya files name UNet blocks the sgm/LDM way (input_blocks_4_1_...).
        try:
            sd = _maybe_map_sgm_blocks_to_diffusers(sd, _UNetConfig())
        except (ValueError, IndexError, KeyError) as e:
            raise FormatError(f"cannot map sgm UNet block names: {e}") from None

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        groups.setdefault(name, {})[suffix] = v

    deltas: dict[str, LayerDelta] = {}
    for lora_name, parts in groups.items():
        if not set(parts) <= set(_KOHYA_SUFFIXES):  # a LyCORIS kind: LoHa, LoKr, Tucker LoCon, DoRA, IA3, full
            alpha = _alpha_value(lora_name, parts["alpha"]) if "alpha" in parts else None
            try:
                delta = kinds.kohya_delta(lora_name, parts, alpha)
            except KindError as e:
                raise FormatError(str(e)) from None
            module = _kohya_module(lora_name)
            if module in deltas:
                raise FormatError(f"layer {module} appears twice (key {lora_name!r})")
            deltas[module] = delta
            continue
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            _pair(lora_name, down, up, None)  # raises with the missing half
        alpha = _alpha_value(lora_name, parts["alpha"]) if "alpha" in parts else None
        one = {f"{lora_name}.lora_down.weight": down, f"{lora_name}.lora_up.weight": up}
        try:
            converted, _ = _convert_non_diffusers_lora_to_diffusers(one)
        except (ValueError, KeyError) as e:
            raise FormatError(f"unknown key format (key {lora_name!r}): {e}") from None
        for component in COMPONENTS:
            sub = {k[len(component) + 1 :]: v for k, v in converted.items() if k.split(".", 1)[0] == component}
            if not sub:
                continue
            layers = _collect(component, _to_peft_keys(component, sub), {})
            for module, (d, u) in layers.items():
                if module in deltas:
                    raise FormatError(f"layer {module} appears twice (key {lora_name!r})")
                deltas[module] = _pair(module, d, u, alpha)
    return deltas


def _kohya_module(lora_name: str) -> str:
    """Canonical module of a kohya layer name, by the same converters a LoRA pair goes through."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    probe = torch.zeros(1, 1)
    one = {f"{lora_name}.lora_down.weight": probe, f"{lora_name}.lora_up.weight": probe}
    try:
        converted, _ = _convert_non_diffusers_lora_to_diffusers(one)
    except (ValueError, KeyError) as e:
        raise FormatError(f"unknown key format (key {lora_name!r}): {e}") from None
    modules = []
    for component in COMPONENTS:
        sub = {k[len(component) + 1 :]: v for k, v in converted.items() if k.split(".", 1)[0] == component}
        if sub:
            modules += list(_collect(component, _to_peft_keys(component, sub), {}))
    if len(modules) != 1:
        raise FormatError(f"unknown key format (key {lora_name!r})")
    comp, _, rel = modules[0].partition(".")
    if comp in TEXT_COMPONENTS:  # CLIP's norms (LyCORIS norm layers), which diffusers' names never reach
        rel = rel.replace(".layer.norm", ".layer_norm").replace("final.layer.norm", "final_layer_norm")
    return f"{comp}.{rel}"


def _parse_kohya_flux(state_dict):
    """Kohya FLUX.1: diffusers' converter for what it gets right, :mod:`.flux` for the rest (its docstring)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from . import flux

    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for k, v in state_dict.items():
        name, _, suffix = k.partition(".")
        groups[name][suffix] = v
    for name, parts in groups.items():
        odd = sorted(set(parts) - set(_KOHYA_SUFFIXES))
        if odd:
            raise FormatError(f"LyCORIS kinds in kohya FLUX files are not supported yet (key {name}.{odd[0]})")
        _pair(name, parts.get("lora_down.weight"), parts.get("lora_up.weight"), None)
    own = {name: parts for name, parts in groups.items() if flux.is_own(name)}
    deltas = flux.own_deltas(own)
    rest = {f"{name}.{suffix}": v for name, parts in groups.items() if name not in own for suffix, v in parts.items()}
    if not rest:
        return deltas
    try:
        converted = _convert_kohya_flux_lora_to_diffusers(dict(rest))
    except Exception as e:  # noqa: BLE001 - the converter raises bare asserts and KeyErrors
        raise FormatError(f"cannot convert kohya FLUX LoRA: {type(e).__name__}: {e}") from None
    kept = 0
    for component in COMPONENTS:
        sub = {k[len(component) + 1 :]: v for k, v in converted.items() if k.split(".", 1)[0] == component}
        if not sub:
            continue
        for module, (d, u) in _collect(component, _to_peft_keys(component, sub), {}).items():
            # The converter bakes alpha / rank into the factors: alpha = rank from here on.
            deltas[module] = _pair(module, d, u, None)
            kept += 1
    # each layer gives one module, a fused q, k, v three: fewer means the converter dropped a layer
    expected = sum(3 if name.endswith("_qkv") else 1 for name in groups if name not in own)
    if kept < expected:
        dropped = [n for n in groups if n not in own and not _converts(n, groups[n])]
        raise FormatError(f"unknown key format (key {(dropped or [_example(rest)])[0]!r})")
    return deltas


def _parse_onetrainer_flux(state_dict):
    """OneTrainer FLUX files: transformer keys renamed to diffusers keys (:mod:`.flux_layouts`), text-encoder
    keys as kohya's."""
    names, bad = onetrainer_to_diffusers(state_dict, lambda k: k.startswith(KOHYA_PREFIXES[1:]))
    if bad is not None:
        raise FormatError(f"unknown key format in OneTrainer FLUX LoRA (key {bad!r})")
    deltas = _parse_diffusers({names[k]: v for k, v in state_dict.items() if k in names}, {})
    text = {k: v for k, v in state_dict.items() if k not in names}
    if text:
        deltas.update(_parse_kohya_flux(text))
    return deltas


def _parse_xlabs_flux(state_dict):
    """XLabs FLUX files (``double_blocks.N.processor.qkv_lora1.down.weight``...): diffusers' converter, which is
    right at any width (it splits fused q, k, v in three equal parts); no alphas (scale 1, as diffusers)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    odd = [k for k in state_dict if not k.endswith((".down.weight", ".up.weight")) or "_lora" not in k]
    if odd:
        raise FormatError(f"unknown key format in XLabs FLUX LoRA (key {odd[0]!r})")
    try:
        converted = _convert_xlabs_flux_lora_to_diffusers(dict(state_dict))
    except Exception as e:  # noqa: BLE001 - the converter raises bare asserts, KeyErrors and AttributeErrors
        raise FormatError(f"cannot convert XLabs FLUX LoRA: {type(e).__name__}: {e}") from None
    sub = {k[len("transformer.") :]: v for k, v in converted.items() if k.startswith("transformer.")}
    if len(sub) != len(converted) or not sub:
        raise FormatError(f"unknown key format in XLabs FLUX LoRA (key {_example(state_dict)!r})")
    return {module: _pair(module, d, u, None) for module, (d, u) in _collect("transformer", sub, {}).items()}


def _converts(name: str, parts: dict[str, torch.Tensor]) -> bool:
    """Whether diffusers' kohya FLUX converter turns layer ``name`` into anything (on its own)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    try:
        return bool(_convert_kohya_flux_lora_to_diffusers({f"{name}.{k}": v for k, v in parts.items()}))
    except Exception:  # noqa: BLE001
        return False


def _adapter_config(header: dict[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig kwargs from diffusers' ``lora_adapter_metadata`` header entry."""
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{LORA_ADAPTER_METADATA_KEY} header is not valid JSON: {e}") from None
    if not isinstance(flat, dict):
        raise FormatError(f"{LORA_ADAPTER_METADATA_KEY} header is not a JSON object")
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        if comp in COMPONENTS and field:
            out.setdefault(comp, {})[field] = v
    return out


PEFT_PREFIX = "base_model.model."
# PEFT's auto_mapping.base_model_class -> the pipeline component it adapts
_PEFT_BASE_CLASSES = {
    "UNet2DConditionModel": "unet",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
    "FluxTransformer2DModel": "transformer",
    "SD3Transformer2DModel": "transformer",
}


def peft_folder(path) -> tuple[Path, dict] | None:
    """``(adapter_model.safetensors, its adapter_config.json)`` of a folder PEFT's ``save_pretrained`` wrote, given
    the folder or that file (which is what a pipeline's ``loras=`` takes), or None when ``path`` is neither (an
    unreadable config is the caller's FormatError)."""
    p = Path(path)
    if p.name == "adapter_model.safetensors" and p.is_file():
        p = p.parent
    cfg, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not (p.is_dir() and cfg.is_file() and weights.is_file()):
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{cfg.name} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{cfg.name} is not a JSON object")
    return weights, config


def from_peft_folder(tensors: dict[str, torch.Tensor], config: dict, header: dict[str, str]):
    """A PEFT folder's tensors (``base_model.model.<module>...``) and config as this module's diffusers/PEFT
    keys and ``lora_adapter_metadata`` header: one model per folder, its component from the config's
    ``auto_mapping`` (else the keys: CLIP's are a text encoder's, anything else the UNet's)."""
    base = str((config.get("auto_mapping") or {}).get("base_model_class") or "")
    rel = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    text = all(k.startswith(("text_model.", "encoder.layers.")) for k in rel)
    comp = _PEFT_BASE_CLASSES.get(base) or ("text_encoder" if text else "unet")
    meta = {f"{comp}.{k}": v for k, v in config.items() if k not in ("auto_mapping", "base_model_name_or_path")}
    return {f"{comp}.{k}": v for k, v in rel.items()}, {**header, LORA_ADAPTER_METADATA_KEY: json.dumps(meta)}


def _config_alpha(config: dict, rel: str, rank: int) -> float | None:
    """Alpha PEFT would use for module ``rel`` under ``config`` (None: the config does not say)."""
    from peft.utils.other import get_pattern_key

    if not config:
        return None
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    for candidate in (rel, "text_model." + rel):
        key = get_pattern_key(list(pattern), candidate)
        if key in pattern:
            alpha = pattern[key]
            break
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # PEFT scales rsLoRA by alpha / sqrt(r)
    return alpha


def _alpha_module(component: str, rel: str) -> str:
    """Canonical module of a diffusers-format ``<component>.<rel>.alpha`` entry."""
    rel = rel.replace(".processor.", ".")
    for old, new in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")):
        if rel.endswith(old):
            if component in TEXT_COMPONENTS:
                new = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}[new]
            rel = rel[: -len(old)] + new
    for suffix in (".lora", ".lora_linear_layer"):
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
    return strip_text_model(f"{component}.{rel}")


def _config_value(config: dict, rel: str, field: str, pattern_field: str):
    """A per-module setting of a PEFT config (``rank_pattern``/``alpha_pattern`` first), or None."""
    from peft.utils.other import get_pattern_key

    pattern = config.get(pattern_field) or {}
    for candidate in (rel, "text_model." + rel):
        key = get_pattern_key(list(pattern), candidate)
        if key in pattern:
            return pattern[key]
    return config.get(field)


def _peft_kinds(comp: str, sub: dict[str, torch.Tensor], config: dict):
    """Deltas of one component's PEFT keys of a kind (``<module>.hada_w1_a`` ...), and the tensors of kinds that
    wrap the module's LoRA (DoRA's ``lora_magnitude_vector``), keyed by canonical module."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for rel, v in sub.items():
        module, suffix = kinds.split_peft_key(rel)
        canonical = strip_text_model(f"{comp}.{module.removeprefix('base_model.model.')}")
        layers.setdefault(canonical, {})[suffix] = v
    deltas, wrapping = {}, {}
    for module, parts in layers.items():
        rel = module.split(".", 1)[1]
        alpha = _config_value(config, rel, "alpha", "alpha_pattern") if config else None
        rank = _config_value(config, rel, "r", "rank_pattern") if config else None
        layer = PeftLayer(None if alpha is None else float(alpha), None if rank is None else int(rank), config, rel)
        own, wraps = kinds.peft_split(parts)
        try:
            if own:
                deltas[module] = kinds.peft_delta(module, own, layer)
        except KindError as e:
            raise FormatError(str(e)) from None
        if wraps:
            wrapping[module] = (wraps, layer)
    return deltas, wrapping


def _parse_diffusers(state_dict, header):
    configs = _adapter_config(header)

    per_comp: dict[str, dict[str, torch.Tensor]] = {}
    kind_keys: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for k, v in state_dict.items():
        comp, _, rel = k.partition(".")
        if k.endswith(".alpha"):
            alphas[_alpha_module(comp, rel[: -len(".alpha")])] = _alpha_value(k, v)
        elif kinds.split_peft_key(rel) is not None:
            kind_keys.setdefault(comp, {})[rel] = v
        else:
            per_comp.setdefault(comp, {})[rel] = v

    deltas: dict[str, object] = {}
    wrapping: dict[str, tuple] = {}
    for comp, sub in kind_keys.items():
        own, wraps = _peft_kinds(comp, sub, configs.get(comp, {}))
        deltas.update(own)
        wrapping.update(wraps)
    for comp, sub in per_comp.items():
        peft_sd = _to_peft_keys(comp, sub)
        for module, (d, u) in _collect(comp, peft_sd, {}).items():
            if module in deltas:
                raise FormatError(f"layer {module} holds both LoRA factors and {deltas[module].kind} tensors")
            delta = _pair(module, d, u, None)
            rel = module.split(".", 1)[1]
            if module in alphas:
                delta.alpha = alphas[module]
            else:
                alpha = _config_alpha(configs.get(comp, {}), rel, delta.rank)
                if alpha is not None:
                    if not math.isfinite(alpha):
                        raise FormatError(f"layer {module}: alpha is {alpha}")
                    delta.alpha = alpha
            deltas[module] = delta
    for module, (parts, layer) in wrapping.items():
        try:
            deltas[module] = kinds.peft_wrap(module, parts, layer, deltas.get(module))
        except KindError as e:
            raise FormatError(str(e)) from None
    unused = sorted(set(alphas) - set(deltas))
    if unused:
        raise FormatError(f"alpha for {unused[0]} has no matching layer")
    return deltas


# ----------------------------------------------------------------------------------------------- writing


def adapter_config(deltas: dict[str, LayerDelta], component: str) -> dict:
    """LoraConfig kwargs for one component, as diffusers' ``save_lora_weights`` stores them.

    ``r``/``lora_alpha`` are the most common values; layers that differ go into
    ``rank_pattern``/``alpha_pattern``. Module names are relative to the component and, for text
    encoders, without ``text_model.`` so that PEFT's suffix matching finds them whether or not the
    text encoder has that level.
    """
    rel = {k.split(".", 1)[1]: d for k, d in deltas.items() if k.split(".", 1)[0] == component}
    ranks = collections.Counter(d.rank for d in rel.values())
    alphas = collections.Counter(_clean_number(d.alpha) for d in rel.values())
    r = ranks.most_common(1)[0][0]
    lora_alpha = alphas.most_common(1)[0][0]
    anchor = "" if component in TEXT_COMPONENTS else "^"
    rank_pattern = {f"{anchor}{m}": d.rank for m, d in rel.items() if d.rank != r}
    alpha_pattern = {
        f"{anchor}{m}": _clean_number(d.alpha) for m, d in rel.items() if _clean_number(d.alpha) != lora_alpha
    }
    config = {"r": r, "lora_alpha": lora_alpha, "target_modules": sorted(rel)}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    return config


def _clean_number(x: float):
    x = float(x)
    return int(x) if x.is_integer() else x


def to_diffusers_state_dict(deltas: dict[str, LayerDelta]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """PEFT-format tensors (``<component>.<module>.lora_A.weight``) and the flat ``lora_adapter_metadata``.

    Text-encoder keys are written with CLIP's ``text_model.`` level: diffusers strips it for text
    encoders that lack it and keeps it for those that have it (``CLIPTextModelWithProjection``).
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, d in deltas.items():
        if not d.additive:
            raise ValueError(f"{key}: a {d.kind} delta depends on the base weight and cannot be written as a LoRA")
        comp, _, rel = key.partition(".")
        if comp not in COMPONENTS:
            raise ValueError(f"{key}: unknown component {comp!r} (expected one of {', '.join(COMPONENTS)})")
        if comp in TEXT_COMPONENTS and not rel.startswith("text_model."):
            rel = "text_model." + rel
        tensors[f"{comp}.{rel}.lora_A.weight"] = d.down.contiguous()
        tensors[f"{comp}.{rel}.lora_B.weight"] = d.up.contiguous()
    flat: dict[str, object] = {}
    for comp in sorted({k.split(".", 1)[0] for k in deltas}):
        for field, value in adapter_config(deltas, comp).items():
            flat[f"{comp}.{field}"] = value
    return tensors, flat
