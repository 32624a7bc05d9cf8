"""gated: training-free fine-grained gated fusion, weights per layer group and per timestep.

After AutoLoRA's fine-grained gated fusion (Li et al. 2025, arXiv:2508.02107), which weighs several
LoRAs differently across network layers and diffusion timesteps. AutoLoRA learns its gate; here the gate
is read off the adapters themselves, once per generation, from how strongly each one reacts to the prompt:

1. **Response.** For layer group ``g`` (``lora_composer.runtime.layer_group``) and adapter ``i``, over the
   cross-attention key/value layers ``attn2.to_k``/``attn2.to_v`` of the group (those any of the adapters
   patch; an adapter without a delta there counts 0)::

       r[g, i] = mean over layers, tokens of  ||dW e|| / ||e||,     dW = alpha / rank * up @ down

   with ``e`` the prompt's token embeddings as the denoiser receives them (``encoder_hidden_states``,
   conditional half of the CFG batch). Those two layers are the only ones that read the prompt, so this
   is how much each adapter changes what the prompt contributes in that block. It costs two rank-``r``
   matmuls per layer, once. Groups without cross-attention (ResNet-only blocks) get the mean of the
   groups that have it; layers whose input width is not the embeddings' (an ``encoder_hid_proj`` in
   between) are skipped; an adapter with no key/value delta anywhere gets a neutral gate.
2. **Gates.** With ``per_adapter=True`` (default) each adapter's responses are first divided by their
   mean over groups: the gate follows *where* an adapter concentrates, not how loud it is overall, since
   its overall strength is the user's weight (``alpha`` or a strong training run would otherwise win every
   block). Then, per group, across the ``n`` adapters::

       gate[g, i] = n * softmax_i(log r[g, i] / temperature)     (mean 1 over the adapters of a group)

   ``temperature=1`` makes gates proportional to the responses, larger values flatten them,
   ``temperature=inf`` makes every gate 1 (exactly merge); smaller values sharpen towards one adapter
   per block.
3. **Timestep.** The gate acting at a step is ``1 + s(t) * (gate - 1)``, a blend between merge (1) and
   the full gate. ``s`` follows the noise level ``u = t / num_train_timesteps`` (1 at the start, 0 at the
   end; the step fraction when the timestep is unknown): ``schedule="early"`` (default) ``s = strength *
   u**power``, ``"late"`` ``s = strength * (1 - u)**power``, ``"constant"`` ``s = strength``. The default
   follows eDiff-I (Balaji et al. 2022, arXiv:2211.01324): early in sampling the image relies strongly on
   the text prompt, later the text conditioning is almost ignored. The gates are derived from the
   prompt's path, so they act in full where that path drives the image and fade to the user's plain
   weights where it no longer does; ``"late"`` gives the opposite reading (route fine detail, keep the
   layout a plain merge).
4. **Weights.** Adapter ``i`` gets ``user_weight[i] * gate`` in each layer group, so a gate of 1 is
   merge and the user's weights keep their meaning. The whole batch shares them (one row group).

Every step's gates are kept in ``trace`` (``[layer groups, adapters]``, order in ``layer_groups``) and, as
weights, in the driver's ``history`` (``plan.layer_weights``): a layer-group x adapter heatmap per step.
Text-encoder weights are not gated.

**DiT pipelines (FLUX.1, SD3).** They have no ``attn2``: the prompt enters through the joint attention, where
image and text tokens attend to each other in one softmax (FLUX.1's double-stream blocks, whose
``add_k_proj`` projects the text tokens, and its single-stream blocks, where the first tokens of the one
sequence are the text; SD3's joint blocks). There the response of step 1 is read off that attention, per
block and per denoiser call, from the adapters' trigger words (``metadata.trigger_words``)::

    r[g, i] = mean over conditional rows, heads, image queries q, and the text positions k of adapter i's
              trigger words in the prompt, of  softmax over all keys(q . k / sqrt(d))[k]

the attention one image token pays one of the adapter's trigger tokens, with the queries and keys the
block's attention itself computed (its projections with the adapters acting, its q/k norms, FLUX's
rotary embedding). An adapter whose trigger words are all absent from the prompt gets 0 (gated down); one
without trigger words gets a neutral gate 1 and takes no part in the softmax; with fewer than two adapters
that have trigger words every gate is 1. Groups without joint attention get the mean of the measured
ones. Step 2 is ``gates_from_responses(r, temperature, per_adapter=False)``: attention shares are already
comparable across adapters (fractions of one softmax), so ``per_adapter`` applies to the UNet path only.
A gate is measured during one denoiser call and acts from the next (the attention that measures it runs
through the weights it sets): the first call runs at the user's weights. Steps 3 and 4 are unchanged.
The measure runs in ``patched()``: each joint attention's processor is wrapped (the original computes the
output, untouched) and forward hooks on its ``to_q``/``to_k``/``add_k_proj`` keep their outputs for the
measure; the pipeline's ``encode_prompt`` is wrapped to read the prompt whose token positions are needed.
All three are undone on exit (the very same processor objects back, hooks removed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re

import torch

from lora_composer.adapters.kinds import has_factors
from lora_composer.vocab import CROSS_ATTENTION_KV as KV_SUFFIXES
from lora_composer.vocab import DENOISERS, layer_group, pipeline_family
from lora_composer.fusion.base import StepPlan, Strategy

SCHEDULES = ("early", "late", "constant")
_FLOOR = 1e-6  # responses below this (relative) count as "no reaction" rather than log(0)
_CHUNK = 1 << 24  # attention probabilities held at once while measuring (elements; queries are chunked)
JOINT_BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # FLUX.1 / SD3 joint, FLUX.1 single stream


def layer_response(down: torch.Tensor, up: torch.Tensor, scale: float, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||scale * up @ down @ e|| / ||e||`` for ``embeddings [..., tokens, in]``."""
    e = embeddings.reshape(-1, embeddings.shape[-1]).float()
    down = down.to(e.device, torch.float32)
    up = up.to(e.device, torch.float32)
    out = (e @ down.T) @ up.T * float(scale)
    return (out.norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-12)).mean()


