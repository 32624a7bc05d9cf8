"""One layer's tensors, as LyCORIS (kohya keys) or PEFT (module keys) write them -> a delta kind.

Kohya/A1111 suffixes (what ``lycoris-lora`` saves): LoCon ``lora_down.weight``/``lora_up.weight`` with an
optional Tucker core ``lora_mid.weight``; LoHa ``hada_w1_a`` ... ``hada_t2``; LoKr ``lokr_w1``/``lokr_w1_a``/
``lokr_w1_b``/``lokr_w2``/``lokr_w2_a``/``lokr_w2_b``/``lokr_t2``; full ``diff``/``diff_b``; IA3 ``weight``
with ``on_input``; GLoRA ``a1``/``a2``/``b1``/``b2`` (``.weight``); each of LoCon/LoHa/LoKr with an optional ``dora_scale`` (DoRA). ``alpha`` scales by
``alpha / r`` (r: the factors' rank; a LoKr with both sides full has scale 1, as in LyCORIS and ComfyUI).

PEFT suffixes: the same LoHa/LoKr names, ``ia3_l`` (IA3), ``lora_magnitude_vector`` (DoRA beside
``lora_A``/``lora_B``), ``oft_R.weight`` (OFT) and ``boft_R``/``boft_s`` (BOFT); alphas and OFT's settings come
from the adapter config (PEFT scales LoKr by ``alpha / r`` always).
"""

from __future__ import annotations

import math

import torch

from ..errors import ComposerError
from .kinds import DoRADelta, FullDelta, GLoRADelta, IA3Delta, LoHaDelta, LoKrDelta, OFTDelta
from .types import LayerDelta

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOCON = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
GLORA = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
KOHYA_SUFFIXES = LOHA + LOKR + LOCON + GLORA + ("alpha", "dora_scale", "diff", "diff_b", "weight", "on_input", "oft_blocks", "rescale")
PEFT_SUFFIXES = LOHA + LOKR + ("ia3_l", "lora_magnitude_vector", "oft_R.weight", "boft_R", "boft_s")

# Key fragments of LyCORIS methods that are recognised but not loaded: (fragment, what it is).
NOT_LOADED = (
    ("oft_diag", "OFT (oft_diag)"),
    (".oft_r", "PEFT OFT from before PEFT 0.14 (oft_r; PEFT itself no longer loads it)"),
)

EPS32 = float(torch.finfo(torch.float32).eps)


class KindError(ComposerError, ValueError):
    """One layer's tensors do not make a delta; the message names the key and the cause."""


def _need(name: str, parts: dict, suffix: str) -> torch.Tensor:
    t = parts.get(suffix)
    if t is None:
        raise KindError(f"layer {name} has no {suffix} (key {name}.{suffix!s} missing)")
    return t


def _dims(name: str, parts: dict, suffix: str, dims: tuple[int, ...]) -> torch.Tensor:
    t = _need(name, parts, suffix)
    if t.dim() not in dims:
        raise KindError(f"key {name}.{suffix}: expected a {' or '.join(map(str, dims))}-D tensor, got shape {tuple(t.shape)}")
    return t


def _match(name: str, what: str, a: int, b: int, ka: str, kb: str) -> None:
    if a != b:
        raise KindError(f"key {name}.{kb}: {what} mismatch, {ka} gives {a} but {kb} has {b}")


