"""SHiRA (Sparse High Rank Adapters, Bhardwaj et al. 2024): sparse deltas as indices + values.

Two file layouts load into an :class:`Adapter` whose deltas are :class:`SparseDelta`:

- PEFT's (``ShiraConfig``, ``save_pretrained``): ``base_model.model.<module>.shira_indices`` (``[2, N]``
  int, row/column) and ``...shira_weight`` (``[N]``); a folder holding ``adapter_model.safetensors`` +
  ``adapter_config.json`` (``peft_type: SHIRA``) or the safetensors file itself. PEFT prefixes module
  paths with ``base_model.model.`` only, so the pipeline component (``unet`` by default) is an argument.
  PEFT does not store the layer shape: it is checked against the pipeline when attached.
- ours (:func:`save_shira`): ``<component>.<module>.shira_indices`` / ``.shira_weight`` plus
  ``.shira_shape`` (``[out, in]``, or ``[out, in, kh, kw]`` for a Conv2d, whose column indexes the flattened
  kernel) and ``.alpha`` (PEFT's ``scaling``), header ``lora_composer.format: shira``. PEFT's SHiRA (0.21)
  targets ``nn.Linear`` only, so conv (LoCon) layers are stored in our format only.

Also the LoRA -> SHiRA conversion (:func:`lora_to_shira`: the largest-magnitude entries of each layer's
delta) and LoRA-Squeeze (:func:`squeeze_lora`: lower rank by randomized SVD of each layer's delta).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..vocab import COMPONENTS
from .family import detect_family
from .types import Adapter, AdapterMetadata, LayerDelta, SparseDelta

INDICES, VALUES, SHAPE, ALPHA = "shira_indices", "shira_weight", "shira_shape", "alpha"
PEFT_PREFIX = "base_model.model."
FORMAT_KEY = "lora_composer.format"


def is_shira_state_dict(tensors) -> bool:
    return any(k.endswith("." + INDICES) for k in tensors)


def peft_shira_dir(path: Path) -> Path | None:
    """The safetensors file of a PEFT SHiRA folder, or None if ``path`` is not one."""
    cfg, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not (cfg.is_file() and weights.is_file()):
        return None
    try:
        peft_type = json.loads(cfg.read_text()).get("peft_type", "")
    except (OSError, ValueError):
        return None
    return weights if str(peft_type).upper() == "SHIRA" else None


def _family(deltas: dict[str, SparseDelta], keys) -> str:
    # detect_family reads input widths from ``down``: give it shape-only (rank 0) low-rank stand-ins
    proxy = {k: LayerDelta(torch.empty(0, *d.shape[1:]), torch.empty(d.shape[0], 0), 0.0) for k, d in deltas.items()}
    return detect_family(proxy, keys=keys)


def parse_shira_state_dict(tensors: dict[str, torch.Tensor], component: str = "unet") -> dict[str, SparseDelta]:
    """SparseDeltas keyed ``<component>.<module>`` from PEFT's or our SHiRA keys; ValueError if malformed."""
    deltas: dict[str, SparseDelta] = {}
    suffix = "." + INDICES
    for key in sorted(k for k in tensors if k.endswith(suffix)):
        stem = key[: -len(suffix)]
        values = tensors.get(f"{stem}.{VALUES}")
        if values is None:
            raise ValueError(f"{key} has no matching {VALUES}")
        idx = tensors[key]
        if idx.dim() != 2 or idx.shape[0] != 2 or idx.shape[1] != values.numel():
            raise ValueError(f"{key}: expected [2, {values.numel()}] indices, got {list(idx.shape)}")
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"{key}: negative indices")
        if not torch.isfinite(values).all():
            raise ValueError(f"{stem} has NaN or inf values")
        if f"{stem}.{SHAPE}" in tensors:
            raw = tensors[f"{stem}.{SHAPE}"]
            shape = tuple(int(v) for v in raw.reshape(-1).tolist())
            if raw.dim() != 1 or len(shape) not in (2, 4) or min(shape) < 1:
                raise ValueError(f"{stem}.{SHAPE}: expected [out, in] or [out, in, kh, kw], got {raw.tolist()}")
            columns = math.prod(shape[1:])
            if idx.numel() and (int(idx[0].max()) >= shape[0] or int(idx[1].max()) >= columns):
                raise ValueError(
                    f"{key}: indices reach ({int(idx[0].max())}, {int(idx[1].max())}), outside the "
                    f"{shape[0]}x{columns} delta of shape {list(shape)}"
                )
        else:  # PEFT stores no shape: the smallest that holds the indices (checked against the layer later)
            shape = (int(idx[0].max()) + 1, int(idx[1].max()) + 1) if idx.numel() else (0, 0)
        alpha = float(tensors[f"{stem}.{ALPHA}"]) if f"{stem}.{ALPHA}" in tensors else 1.0
        name = stem.removeprefix(PEFT_PREFIX) if stem.startswith(PEFT_PREFIX) else stem
        if stem.startswith(PEFT_PREFIX) or name.split(".", 1)[0] not in COMPONENTS:
            name = f"{component}.{name}"
        deltas[name] = SparseDelta(idx.long(), values.reshape(-1).float(), shape, alpha)
    return deltas


