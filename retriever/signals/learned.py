"""Learned weight encoder (AutoLoRA-style): an adapter's weights -> one embedding in the text-encoder space.

Input: fixed random probes ``x_p`` (``PROBES`` unit vectors in text space, seeded) sent through each
cross-attention key/value layer's delta and back, ``r_lp = dW_l^T dW_l x_p`` (the layer's response to the
probe, read in the space the prompt lives in), normalised, each signed to agree with the probe. Up to
``MAX_LAYERS`` layers (evenly chosen) x ``PROBES`` probes make the token sequence ``[tokens, d]``.

Model: a per-layer projection ``d -> h`` (shared, plus a learned layer-and-probe position embedding), a
small transformer encoder (``LAYERS`` layers, ``HEADS`` heads, width ``h``) pooled by its mean, a head
``h -> d``, and a linear skip of the mean token initialised to the identity (so an untrained model already
points where the deltas act, and training learns the map from weight space to description space). Output:
a unit vector ``z``.

Training (``compose train-retriever``): the catalog's described adapters of one base family, against their
description embeddings ``t`` (the text signal's vectors), symmetric InfoNCE on ``|cos(z, t)| / tau``. The
absolute value because a delta has no sign: ``dW = u v^T = (-u)(-v)^T``, so the encoder can only know the
axis it acts along; search scores the learned block with ``|cos|`` too.

Saved as ``LIBRARY/.lora-composer/learned-encoder.pt`` (weights, configuration, the text encoder it was
trained against); :func:`load_for` returns it when it exists and matches the text encoder, and
:class:`lora_composer.retriever.search.Retriever` then builds the ``learned`` block of its matrix from it (adapters indexed
later are embedded on the next refresh). ``retriever_for`` (``compose search``, ``--loras auto``) uses it only
with ``LORA_COMPOSER_LEARNED=1`` (:func:`enabled`): measured on adapters it never saw, it is at chance.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_composer.retriever.signals.weights import kv_deltas

FILE_NAME = "learned-encoder.pt"
PROBES = 4
MAX_LAYERS = 32
HIDDEN = 64
LAYERS = 1
HEADS = 4
TAU = 0.07
PROBE_SEED = 1234


def probes(dim: int, count: int = PROBES) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED + dim)
    x = torch.randn(count, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def features(adapter, dim: int, count: int = PROBES, max_layers: int = MAX_LAYERS) -> torch.Tensor | None:
    """``[layers * probes, dim]`` probe responses of ``adapter``'s key/value deltas of input width ``dim``,
    or None when it has none."""
    layers = [d for _, d in sorted(kv_deltas(adapter), key=lambda kv: kv[0]) if int(d.down.shape[1]) == dim]
    if not layers:
        return None
    if len(layers) > max_layers:
        keep = np.linspace(0, len(layers) - 1, max_layers).round().astype(int)
        layers = [layers[i] for i in keep]
    x = probes(dim, count)  # [P, d]
    out = []
    with torch.no_grad():
        for d in layers:
            down, up = d.down.detach().float(), d.up.detach().float()
            gram = up.T @ up  # [r, r]
            r = (x @ down.T) @ gram @ down * (d.scale**2)  # [P, d]: dW^T dW x_p
            sign = torch.sign((r * x).sum(1, keepdim=True))
            sign[sign == 0] = 1
            r = r * sign / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out.append(r)
    f = torch.cat(out)
    return f if torch.isfinite(f).all() else None


class WeightEncoder(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden: int = HIDDEN,
        layers: int = LAYERS,
        heads: int = HEADS,
        tokens: int = MAX_LAYERS * PROBES,
    ):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "layers": layers, "heads": heads, "tokens": tokens}
        self.proj = nn.Linear(dim, hidden)
        self.pos = nn.Parameter(torch.zeros(tokens, hidden))
        block = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.skip.weight.copy_(torch.eye(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]``, ``mask [B, T]`` (True = a real token) -> unit ``[B, d]``."""
        h = self.proj(x) + self.pos[: x.shape[1]]
        h = self.body(h, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).float()
        count = m.sum(1).clamp_min(1)
        pooled = (h * m).sum(1) / count
        mean_tok = (x * m).sum(1) / count
        z = self.skip(mean_tok) + self.head(pooled)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), t, feats[0].shape[1])
    mask = torch.zeros(len(feats), t, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return x, mask


def info_nce(z: torch.Tensor, t: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE on ``|cos| / tau`` between weight embeddings ``z`` and text embeddings ``t``."""
    logits = (z @ t.T).abs() / tau
    target = torch.arange(len(z))
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def train(
    feats: list[torch.Tensor],
    targets: torch.Tensor,
    epochs: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
    batch: int = 256,
) -> tuple[WeightEncoder, list[float]]:
    """A :class:`WeightEncoder` trained on ``feats`` (one ``[tokens, d]`` each) and unit ``targets [N, d]``;
    also the mean loss per epoch (the first entry: before any update)."""
    torch.manual_seed(seed)
    dim = int(targets.shape[1])
    model = WeightEncoder(dim, tokens=max(MAX_LAYERS * PROBES, max(f.shape[0] for f in feats)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    targets = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x_all, m_all = _batch(feats)
    history = []
    with torch.no_grad():
        history.append(float(info_nce(model(x_all, m_all), targets)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(feats), generator=g)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:
                continue
            loss = info_nce(model(x_all[idx], m_all[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(feats))
    model.eval()
    return model, history


class LearnedEncoder:
    """A trained :class:`WeightEncoder` with its id (a hash of the saved file): embeds catalog rows."""

    def __init__(self, model: WeightEncoder, encoder_id: str, id: str):
        self.model = model.eval()
        self.encoder_id = encoder_id
        self.id = id
        self.dim = model.config["dim"]

    def embed(self, feats: list[torch.Tensor | None]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(feats)
        idx = [i for i, f in enumerate(feats) if f is not None]
        with torch.no_grad():
            for s in range(0, len(idx), 256):
                chunk = idx[s : s + 256]
                z = self.model(*_batch([feats[i][: self.model.config["tokens"]] for i in chunk]))
                for i, v in zip(chunk, z):
                    out[i] = v.numpy().astype(np.float32)
        return out

    def ensure_embeddings(self, catalog, family: str) -> int:
        """Embed the rows of ``family`` that have no embedding from this model yet."""
        todo = catalog.missing("learned", self.id, family)
        if not todo:
            return 0
        vecs = self.embed([_row_features(catalog, r, self.dim) for r in todo])
        catalog.put_embeddings("learned", self.id, {r.id: v for r, v in zip(todo, vecs)})
        return len(todo)


def _row_features(catalog, row, dim: int) -> torch.Tensor | None:
    from lora_composer.adapters import load_adapter

    path = Path(row.path)
    if not path.is_absolute() and getattr(catalog, "root", None) is not None:
        path = Path(catalog.root) / path
    try:
        return features(load_adapter(path), dim)
    except Exception:  # noqa: BLE001 - unreadable now: no learned embedding for that file
        return None


def model_path(library) -> Path:
    from lora_composer.retriever.catalog import default_catalog_path

    return default_catalog_path(library).parent / FILE_NAME


def train_for_library(
    catalog, library, encoder, family: str | None = None, epochs: int = 200, log=None
) -> tuple[Path, dict]:
    """Train on ``catalog``'s described adapters of ``family`` (default: the encoder's), save the model in
    the library folder and embed every row. Returns the file and a summary."""
    fam = family or encoder.family
    catalog.ensure_text_embeddings(encoder, fam)
    dim = int(encoder.mean.shape[-1])
    text = catalog.embeddings("text", encoder.id)
    rows = [r for r in catalog.rows(fam) if text.get(r.id) is not None]
    t0 = time.perf_counter()
    feats, targets = [], []
    for r in rows:
        f = _row_features(catalog, r, dim)
        if f is not None:
            feats.append(f)
            targets.append(torch.tensor(np.asarray(text[r.id], np.float32)))
    if len(feats) < 2:
        from lora_composer.errors import ComposerError

        raise ComposerError(
            f"train-retriever needs at least 2 described {fam} adapters with cross-attention key/value deltas; "
            f"found {len(feats)}"
        )
    model, history = train(feats, torch.stack(targets), epochs=epochs)
    path = model_path(library)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "config": model.config,
            "state": model.state_dict(),
            "encoder": encoder.id,
            "family": fam,
            "probes": PROBES,
            "loss": history,
        },
        path,
    )
    learned = load(path, encoder.id)
    n = learned.ensure_embeddings(catalog, fam)
    summary = {
        "adapters": len(feats),
        "epochs": epochs,
        "loss_before": history[0],
        "loss_after": history[-1],
        "embedded": n,
        "seconds": time.perf_counter() - t0,
    }
    if log:
        log(summary)
    return path, summary


def load(path, encoder_id: str | None = None) -> LearnedEncoder | None:
    path = Path(path)
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if encoder_id is not None and blob.get("encoder") != encoder_id:
        return None  # trained against another text encoder: not comparable
    cfg = blob["config"]
    model = WeightEncoder(cfg["dim"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["tokens"])
    model.load_state_dict(blob["state"])
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    return LearnedEncoder(model, blob["encoder"], "learned:" + digest)


ENV = "LORA_COMPOSER_LEARNED"


def enabled() -> bool:
    """Whether ``retriever_for`` fuses the learned signal: opt-in (``LORA_COMPOSER_LEARNED=1``). On adapters
    it was not trained on it ranks no better than chance (``bench.retrieval``, docs/BENCHMARKS.md), and a
    signal at chance only adds noise to the fused score."""
    import os

    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "yes", "true")


def load_for(catalog, library, encoder):
    """The trained encoder for this library and text encoder, or None (none trained, or another encoder's)."""
    if library is None:
        return None
    try:
        return load(model_path(library), encoder.id)
    except Exception:  # noqa: BLE001 - a broken model file disables the signal, it does not break search
        return None


__all__ = ["features", "info_nce", "load", "load_for", "train", "train_for_library", "WeightEncoder"]