def _flat_cols(t: torch.Tensor) -> int:
    return int(t.numel() // t.shape[0])


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None else float(alpha) / rank


def loha(name: str, parts: dict, alpha: float | None) -> LoHaDelta:
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if (t1 is None) != (t2 is None):
        raise KindError(f"layer {name} has {'hada_t1' if t1 is not None else 'hada_t2'} without its pair")
    tucker = t1 is not None
    w = {s: _dims(name, parts, s, (2,) if tucker else (2, 4)) for s in LOHA[:4]}
    for side in ("1", "2"):
        a, b = w[f"hada_w{side}_a"], w[f"hada_w{side}_b"]
        if tucker:
            t = parts[f"hada_t{side}"]
            if t.dim() < 3:
                raise KindError(f"key {name}.hada_t{side}: expected a Tucker core [r, r, kh, kw], got {tuple(t.shape)}")
            _match(name, "rank", t.shape[0], a.shape[0], f"hada_t{side}", f"hada_w{side}_a")
            _match(name, "rank", t.shape[1], b.shape[0], f"hada_t{side}", f"hada_w{side}_b")
        else:
            _match(name, "rank", a.shape[1], b.shape[0], f"hada_w{side}_a", f"hada_w{side}_b")
    out1 = w["hada_w1_a"].shape[1 if tucker else 0]
    out2 = w["hada_w2_a"].shape[1 if tucker else 0]
    _match(name, "output size", out1, out2, "hada_w1_a", "hada_w2_a")
    _match(name, "input size", _flat_cols(w["hada_w1_b"]), _flat_cols(w["hada_w2_b"]), "hada_w1_b", "hada_w2_b")
    rank = int(w["hada_w1_b"].shape[0])
    return LoHaDelta(w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], _scale(alpha, rank), t1, t2)


def lokr(name: str, parts: dict, alpha: float | None, peft_rank: int | None = None) -> LoKrDelta:
    """``peft_rank``: PEFT's config ``r`` (PEFT scales by ``alpha / r`` even when both sides are full)."""
    w1, w2, t2 = parts.get("lokr_w1"), parts.get("lokr_w2"), parts.get("lokr_t2")
    if w1 is None:
        w1a, w1b = _dims(name, parts, "lokr_w1_a", (2,)), _dims(name, parts, "lokr_w1_b", (2,))
        _match(name, "rank", w1a.shape[1], w1b.shape[0], "lokr_w1_a", "lokr_w1_b")
    else:
        w1a = w1b = None
        if w1.dim() != 2:
            raise KindError(f"key {name}.lokr_w1: expected a 2-D tensor, got shape {tuple(w1.shape)}")
    if w2 is None:
        w2a = _dims(name, parts, "lokr_w2_a", (2,))
        w2b = _dims(name, parts, "lokr_w2_b", (2, 4) if t2 is None else (2,))
        if t2 is not None:
            if t2.dim() < 3:
                raise KindError(f"key {name}.lokr_t2: expected a Tucker core [r, r, kh, kw], got {tuple(t2.shape)}")
            _match(name, "rank", t2.shape[0], w2a.shape[0], "lokr_t2", "lokr_w2_a")
            _match(name, "rank", t2.shape[1], w2b.shape[0], "lokr_t2", "lokr_w2_b")
        else:
            _match(name, "rank", w2a.shape[1], w2b.shape[0], "lokr_w2_a", "lokr_w2_b")
    else:
        w2a = w2b = None
        if w2.dim() not in (2, 4):
            raise KindError(f"key {name}.lokr_w2: expected a 2-D or 4-D tensor, got shape {tuple(w2.shape)}")
    if peft_rank is not None:
        scale = _scale(alpha, peft_rank)
    elif w1b is not None:
        scale = _scale(alpha, int(w1b.shape[0]))
    elif w2b is not None:
        scale = _scale(alpha, int(w2b.shape[0]))
    else:
        scale = 1.0  # both sides full: LyCORIS ignores alpha
    return LoKrDelta(w1=w1, w1a=w1a, w1b=w1b, w2=w2, w2a=w2a, w2b=w2b, t2=t2, scale_=scale)