def load_shira(path, name: str | None = None, component: str = "unet") -> Adapter:
    """Load a PEFT SHiRA folder/file or one of ours; :class:`AdapterLoadError` on failure."""
    from .io import _fail, read_state_dict, sha256_file

    p = Path(path)
    if p.is_dir():
        inner = peft_shira_dir(p)
        if inner is None:
            raise _fail(path, "is a directory, not a LoRA file or a PEFT SHiRA folder")
        file, stem = inner, p.name
    else:
        file, stem = p, p.stem
    tensors, header, resolved = read_state_dict(file)
    try:
        deltas = parse_shira_state_dict(tensors, component)
    except ValueError as e:
        raise _fail(path, e) from None
    if not deltas:
        raise _fail(path, "no SHiRA layers found")
    ours = header.get(FORMAT_KEY) == "shira"
    meta = AdapterMetadata(
        source_format="shira" if ours else "peft-shira",
        sha256=sha256_file(resolved),
        file_metadata=header,
        description=header.get("modelspec.description", ""),
    )
    return Adapter(
        name=name or header.get("modelspec.title") or stem,
        family=_family(deltas, tensors.keys()),
        deltas=deltas,
        metadata=meta,
        path=str(p.resolve()),
    )


def save_shira(adapter: Adapter, path) -> Path:
    """Write a SHiRA adapter in our sparse format (safetensors, written next to ``path`` then renamed)."""
    from .io import write_safetensors

    p = Path(path)
    if p.is_dir():
        p = p / f"{adapter.name}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for key, d in adapter.deltas.items():
        if not isinstance(d, SparseDelta):
            raise ValueError(f"{key}: not a sparse delta")
        big = max(d.shape[0], d.columns) >= 2**31
        tensors[f"{key}.{INDICES}"] = d.indices.to(torch.int64 if big else torch.int32).contiguous()
        tensors[f"{key}.{VALUES}"] = d.values.float().contiguous()
        tensors[f"{key}.{SHAPE}"] = torch.tensor(list(d.shape), dtype=torch.int64)
        tensors[f"{key}.{ALPHA}"] = torch.tensor(float(d.alpha))
    header = {FORMAT_KEY: "shira", "modelspec.title": adapter.name}
    if adapter.metadata.description:
        header["modelspec.description"] = adapter.metadata.description
    return write_safetensors(tensors, p, header)


# -- conversions -----------------------------------------------------------------------------------------
def _additive_or_fail(key: str, d, what: str) -> None:
    """DoRA and IA3 scale the base weight: without it they are no fixed delta to re-factor."""
    if not d.additive:
        raise ValueError(
            f"layer {key}: a {d.kind} delta depends on the base weight; {what} takes LoRA, LoHa, LoKr and full layers"
        )


def dense_delta(d: LayerDelta) -> torch.Tensor:
    """``alpha / r * up @ down`` in fp32, as a 2-D ``[out, in * kh * kw]`` matrix."""
    up = d.up.reshape(d.up.shape[0], -1).float()
    down = d.down.reshape(d.down.shape[0], -1).float()
    return (up * d.scale) @ down


@dataclass
class LayerReport:
    key: str
    kept: int  # nonzeros (SHiRA) or rank (squeeze)
    of: int  # entries (SHiRA) or original rank (squeeze)
    rel_error: float  # ||D - D'||_F / ||D||_F
    energy: float  # retained ||D'||_F^2 / ||D||_F^2
    note: str = ""


