"""Reading and writing LoRA files.

Only ``.safetensors`` is read by default: pickle-based checkpoints (``.pt``, ``.ckpt``, ``.bin``,
``.pth``) can run arbitrary code when unpickled, so they are refused unless the caller passes
``allow_pickle=True`` (and even then they go through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import functools
import os
import re
from pathlib import Path

import torch

from ..errors import AdapterLoadError
from .family import detect_family
from .formats import (
    LORA_ADAPTER_METADATA_KEY,
    FormatError,
    from_peft_folder,
    parse_state_dict,
    peft_folder,
    to_diffusers_state_dict,
)
from .embeddings import EmbeddingError, split_bundled
from .kinds import KindError
from .kinds.dora import with_scaling
from .metadata import PREFERRED_WEIGHT_KEY, build_metadata
from .types import Adapter, AdapterMetadata

from ..vocab import PICKLE_EXTENSIONS

# SAI model-spec architecture names, written on save so other tools can tell the base model.
_MODELSPEC_ARCHITECTURE = {
    "sd15": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "flux": "flux-1-dev/lora",
}


def _fail(path, cause) -> AdapterLoadError:
    """An :class:`AdapterLoadError` whose message is one line."""
    return AdapterLoadError(path, re.sub(r"\s+", " ", str(cause)).strip())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_safetensors(path: Path, shown) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: truncated, corrupt, not safetensors
        raise _fail(shown, f"not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, header


def _read_pickle(path: Path, shown) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError...
        raise _fail(shown, f"cannot be read with torch.load(weights_only=True): {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise _fail(shown, f"holds a {type(data).__name__}, not a state dict of tensors")
    return data


def read_state_dict(path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Tensors, header metadata and resolved path of a LoRA file, or :class:`AdapterLoadError`."""
    shown = path
    p = Path(path)
    if not p.exists():
        raise _fail(shown, "no such file")
    if p.is_dir():
        raise _fail(shown, "is a directory, not a LoRA file")
    p = p.resolve()
    if p.stat().st_size == 0:
        raise _fail(shown, "empty file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        tensors, header = _read_safetensors(p, shown)
    elif allow_pickle:
        tensors, header = _read_pickle(p, shown), {}
    else:
        kind = f"a {suffix} file" if suffix else "a file without extension"
        pickle_note = " (pickle-based: unpickling can run code)" if suffix in PICKLE_EXTENSIONS else ""
        raise _fail(
            shown,
            f"refusing to read {kind}{pickle_note}; only .safetensors is loaded unless allow_pickle=True "
            "is passed for a file you trust",
        )
    return tensors, header, p


def load_adapter(path, name: str | None = None, allow_pickle: bool = False, dora_scaling: str = "comfy") -> Adapter:
    """Load a LoRA file (diffusers/PEFT or kohya/A1111 keys) into the canonical :class:`Adapter`.

    ``dora_scaling``: what a weight other than 1 means for DoRA layers: ``"comfy"`` (default, ComfyUI's
    ``W0 + w (DoRA(W0) - W0)``) or ``"peft"`` (PEFT's and diffusers' ``m (W0 + w d) / ||W0 + w d||``); see
    :mod:`lora_composer.adapters.kinds.dora`. A1111 bundled embeddings land on ``Adapter.embeddings``
    (:mod:`lora_composer.adapters.embeddings` loads them into a pipeline).

    SHiRA adapters (a PEFT SHiRA folder or file, or our sparse format) load with :class:`SparseDelta`
    deltas (see :mod:`lora_composer.adapters.shira`).

    Raises :class:`lora_composer.errors.AdapterLoadError` (``"PATH: cause"``, one line) for anything that is
    not a loadable LoRA. Pure: reads the file (and its sidecars), changes nothing else.
    """
    from . import shira

    if Path(path).is_dir() and shira.peft_shira_dir(Path(path)) is not None:
        return shira.load_shira(path, name=name)
    try:
        folder = peft_folder(path)  # PEFT's save_pretrained folder: LoRA, LoHa, LoKr, IA3, OFT, BOFT
    except FormatError as e:
        raise _fail(path, e) from None
    tensors, header, resolved = read_state_dict(folder[0] if folder else path, allow_pickle=allow_pickle)
    if folder:
        tensors, header = from_peft_folder(tensors, folder[1], header)
        name = name or folder[0].parent.name
    if shira.is_shira_state_dict(tensors):  # sparse (SHiRA) adapter: PEFT's keys or ours
        return shira.load_shira(path, name=name)
    try:
        tensors, embeddings = split_bundled(tensors)
        deltas, source_format = parse_state_dict(tensors, header) if tensors or not embeddings else ({}, "kohya")
        deltas = with_scaling(deltas, dora_scaling)
    except (FormatError, EmbeddingError, KindError) as e:
        raise _fail(path, e) from None
    if not deltas and not embeddings:
        raise _fail(path, "no LoRA layers found")
    for module, d in deltas.items():
        for which, t in d.tensors().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise _fail(path, f"layer {module} has NaN or inf values in its {which} weight")
    fields = build_metadata(resolved, header)
    metadata = AdapterMetadata(source_format=source_format, sha256=sha256_file(resolved), **fields)
    return Adapter(
        name=name or resolved.stem,
        family=detect_family(deltas, keys=tensors.keys()),
        deltas=deltas,
        metadata=metadata,
        path=str(resolved),
        embeddings=embeddings,
    )


def _header_for(adapter: Adapter, lora_config: dict) -> dict[str, str]:
    """safetensors header: what the adapter was loaded with, updated with what it is now."""
    meta = adapter.metadata
    header = {k: str(v) for k, v in (meta.file_metadata or {}).items()}
    header.pop(LORA_ADAPTER_METADATA_KEY, None)
    header["format"] = "pt"
    header[LORA_ADAPTER_METADATA_KEY] = json.dumps(lora_config, indent=2, sort_keys=True)
    header["modelspec.title"] = adapter.name
    if adapter.family in _MODELSPEC_ARCHITECTURE:
        header["modelspec.architecture"] = _MODELSPEC_ARCHITECTURE[adapter.family]
    if meta.trigger_words:
        header["modelspec.trigger_phrase"] = ", ".join(meta.trigger_words)
    else:
        header.pop("modelspec.trigger_phrase", None)
    if meta.description:
        header["modelspec.description"] = meta.description
    if meta.preferred_weight is not None:
        header[PREFERRED_WEIGHT_KEY] = repr(float(meta.preferred_weight))
    return header


def save_adapter(adapter: Adapter, path) -> Path:
    """Write ``adapter`` as a diffusers/PEFT LoRA (``<component>.<module>.lora_A.weight``) that diffusers'
    ``load_lora_weights`` loads with the same alphas. ``path`` may be a folder (then ``NAME.safetensors``
    in it). Returns the written path. The file is written next to its destination and renamed into place,
    so a failed save leaves no partial file."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{adapter.name}.safetensors"
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{p}: LoRA files are written as .safetensors")
    if not adapter.deltas:
        raise ValueError(f"{adapter.name}: nothing to save (no layers)")
    tensors, lora_config = to_diffusers_state_dict(adapter.deltas)
    header = _header_for(adapter, lora_config)
    return write_safetensors(tensors, p, header)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, path: Path, header: dict[str, str]) -> Path:
    """Write next to ``path`` and rename into place, so a failed save leaves no partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Tensors sharing memory (kohya FLUX qkv factors) must be separate tensors for safetensors.
    seen: set[int] = set()
    for k, t in tensors.items():
        if t.data_ptr() in seen:
            tensors[k] = t.clone()
        seen.add(tensors[k].data_ptr())
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a saved adapter is an ordinary file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