def locon(name: str, parts: dict, alpha: float | None) -> LayerDelta:
    """LoCon, with a Tucker core folded into the down kernel: ``down' = einsum(mid, down)`` (exact)."""
    down = _dims(name, parts, "lora_down.weight", (2, 4))
    up = _dims(name, parts, "lora_up.weight", (2, 4))
    mid = parts.get("lora_mid.weight")
    rank = int(down.shape[0])
    if mid is not None:
        if mid.dim() != 4 or down.dim() != 4:
            raise KindError(f"key {name}.lora_mid.weight: expected 4-D conv kernels, got {tuple(mid.shape)}")
        _match(name, "rank", mid.shape[1], rank, "lora_down.weight", "lora_mid.weight")
        _match(name, "rank", up.shape[1], mid.shape[0], "lora_mid.weight", "lora_up.weight")
        down = torch.einsum("i j m n, j c -> i c m n", mid.float(), down.reshape(rank, -1).float())
    _match(name, "rank", up.shape[1], down.shape[0], "lora_down.weight", "lora_up.weight")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise KindError(f"key {name}.lora_up.weight: {tuple(up.shape)} is not a 1x1 convolution")
    return LayerDelta(down=down, up=up, alpha=float(rank if alpha is None else alpha))


def full(name: str, parts: dict) -> FullDelta:
    diff = _dims(name, parts, "diff", (2, 4))
    diff_b = parts.get("diff_b")
    if diff_b is not None and diff_b.numel() != diff.shape[0]:
        raise KindError(f"key {name}.diff_b: {diff_b.numel()} values for {diff.shape[0]} outputs")
    return FullDelta(diff, diff_b)


def glora(name: str, parts: dict, alpha: float | None) -> GLoRADelta:
    """GLoRA; a Tucker core ``bm`` ``[r, r, kh, kw]`` (between ``b1`` and a 1x1 ``b2``) is folded into ``b2``
    exactly, as Tucker LoCon's is: ``b2' = einsum(bm, b2)``."""
    a1, a2, b1, b2 = (_dims(name, parts, s, (2, 4)) for s in GLORA[:4])
    _match(name, "rank", a1.shape[1], a2.shape[0], "a1.weight", "a2.weight")
    _match(name, "input size", a1.shape[0], a2.shape[1], "a1.weight", "a2.weight")
    bm = parts.get("bm.weight")
    if bm is not None:
        if bm.dim() != 4 or b2.dim() != 4 or tuple(b2.shape[2:]) != (1, 1):
            raise KindError(f"key {name}.bm.weight: expected a [r, r, kh, kw] core beside a 1x1 b2, got "
                            f"{tuple(bm.shape)} and b2 {tuple(b2.shape)}")
        _match(name, "rank", bm.shape[1], b2.shape[0], "b2.weight", "bm.weight")
        _match(name, "rank", b1.shape[1], bm.shape[0], "bm.weight", "b1.weight")
        b2 = torch.einsum("i j m n, j c -> i c m n", bm.float(), b2.reshape(b2.shape[0], -1).float())
    _match(name, "rank", b1.shape[1], b2.shape[0], "b1.weight", "b2.weight")
    return GLoRADelta(a1, a2, b1, b2, _scale(alpha, int(a2.shape[0])))


def kohya_delta(name: str, parts: dict, alpha: float | None):
    """The delta one kohya-named layer's tensors make (``parts``: suffix -> tensor, ``alpha`` already read)."""
    suffixes = set(parts) - {"alpha"}
    odd = sorted(s for s in suffixes if s not in KOHYA_SUFFIXES)
    if odd:
        raise KindError(f"unknown key format (key {name}.{odd[0]!r})")
    dora = parts.get("dora_scale")
    if any(s.startswith("hada_") for s in suffixes):
        inner = loha(name, parts, alpha)
    elif any(s.startswith("lokr_") for s in suffixes):
        inner = lokr(name, parts, alpha)
    elif any(s.startswith("lora_") for s in suffixes):
        inner = locon(name, parts, alpha)
    elif "oft_blocks" in suffixes:
        blocks = parts["oft_blocks"]
        if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise KindError(f"key {name}.oft_blocks: expected [blocks, b, b] (OFT) or [stages, blocks, b, b] (BOFT), "
                            f"got shape {tuple(blocks.shape)}")
        return OFTDelta(blocks, parts.get("rescale"), 0.0 if alpha is None else float(alpha))
    elif any(s in suffixes for s in GLORA):
        return glora(name, parts, alpha)
    elif "diff" in suffixes or "diff_b" in suffixes:
        return full(name, parts)
    elif "on_input" in suffixes or "weight" in suffixes:
        vec = _need(name, parts, "weight")
        on_input = bool(_need(name, parts, "on_input").reshape(-1)[0].item()) if "on_input" in parts else False
        return IA3Delta(1.0 + vec.float().reshape(-1), on_input=on_input, scale_bias=False)
    else:
        raise KindError(f"layer {name} has only {', '.join(sorted(suffixes)) or 'an alpha'}")
    if dora is None:
        return inner
    return DoRADelta(inner, dora, eps=EPS32)