def prompt_responses(adapters, groups: list[str], embeddings: torch.Tensor) -> torch.Tensor:
    """``r[g, i]`` (see the module doc) for ``adapters`` (each with ``deltas``) over layer ``groups``."""
    width = embeddings.shape[-1]
    keys = {
        key
        for ad in adapters
        for key, d in ad.deltas.items()
        if key.split(".", 1)[0] in DENOISERS
        and key.endswith(KV_SUFFIXES)
        and has_factors(d)
        and d.down.dim() == 2
        and d.down.shape[1] == width
    }
    by_group: dict[str, list[str]] = {}
    for key in sorted(keys):
        by_group.setdefault(layer_group(key), []).append(key)
    r = torch.zeros(len(groups), len(adapters))
    has = torch.zeros(len(groups), dtype=torch.bool)
    for g, group in enumerate(groups):
        layer_keys = by_group.get(group, [])
        if not layer_keys:
            continue
        has[g] = True
        for i, ad in enumerate(adapters):
            total = sum(
                float(layer_response(d.down, d.up, d.scale, embeddings))
                for d in (ad.deltas.get(k) for k in layer_keys)
                if d is not None and has_factors(d)
            )
            r[g, i] = total / len(layer_keys)
    if has.any():
        r[~has] = r[has].mean(dim=0)
    return r


def gates_from_responses(responses: torch.Tensor, temperature: float = 1.0, per_adapter: bool = True) -> torch.Tensor:
    """``[groups, adapters]`` responses -> gates with mean 1 over the adapters of each group."""
    groups, n = responses.shape
    if math.isinf(temperature) or n == 0:
        return torch.ones(groups, n)
    r = responses.double()
    if per_adapter:
        mean = r.mean(dim=0, keepdim=True)
        r = torch.where(mean > 0, r / mean.clamp_min(1e-300), torch.ones_like(r))  # no reaction at all: neutral
    else:
        top = r.max()
        r = r / top if top > 0 else torch.ones_like(r)
    logits = r.clamp_min(_FLOOR).log() / temperature
    return (n * torch.softmax(logits, dim=1)).float()