def lora_to_shira(adapter: Adapter, density: float = 0.02, name: str | None = None):
    """SHiRA adapter keeping the ``density`` largest-magnitude entries of each layer's LoRA delta.

    A Conv2d (LoCon) layer's ``[out, in, kh, kw]`` delta is ranked flattened like a Linear one: the kept
    entries are the largest of the whole kernel, whatever their tap. Returns ``(adapter, reports)``.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    deltas, reports = {}, []
    for key, d in adapter.deltas.items():
        if d.is_sparse:
            deltas[key] = d
            reports.append(LayerReport(key, d.nnz, d.shape[0] * d.columns, 0.0, 1.0, "already sparse"))
            continue
        _additive_or_fail(key, d, "--to shira")
        full = dense_delta(d)
        flat = full.reshape(-1)
        k = max(1, min(flat.numel(), round(density * flat.numel())))
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        vals = flat[idx]
        norm2 = float(flat.pow(2).sum())
        kept2 = float(vals.pow(2).sum())
        rel = math.sqrt(max(norm2 - kept2, 0.0) / norm2) if norm2 > 0 else 0.0
        n_in = full.shape[1]
        indices = torch.stack([idx // n_in, idx % n_in])
        shape = (full.shape[0], *d.down.shape[1:]) if d.is_conv else (full.shape[0], n_in)
        deltas[key] = SparseDelta(indices, vals.clone(), shape, 1.0)
        reports.append(LayerReport(key, k, flat.numel(), rel, kept2 / norm2 if norm2 > 0 else 1.0))
    if not deltas:
        raise ValueError(f"{adapter.name}: no layer to convert")
    meta = AdapterMetadata(
        trigger_words=list(adapter.metadata.trigger_words),
        description=adapter.metadata.description,
        preferred_weight=adapter.metadata.preferred_weight,
        source_format="shira",
    )
    out = Adapter(name or adapter.name, adapter.family, deltas, meta)
    return out, reports


def squeeze_lora(
    adapter: Adapter,
    rank: int | None = None,
    energy: float | None = None,
    name: str | None = None,
    niter: int = 4,
    seed: int = 0,
):
    """LoRA-Squeeze: each layer's delta re-factored at a lower rank by ``torch.svd_lowrank``.

    ``rank``: a fixed target rank (layers already at or below it are kept as they are); ``energy``
    (with ``rank=None``): per layer, the smallest rank whose singular values keep that fraction of the
    delta's squared Frobenius norm. New factors ``up = U sqrt(S)``, ``down = sqrt(S) V^T``, alpha = rank.
    Returns ``(adapter, reports)`` with the retained energy and relative error per layer.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give either rank or energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # svd_lowrank is randomized: same input, same output
    try:
        deltas, reports = {}, []
        for key, d in adapter.deltas.items():
            if d.is_sparse:
                deltas[key] = d
                reports.append(LayerReport(key, 0, 0, 0.0, 1.0, "sparse layer kept"))
                continue
            _additive_or_fail(key, d, "--rank")
            full = dense_delta(d)
            total = float(full.pow(2).sum())
            q = min(d.rank, *full.shape)
            if rank is not None and rank >= d.rank:
                deltas[key] = d
                reports.append(LayerReport(key, d.rank, d.rank, 0.0, 1.0, "kept (rank already low enough)"))
                continue
            U, S, V = torch.svd_lowrank(full, q=q, niter=niter)
            cum = torch.cumsum(S.double().pow(2), 0) / total if total > 0 else torch.ones_like(S, dtype=torch.float64)
            if rank is not None:
                k = min(rank, q)
            else:
                k = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
                k = max(1, min(k, q))
            root = S[:k].sqrt()
            up = (U[:, :k] * root).to(d.up.dtype)
            down = (root[:, None] * V[:, :k].T).to(d.down.dtype)
            if d.is_conv:
                up = up.reshape(up.shape[0], k, 1, 1)
                down = down.reshape(k, *d.down.shape[1:])
            kept = float(cum[k - 1]) if total > 0 else 1.0
            deltas[key] = LayerDelta(down.contiguous(), up.contiguous(), float(k))
            rel = float((full - dense_delta(deltas[key])).norm() / math.sqrt(total)) if total > 0 else 0.0
            reports.append(LayerReport(key, k, d.rank, rel, min(kept, 1.0)))
    finally:
        torch.random.set_rng_state(gen_state)
    meta = AdapterMetadata(
        trigger_words=list(adapter.metadata.trigger_words),
        description=adapter.metadata.description,
        preferred_weight=adapter.metadata.preferred_weight,
        source_format=adapter.metadata.source_format,
        file_metadata=dict(adapter.metadata.file_metadata),
    )
    return Adapter(name or adapter.name, adapter.family, deltas, meta), reports