def peft_delta(
    name: str, parts: dict, alpha: float | None, rank: int | None, feedforward: bool | None = None, config=None
):
    """The delta one PEFT module's LoHa/LoKr/IA3/OFT/BOFT tensors make (``alpha``/``rank``, OFT's settings from
    its config)."""
    suffixes = set(parts)
    if "oft_R.weight" in suffixes:
        return peft_oft(name, parts, config or {})
    if suffixes & {"boft_R", "boft_s"}:
        return peft_boft(name, parts)
    if any(s.startswith("hada_") for s in suffixes):
        r = int(_need(name, parts, "hada_w1_b").shape[0])
        return loha(name, parts, r if alpha is None else alpha)
    if any(s.startswith("lokr_") for s in suffixes):
        if rank is None:
            for s in ("lokr_w1_b", "lokr_w2_b"):
                if s in parts:
                    rank = int(parts[s].shape[0])
                    break
        return lokr(name, parts, alpha if alpha is not None else rank, peft_rank=rank)
    if "ia3_l" in suffixes:
        vec = parts["ia3_l"]
        if feedforward is None:  # Linear: [out, 1] scales outputs, [1, in] inputs; conv: outputs unless told
            feedforward = vec.dim() == 2 and vec.shape[0] == 1 and vec.shape[1] > 1
        return IA3Delta(vec.float().reshape(-1), on_input=bool(feedforward), scale_bias=not feedforward)
    raise KindError(f"layer {name}: unknown PEFT tensors {', '.join(sorted(suffixes))}")