# -- DiT pipelines: gates from the joint attention's text tokens ------------------------------------------
def trigger_spans(prompt: str, words) -> list[tuple[int, int]]:
    """Character spans of ``words`` in ``prompt`` (case-insensitive, whole words: "red" not in "redo")."""
    spans = []
    for word in words:
        word = word.strip()
        if word:
            pattern = r"(?<!\w)" + re.escape(word) + r"(?!\w)"
            spans += [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]
    return spans


def token_positions(tokenizer, text: str, spans, max_length: int) -> list[int]:
    """Positions of the tokens covering ``spans``, tokenized as the pipelines do (padded to ``max_length``)."""
    if not spans:
        return []
    try:
        enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a tokenizer without offsets: positions unknown
        return []
    return [j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s and any(s < b and e > a for a, b in spans)]


def text_stream_positions(pipe, call: dict, words, text_len: int) -> list[int] | None:
    """Where ``words`` sit among the ``text_len`` text tokens the transformer receives, for the arguments of
    the pipeline's ``encode_prompt`` call (``call``). FLUX.1: T5 tokens only; SD3: the CLIP tokens (both CLIPs
    side by side, 77 positions) then T5's. ``None`` when the layout is not one of these."""
    prompt = call.get("prompt")
    if not isinstance(prompt, str):
        return None
    family = pipeline_family(pipe)
    length = int(call.get("max_sequence_length") or 0)
    if family == "flux":
        parts = [(0, getattr(pipe, "tokenizer_2", None), call.get("prompt_2") or prompt, length)]
        total = length
    elif family == "sd3":
        clip = int(getattr(pipe, "tokenizer_max_length", 77))
        parts = [
            (0, getattr(pipe, "tokenizer", None), prompt, clip),
            (0, getattr(pipe, "tokenizer_2", None), call.get("prompt_2") or prompt, clip),
        ]
        if getattr(pipe, "text_encoder_3", None) is not None:
            parts.append((clip, getattr(pipe, "tokenizer_3", None), call.get("prompt_3") or prompt, length))
        total = clip + length if getattr(pipe, "text_encoder_3", None) is not None else text_len
    else:
        return None
    if total != text_len or any(tok is None for _, tok, _, _ in parts):
        return None
    positions = {
        offset + j for offset, tok, text, n in parts for j in token_positions(tok, text, trigger_spans(text, words), n)
    }
    return sorted(p for p in positions if p < text_len)


def trigger_attention(queries: torch.Tensor, keys: torch.Tensor, positions) -> torch.Tensor:
    """``[adapters]``: mean over rows, heads and queries of the mean attention probability on each adapter's
    key ``positions`` (``queries [rows, q, heads, d]``, ``keys [rows, k, heads, d]``; softmax over all keys,
    scale ``1/sqrt(d)`` as in scaled dot-product attention). An empty position list gives 0."""
    q = queries.transpose(1, 2).float()
    k = keys.transpose(1, 2).float()
    rows, heads, n_q, d = q.shape
    sums = torch.zeros(len(positions), dtype=torch.float64)
    index = [torch.as_tensor(p, dtype=torch.long, device=k.device) for p in positions]
    step = max(1, _CHUNK // max(1, rows * heads * k.shape[2]))
    for start in range(0, n_q, step):
        probs = torch.softmax(q[:, :, start : start + step] @ k.transpose(-1, -2) * d**-0.5, dim=-1)
        for i, idx in enumerate(index):
            if idx.numel():
                sums[i] += float(probs.index_select(-1, idx).mean(-1).sum())
    return (sums / (rows * heads * n_q)).float()


def joint_attentions(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """``(layer group, attention, single stream)`` for every joint attention of a FLUX.1/SD3 transformer whose
    processor is a plain object (a processor that is a module, such as an IP-Adapter's, is left alone)."""
    found = []
    for name, module in denoiser.named_modules():
        parts = name.split(".")
        if (
            len(parts) == 3
            and parts[0] in JOINT_BLOCKS
            and parts[2] == "attn"
            and hasattr(module, "processor")
            and not isinstance(module.processor, torch.nn.Module)
            and hasattr(module, "to_k")
        ):
            single = parts[0] == "single_transformer_blocks"
            if single or getattr(module, "add_k_proj", None) is not None:
                found.append((layer_group(f"{DENOISERS[1]}.{name}.to_q"), module, single))
    return found


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def _rope(x: torch.Tensor, rotary, start: int) -> torch.Tensor:
    """FLUX's rotary embedding on ``x [rows, tokens, heads, d]``, whose tokens are positions ``start...``."""
    from diffusers.models.embeddings import apply_rotary_emb

    n = x.shape[1]
    if isinstance(rotary, (tuple, list)):
        rotary = tuple(r[start : start + n] for r in rotary)
    else:
        rotary = rotary[start : start + n]
    return apply_rotary_emb(x, rotary, sequence_dim=1)


class _AttentionProbe:
    """Stands in for one joint attention's processor: the original computes the output (untouched), then the
    attention image tokens pay each adapter's trigger tokens is measured from the queries and keys the
    original computed (kept by forward hooks on the projections)."""

    def __init__(self, strategy: "GatedStrategy", group: str, processor, single: bool):
        self.strategy = strategy
        self.group = group
        self.processor = processor
        self.single = single
        self.kept: dict[str, torch.Tensor] = {}

    def keep(self, name: str):
        def hook(module, args, output):
            self.kept[name] = output

        return hook

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        self.kept = {}
        if image_rotary_emb is not None:  # FLUX calls positionally, SD3 by keyword: call the original alike
            out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        else:
            out = self.processor(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        kept, self.kept = self.kept, {}
        positions = self.strategy._positions
        if attention_mask is None and positions and any(p for p in positions if p) and "to_q" in kept:
            with torch.no_grad():
                self.measure(attn, kept, encoder_hidden_states, image_rotary_emb, positions)
        return out

    def measure(self, attn, kept, encoder_hidden_states, rotary, positions) -> None:
        heads = attn.heads
        q, k = _heads(kept["to_q"], heads), _heads(kept["to_k"], heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        if self.single:  # one sequence, text first
            n_text = self.strategy._text_len
            if n_text is None or n_text >= q.shape[1]:
                return
            q = q[:, n_text:]
        else:
            if encoder_hidden_states is None or "add_k_proj" not in kept:
                return
            n_text = encoder_hidden_states.shape[1]
            text_k = _heads(kept["add_k_proj"], heads)
            if getattr(attn, "norm_added_k", None) is not None:
                text_k = attn.norm_added_k(text_k)
            k = torch.cat([text_k, k], dim=1)  # text first, as FLUX orders them (SD3's order does not matter)
        if rotary is not None:  # FLUX: rotary positions run over [text, image]
            q, k = _rope(q, rotary, n_text), _rope(k, rotary, 0)
        rows = self.strategy._conditional_rows(q.shape[0])
        self.strategy._record(self.group, trigger_attention(q[rows], k[rows], [p or [] for p in positions]))


class GatedStrategy(Strategy):
    """Per layer group, per timestep adapter weights from each adapter's response to the prompt.

    - ``temperature`` (1.0): softness of the gates across adapters; 1 = proportional to the responses,
      ``inf`` = all gates 1 (merge).
    - ``strength`` (1.0, in [0, 1]): how far the gates move from merge at the schedule's peak.
    - ``schedule`` ("early"): when the gates act, ``early`` (full at high noise, merge at the end),
      ``late`` (the reverse) or ``constant``.
    - ``power`` (1.0): shape of the schedule's ramp (1 linear, larger = the gates act over a shorter span).
    - ``per_adapter`` (True): compare where adapters react rather than how loud they are (UNet path).

    On FLUX.1 and SD3 the responses come from the joint attention on each adapter's trigger words, measured
    while ``patched()`` is active (module doc); ``attention`` keeps each call's ``[layer groups, adapters]``.
    """

    name = "gated"
    measured = "close to merge: ahead at 2 LoRAs (0.83 vs 0.80), behind at 4 (0.26 vs 0.34)"

    def __init__(
        self,
        temperature: float = 1.0,
        strength: float = 1.0,
        schedule: str = "early",
        power: float = 1.0,
        per_adapter: bool = True,
    ):
        self.temperature = float(temperature)
        self.strength = float(strength)
        self.schedule = str(schedule)
        self.power = float(power)
        self.per_adapter = bool(per_adapter)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (inf for merge), got {temperature}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not self.power >= 0:
            raise ValueError(f"power must be >= 0, got {power}")
        self.layer_groups: list[str] = []
        self.responses: torch.Tensor | None = None
        self.gates: torch.Tensor | None = None
        self.trace: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []  # DiT: each call's r[g, i] from the joint attention
        self._dit = False

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        super().begin(adapters, weights, num_steps, context)
        self.responses = None
        self.gates = None
        self.trace = []
        self.layer_groups = list(self.context.layer_groups)
        self.train_timesteps = int(self.context.num_train_timesteps or 1000)
        self.attention = []
        self._dit = False
        self._prompt_call: dict | None = None  # the arguments of the pipeline's encode_prompt call
        self._positions: list[list[int] | None] | None = None  # per adapter; None: no trigger words known
        self._text_len: int | None = None
        self._measured: dict[str, list[torch.Tensor]] = {}

    def _adapter_objects(self) -> list:
        try:
            return [self.context.adapter(name) for name in self.adapters]
        except KeyError:  # a hand-built context without the Adapter objects: neutral gates
            return []

    def _conditional(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The conditional half of a CFG batch (diffusers concatenates [negative, positive])."""
        cfg = self.context.cfg
        if cfg is None:  # unknown: an even batch of more than one row is taken for [negative, positive]
            cfg = embeddings.shape[0] % 2 == 0 and embeddings.shape[0] > 1
        if cfg and embeddings.shape[0] > 1:
            return embeddings[embeddings.shape[0] // 2 :]
        return embeddings

    def _conditional_rows(self, rows: int) -> slice:
        """The conditional rows of a batch of ``rows`` (see :meth:`_conditional`)."""
        cfg = self.context.cfg
        if cfg is None:
            cfg = rows % 2 == 0 and rows > 1
        return slice(rows // 2, rows) if cfg and rows > 1 else slice(0, rows)

    def _record(self, group: str, values: torch.Tensor) -> None:
        self._measured.setdefault(group, []).append(values)

    def _trigger_positions(self) -> list[list[int] | None]:
        """Per adapter, its trigger words' positions in the transformer's text tokens (``None``: none known)."""
        out: list[list[int] | None] = []
        for ad in self._adapter_objects() or [None] * len(self.adapters):
            words = [w for w in getattr(getattr(ad, "metadata", None), "trigger_words", []) if w.strip()]
            found = None  # no trigger words, or the prompt or its token layout unknown: a neutral gate
            if words and self._prompt_call and self._text_len is not None:
                found = text_stream_positions(self.context.pipe, self._prompt_call, words, self._text_len)
            out.append(found)
        return out

    def dit_gates(self, responses: torch.Tensor) -> torch.Tensor:
        """Gates from the joint attention's responses: the adapters with trigger words share a softmax, the
        others stay at 1 (module doc)."""
        gates = torch.ones(len(self.layer_groups), len(self.adapters))
        known = [i for i, p in enumerate(self._positions or []) if p is not None]
        if len(known) > 1:
            gates[:, known] = gates_from_responses(responses[:, known], self.temperature, per_adapter=False)
        return gates

    def _observe_dit(self, inputs: dict) -> None:
        """Gates for this call from the attention measured during the previous one (module doc)."""
        text = inputs.get("encoder_hidden_states")
        if isinstance(text, torch.Tensor) and text.dim() == 3:
            self._text_len = int(text.shape[1])
        if self._positions is None:
            self._positions = self._trigger_positions()
        measured, self._measured = self._measured, {}
        rows = {g: torch.stack(v).mean(0) for g, v in measured.items() if g in self.layer_groups}
        if rows:
            r = torch.zeros(len(self.layer_groups), len(self.adapters))
            has = torch.zeros(len(self.layer_groups), dtype=torch.bool)
            for g, values in rows.items():
                r[self.layer_groups.index(g)], has[self.layer_groups.index(g)] = values, True
            r[~has] = r[has].mean(dim=0)
            self.responses = r
            self.attention.append(r)
            self.gates = self.dit_gates(r)
        elif self.gates is None:  # nothing measured yet: the user's weights
            self.gates = torch.ones(len(self.layer_groups), len(self.adapters))

    def observe(self, step: int, timestep: float | None, inputs: dict) -> None:
        if self._dit:
            return self._observe_dit(inputs)
        if self.responses is not None:
            return
        embeddings = inputs.get("encoder_hidden_states")
        adapters = self._adapter_objects() if self.adapters else []
        if not self.layer_groups:  # no runtime given: the layer groups the adapters patch
            self.layer_groups = list(
                dict.fromkeys(layer_group(k) for ad in adapters for k in ad.deltas if k.split(".", 1)[0] in DENOISERS)
            )
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() >= 2 and adapters:
            with torch.no_grad():
                self.responses = prompt_responses(adapters, self.layer_groups, self._conditional(embeddings.detach()))
        else:  # nothing to react to: neutral gates
            self.responses = torch.ones(len(self.layer_groups), len(self.adapters))
        self.gates = gates_from_responses(self.responses, self.temperature, self.per_adapter)

    def patches(self, denoiser: torch.nn.Module) -> bool:
        """Only a FLUX.1/SD3 transformer is patched (its joint attentions measured); a UNet is left as it is, so
        UNet renders share the server's denoiser passes."""
        return bool(joint_attentions(denoiser))

    def patched(self, denoiser: torch.nn.Module):
        """On a FLUX.1/SD3 transformer: the joint attentions measured (module doc); on a UNet: nothing."""
        found = joint_attentions(denoiser)
        if not found:
            return contextlib.nullcontext()
        return self._probing(found)

    @contextlib.contextmanager
    def _probing(self, found):
        saved, handles = [], []
        pipe = self.context.pipe
        own = pipe is not None and "encode_prompt" in vars(pipe)
        before = vars(pipe).get("encode_prompt") if pipe is not None else None
        try:
            for group, attn, single in found:
                probe = _AttentionProbe(self, group, attn.processor, single)
                saved.append((attn, attn.processor))
                attn.processor = probe
                for name in ("to_q", "to_k", "add_k_proj"):
                    layer = getattr(attn, name, None)
                    if isinstance(layer, torch.nn.Module):
                        handles.append(layer.register_forward_hook(probe.keep(name)))
            if pipe is not None and callable(getattr(pipe, "encode_prompt", None)):
                vars(pipe)["encode_prompt"] = self._prompt_tap(pipe.encode_prompt)
            self._dit = True
            yield
        finally:
            for handle in handles:
                handle.remove()
            for attn, processor in saved:
                attn.processor = processor
            if pipe is not None:
                if own:
                    vars(pipe)["encode_prompt"] = before
                else:
                    vars(pipe).pop("encode_prompt", None)

    def _prompt_tap(self, encode_prompt):
        """``encode_prompt`` that first keeps its arguments (the first call: the prompt, not a negative one)."""
        signature = inspect.signature(encode_prompt)

        def tap(*args, **kwargs):
            if self._prompt_call is None:
                try:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    self._prompt_call = dict(bound.arguments)
                except TypeError:
                    self._prompt_call = {}
            return encode_prompt(*args, **kwargs)

        return tap

    def blend(self, step: int, timestep: float | None) -> float:
        """``s(t)``: 0 = merge, 1 = the full gates."""
        if self.schedule == "constant":
            return self.strength
        if timestep is not None:
            u = min(max(float(timestep) / self.train_timesteps, 0.0), 1.0)
        else:
            u = 1.0 - step / max(self.num_steps - 1, 1)
            u = min(max(u, 0.0), 1.0)
        x = u if self.schedule == "early" else 1.0 - u
        return self.strength * x**self.power

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        weights = self.user_weights.unsqueeze(0)
        if self.gates is None:  # plan without observe (a driver that gives no inputs): merge
            self.observe(step, timestep, {})
        s = self.blend(step, timestep)
        gates = torch.ones_like(self.gates) if s == 0.0 else 1.0 + s * (self.gates - 1.0)
        self.trace.append(gates)
        layer_weights = {g: (self.user_weights * gates[k]).unsqueeze(0) for k, g in enumerate(self.layer_groups)}
        return StepPlan(weights, layer_weights=layer_weights or None)

    def describe(self) -> dict:
        temperature = "inf" if math.isinf(self.temperature) else self.temperature
        return {
            "temperature": temperature,
            "strength": self.strength,
            "schedule": self.schedule,
            "power": self.power,
            "per_adapter": self.per_adapter,
        }