def _finite(name: str, suffix: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise KindError(f"key {name}.{suffix} has NaN or inf values")


def peft_oft(name: str, parts: dict, config: dict) -> OFTDelta:
    """PEFT's OFT (0.14 on): ``oft_R.weight`` ``[k, b(b-1)/2]`` holds each block's upper triangle ``M``; PEFT
    turns it into ``Q = M - M^T``, rotates the layer's input by ``R`` and merges ``W' = W R^T``.

    Its settings come from the config: ``coft``/``eps`` project each block's ``Q`` to norm at most
    ``eps / sqrt(k)`` (done here once, as PEFT does to the weight itself), ``block_share`` (one block for
    the whole axis), ``use_cayley_neumann``/``num_cayley_neumann_terms`` (its series ``N(Q)``, else the exact
    ``(I - Q)(I + Q)^-1``). Missing settings take PEFT's defaults."""
    key = "oft_R.weight"
    vec = _dims(name, parts, key, (2,))
    _finite(name, key, vec)
    n = int(vec.shape[1])
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n:  # 0 values: blocks of 1, which PEFT writes for a prime input size
        raise KindError(f"key {name}.{key}: {n} values per block is not b(b-1)/2 for any block size b")
    rows, cols = torch.triu_indices(b, b, 1)
    v = vec.float()
    if config.get("coft", False):  # PEFT's _project_batch, in its order of operations
        m = torch.zeros(v.shape[0], b, b)
        m[:, rows, cols] = v
        q = m - m.transpose(-2, -1)
        eps = float(config.get("eps", 6e-5)) * 1 / torch.sqrt(torch.tensor(q.shape[0]))
        norm = torch.norm(q, dim=(1, 2), keepdim=True)
        v = torch.where(norm <= eps, q, eps * (q / norm))[:, rows, cols]
    m = torch.zeros(v.shape[0], b, b)
    m[:, rows, cols] = v
    # OFTDelta merges W' = W R with R = (I + Q)(I - Q)^-1 or N(Q), Q = B - B^T. PEFT's W R_peft^T is that with
    # B = M for its exact branch ((I - Q)(I + Q)^-1 transposed) and B = -M for its series (N(Q)^T = N(-Q)).
    series = _neumann_series(config) if config.get("use_cayley_neumann", True) else ()
    shared = config.get("block_share")
    shared = bool(shared) if shared is not None else v.shape[0] == 1
    return OFTDelta(-m if series else m, on_input=True, shared=shared, series=series)


def _neumann_series(config: dict) -> tuple[float, ...]:
    """Coefficients of ``Q^0, Q^1, ...`` in PEFT's Cayley-Neumann series of ``num_cayley_neumann_terms`` n terms:
    from PEFT 0.18 ``I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)`` (at least up to ``Q^3``), before it every power
    up to ``Q^(n-1)`` times 2. A config without ``peft_version`` gets the current series, as PEFT computes it."""
    n = int(config.get("num_cayley_neumann_terms", 5))
    version = str(config.get("peft_version") or "").partition("@")[0]
    if n <= 2:
        return (1.0, 2.0)[: max(n, 1)]
    if version and _older(version, (0, 18)):
        return (1.0,) + (2.0,) * (n - 1)
    return (1.0, 2.0, 2.0) + (2.0,) * max(0, n - 4) + (1.0,)


def peft_boft(name: str, parts: dict) -> OFTDelta:
    """PEFT's BOFT: ``boft_R`` ``[m, k, b, b]`` (``m`` butterfly factors) and ``boft_s`` (one scale per output).

    PEFT rotates each block by ``(I - S)(I + S)^-1``, ``S = (B - B^T) / 2``, merges ``W' = s * (W M^T)`` with
    ``M = P_{m-1} D_{m-1} P_{m-1}^T ... P_0 D_0 P_0^T``; its permutations pair inputs ``2^i b / 2`` apart as
    LyCORIS's butterfly does, with each block's two halves one after the other where LyCORIS interleaves them."""
    r = _dims(name, parts, "boft_R", (4,))
    s = _need(name, parts, "boft_s")
    if r.shape[-1] != r.shape[-2] or r.shape[-1] < 1:
        raise KindError(f"key {name}.boft_R: expected [factors, blocks, b, b], got shape {tuple(r.shape)}")
    if s.dim() != 2 or 1 not in s.shape:
        raise KindError(f"key {name}.boft_s: expected [out, 1] or [1, out], got shape {tuple(s.shape)}")
    _finite(name, "boft_R", r)
    _finite(name, "boft_s", s)
    m, b = int(r.shape[0]), int(r.shape[-1])
    half = r.float() / 2
    if m == 1:  # one factor is a diagonal OFT: W' = W R_peft^T, R_peft^T = Cayley(S), so B = (B_peft) / 2
        return OFTDelta(half[0], rescale=s.reshape(-1, 1), on_input=True)
    if b % 2:
        raise KindError(f"key {name}.boft_R: {m} butterfly factors need an even block size, got {b}")
    # LyCORIS's block position 2j + h holds PEFT's h * b/2 + j; R_peft = Cayley(-S), so B = -B_peft / 2
    order = torch.tensor([h * (b // 2) + j for j in range(b // 2) for h in (0, 1)])
    return OFTDelta(-half[..., order, :][..., :, order], rescale=s.reshape(-1, 1), on_input=True)


def _older(version: str, than: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[: len(than)]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits[:6]))
    return tuple(parts) < than


def finite_alpha(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise KindError(f"key {name}.alpha is {value}")
    return value
