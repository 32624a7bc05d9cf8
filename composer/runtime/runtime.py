"""Attach any number of adapters to a diffusers pipeline and drive them through mixing tensors.

``LoraRuntime`` patches each targeted module once (a ``PatchedLayer``), gives every adapter a slot
in two mixing tensors (denoiser and text encoders, A1111's unet/te multipliers), and keeps the
pipeline intact: detaching or disabling gives back the base model exactly.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from lora_composer.adapters.types import Adapter
from lora_composer.errors import AdapterMismatchError
from lora_composer.runtime.layer import PatchedLayer
from lora_composer.runtime.mixing import MixingState
from lora_composer.vocab import DENOISERS, TEXT_ENCODERS, layer_group, pipeline_family  # noqa: F401 (re-exported)


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``root.get_submodule(path)``, also across transformers' optional ``text_model.`` level."""
    for candidate in (path, "text_model." + path, path.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _check_sparse_fit(module: torch.nn.Module, delta) -> str | None:
    """Why a SHiRA ``delta`` cannot patch ``module`` (Linear or plain Conv2d; indices inside the weight), or None."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"is a {type(module).__name__}; sparse (SHiRA) deltas patch Linear and Conv2d layers"
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return f"is a grouped convolution (groups={module.groups})"
    if len(delta.shape) == 4 and tuple(delta.shape) != tuple(module.weight.shape):
        return f"conv sparse delta is {list(delta.shape)}, layer weight is {list(module.weight.shape)}"
    out_f, in_f = module.weight.shape[0], module.weight[0].numel()  # a conv kernel flattened: in * kh * kw
    idx = delta.indices
    if idx.numel() and (int(idx[0].max()) >= out_f or int(idx[1].max()) >= in_f or int(idx.min()) < 0):
        return f"sparse indices reach ({int(idx[0].max())}, {int(idx[1].max())}), layer weight is {out_f}x{in_f}"
    if len(delta.shape) == 2 and (delta.shape[0] > out_f or delta.shape[1] > in_f):
        return f"sparse delta is {delta.shape[0]}x{delta.shape[1]}, layer weight is {out_f}x{in_f}"
    if not torch.isfinite(delta.values).all():
        return "holds NaN or inf values"
    return None


def _check_fit(module: torch.nn.Module, delta) -> str | None:
    """Why ``delta`` cannot patch ``module``, or None if it fits (the delta's ``check`` says what its kind needs)."""
    if delta.is_sparse:
        return _check_sparse_fit(module, delta)
    if not isinstance(module, tuple(getattr(torch.nn, t) for t in delta.targets)):
        return f"is a {type(module).__name__}, not a {' or '.join(delta.targets)}"
    if module.weight is None:
        return f"is a {type(module).__name__} without a weight"
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return f"is a grouped convolution (groups={module.groups})"
    return delta.check(tuple(module.weight.shape))


_FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD3"}


def _another_model(adapter, components: dict) -> str | None:
    """One line for a file made for the same kind of model at other widths (a real SD1.5 LoRA on a small
    SD1.5-shaped model, a FLUX.1-dev LoRA on a narrower FLUX): most of its layers' input widths differ from the
    model's. Names what it was made for and the first misfit; None for a file with a stray bad layer."""
    misfits = []
    for key, delta in adapter.deltas.items():
        comp, _, path = key.partition(".")
        module = _resolve(components[comp], path) if comp in components else None
        width = getattr(module, "in_features", getattr(module, "in_channels", None))
        theirs = delta.in_width
        if width is not None and theirs >= 0 and theirs != width:
            misfits.append((key, theirs, int(width)))
    if not misfits or 2 * len(misfits) <= len(adapter.deltas):
        return None
    key, theirs, ours = misfits[0]
    made = _FAMILY_NAMES.get(adapter.family, "another model")
    return f"made for {made}-sized layers: {theirs}-wide {key} does not fit this model's {ours}-wide one (a LoRA for another model)"


def _finite(delta) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in delta.tensors().values() if t.is_floating_point())


def _add_dense(layer: PatchedLayer, slot: int, module: torch.nn.Module, delta) -> None:
    """Attach a dense-kind delta: through the stacked factors when its kind gives them for this weight (LoRA,
    and LoHa/LoKr whose exact factors are smaller than the weight), else as a dense delta taken against the
    module's (base) weight now."""
    weight = module.weight
    factors = delta.factors(tuple(weight.shape))
    if factors is not None:
        layer.add(slot, factors.down, factors.up, factors.scale)
        return
    bias = None if module.bias is None else module.bias.detach()
    with torch.no_grad():
        dw, db = delta.dense(weight.detach(), bias)
    at = None
    if not delta.linear:  # its delta at weight w is not w times the delta at 1: taken of the base weight as now
        base_w, base_b = weight.detach().clone(), None if bias is None else bias.clone()
        at = functools.partial(_dense_at, delta, base_w, base_b)
    layer.add_dense(slot, dw, db, at=at)


def _dense_at(delta, weight, bias, w: float):
    with torch.no_grad():
        return delta.dense_at(weight, bias, w)


class LoraRuntime:
    """Stacked multi-adapter state of one pipeline.

    - ``add(adapter)`` validates everything first, then patches: a bad adapter leaves nothing behind.
    - ``set_weights`` writes the mixing tensors (cheap: call it every step if you like).
    - ``fuse``/``unfuse`` fold the weighted deltas into the base weights, with a backup restored
      bit-identically; ``disable`` makes every patched layer return exactly its base output.
    """

    def __init__(self, pipe, reserve: int = 0):
        self.pipe = pipe
        # each patched layer's first allocation holds this many adapters of the first one's rank (a server sets
        # its residency cap: attaching up to that many then copies no stack); past it, stacks double
        self.reserve = int(reserve)
        self.family = pipeline_family(pipe)
        self.denoiser_mix = MixingState()
        self.text_mix = MixingState()
        self.adapters: dict[str, Adapter] = {}
        self.slots: dict[str, int] = {}
        self.layers: dict[str, PatchedLayer] = {}
        self.fused = False

    # -- adapters --------------------------------------------------------------------------------
    def _components(self) -> dict[str, torch.nn.Module]:
        return {
            name: getattr(self.pipe, name)
            for name in DENOISERS + TEXT_ENCODERS
            if isinstance(getattr(self.pipe, name, None), torch.nn.Module)
        }

    def _plan(self, adapter: Adapter) -> list[tuple[str, torch.nn.Module]]:
        """Match every delta to a module, or raise naming the first that does not fit."""
        where = adapter.path or adapter.name
        # a text-encoder-only file fits any pipeline whose text encoder it fits (the shapes below decide)
        text_only = all(key.partition(".")[0] in TEXT_ENCODERS for key in adapter.deltas)
        if adapter.family not in ("unknown", self.family) and self.family != "unknown" and not text_only:
            raise AdapterMismatchError(where, f"LoRA for {adapter.family}, but the pipeline is {self.family}")
        components = self._components()
        plan = []
        for key, delta in adapter.deltas.items():
            comp, _, path = key.partition(".")
            if comp not in components:
                raise AdapterMismatchError(where, f"targets '{comp}', which this pipeline does not have")
            module = _resolve(components[comp], path)
            if module is None:
                raise AdapterMismatchError(where, f"layer {key} does not exist in the pipeline")
            why = _check_fit(module, delta)
            if why:
                raise AdapterMismatchError(where, _another_model(adapter, components) or f"layer {key}: {why}")
            if not delta.is_sparse and not _finite(delta):
                raise AdapterMismatchError(where, f"layer {key} holds NaN or inf values")
            plan.append((key, module))
        return plan

    def add(self, adapter: Adapter) -> None:
        """Attach ``adapter`` with weight 0 in both mixing tensors (set weights to make it act)."""
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named '{adapter.name}' is already attached")
        plan = self._plan(adapter)
        refuse = self.fused
        if refuse:
            self.unfuse()
        slot = next(i for i in range(len(self.slots) + 1) if i not in self.slots.values())
        for mix in (self.denoiser_mix, self.text_mix):
            if slot >= mix.slots:
                mix.resize(slot + 1)
        for key, module in plan:
            layer = self.layers.get(key)
            if layer is None:
                comp = key.split(".", 1)[0]
                mixer = self.denoiser_mix if comp in DENOISERS else self.text_mix
                layer = self.layers[key] = PatchedLayer(module, mixer, layer_group(key), reserve=self.reserve)
            delta = adapter.deltas[key]
            if delta.is_sparse:
                # flat positions in this layer's weight (PEFT files carry no shape: use the module's)
                flat = delta.indices[0].long() * module.weight[0].numel() + delta.indices[1].long()
                flat, order = torch.sort(flat)
                values = delta.values.float()[order]
                uniq, inv = torch.unique_consecutive(flat, return_inverse=True)
                if uniq.numel() != flat.numel():  # repeated positions add up
                    values = torch.zeros(uniq.numel()).index_add_(0, inv, values)
                layer.add_sparse(slot, uniq, values, delta.scale)
            else:
                _add_dense(layer, slot, module, delta)
        self.adapters[adapter.name] = adapter
        self.slots[adapter.name] = slot
        if refuse:
            self.fuse()

    def remove(self, name: str) -> None:
        """Detach one adapter; layers no other adapter uses are unpatched."""
        slot = self.slots.pop(name)
        del self.adapters[name]
        refuse = self.fused
        if refuse:
            self.unfuse()
        for key in list(self.layers):
            layer = self.layers[key]
            if layer.holds(slot):
                if slot in layer.sparse:
                    layer.remove_sparse(slot)
                if slot in layer.dense:
                    layer.remove_dense(slot)
                if any(b.slot == slot for b in layer.blocks):
                    layer.remove(slot)
                if layer.empty:
                    layer.detach()
                    del self.layers[key]
        for mix in (self.denoiser_mix, self.text_mix):
            mix.set_slot(slot, 0.0)
        if refuse:
            self.fuse()

    def clear(self) -> None:
        """Detach every adapter: the pipeline is exactly as before."""
        self.unfuse()
        for layer in self.layers.values():
            layer.detach()
        self.layers.clear()
        self.adapters.clear()
        self.slots.clear()
        self.denoiser_mix = MixingState()
        self.text_mix = MixingState()

    # -- weights ---------------------------------------------------------------------------------
    def _vector(self, weights: dict[str, float]) -> torch.Tensor:
        unknown = set(weights) - set(self.slots)
        if unknown:
            raise KeyError(f"no attached adapter named {sorted(unknown)}; attached: {sorted(self.slots)}")
        vec = torch.zeros(self.denoiser_mix.slots)
        for name, w in weights.items():
            vec[self.slots[name]] = float(w)
        return vec

    def set_weights(self, unet: dict[str, float] | None = None, text: dict[str, float] | None = None) -> None:
        """Set per-adapter strengths; adapters not named get 0 (attached but inactive, and free)."""
        if unet is not None:
            self.denoiser_mix.set(self._vector(unet))
        if text is not None:
            self.text_mix.set(self._vector(text))
        if self.fused:
            self.fuse()

    def set_denoiser_rows(self, rows: torch.Tensor, layer_rows: dict[str, torch.Tensor] | None = None) -> None:
        """Per-batch-row denoiser weights ``[rows, slots]``, optionally per layer group (strategies call this per step)."""
        self.denoiser_mix.set(rows, layer_rows)

    def layer_groups(self) -> list[str]:
        """The denoiser layer groups that hold adapters, in model order."""
        seen = dict.fromkeys(layer.group for key, layer in self.layers.items() if key.split(".")[0] in DENOISERS)
        return list(seen)

    def prepare(self) -> None:
        """Refresh every layer's per-rank scales now instead of lazily on its next forward."""
        for layer in self.layers.values():
            layer.refresh()

    def disable(self) -> None:
        """Every patched layer returns exactly its base output (fused weights are restored)."""
        self.unfuse()
        self.denoiser_mix.set_enabled(False)
        self.text_mix.set_enabled(False)

    def enable(self) -> None:
        self.denoiser_mix.set_enabled(True)
        self.text_mix.set_enabled(True)

    # -- fused mode ------------------------------------------------------------------------------
    MEMORY_OP_FLOPS = 16  # one element read or written while folding, in multiply-adds (a CPU's rough ratio)

    def fuse_saves(self, steps: int, rows: int = 2, tokens: int | None = None) -> bool:
        """Whether folding the current weights into the base weights (and restoring them after) costs less
        than ``steps`` denoiser calls of ``rows`` batch rows through the low-rank path: the fold is one GEMM
        and a few passes over each live layer's weight, the per-step path two thin GEMMs per position.
        Each layer's positions per row are those of its last input (``tokens`` until a layer has run);
        text encoder layers run once per render, not per step."""
        if not (self.denoiser_mix.is_uniform and self.text_mix.is_uniform):
            return False
        fold = per_render = 0.0
        for key, layer in self.layers.items():
            mixer = layer.mixer
            live = mixer.active_slots if mixer.enabled else frozenset()
            if not (live and layer.holds_any(live)):
                continue
            weight = layer.module.weight
            out_f, in_f = weight.shape[0], weight[0].numel()
            r = sum(b.rank for b in layer.blocks if b.slot in live)
            dense = sum(1 for s in layer.dense if s in live)
            fold += 2.0 * out_f * in_f * (r + dense) + self.MEMORY_OP_FLOPS * 4.0 * out_f * in_f
            seen = layer.tokens if layer.tokens is not None else tokens
            if seen is None:
                continue
            calls = steps if key.split(".", 1)[0] in DENOISERS else 1
            per_render += calls * rows * seen * (2.0 * r * (in_f + out_f) + 2.0 * dense * in_f * out_f)
        return fold > 0 and per_render > fold

    def fuse(self) -> None:
        """Fold current weights into the base weights (zero per-call overhead until unfused)."""
        if not (self.denoiser_mix.is_uniform and self.text_mix.is_uniform):
            raise ValueError("per-row mixing weights cannot be fused; set one weight per adapter first")
        for mixer in (self.denoiser_mix, self.text_mix):
            mixer.active_slots  # computed here once, before worker threads read it
        _each_layer(self.layers.values(), lambda layer: layer.fuse(checked=True))
        self.fused = bool(self.layers)

    def unfuse(self) -> None:
        """Restore the backed-up base weights bit-identically."""
        _each_layer(self.layers.values(), PatchedLayer.unfuse)
        self.fused = False


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="lora-composer-fuse")


def _each_layer(layers, fn) -> None:
    """``fn(layer)`` for every layer, without autograd; CPU layers holding only SHiRA adapters in parallel.

    Their fuse/unfuse is a scatter of a few percent of the weight: bound by memory latency, and torch runs a
    1-D scatter on one thread. Spread over torch's CPU threads (whole layers per thread, so no two threads
    write one weight), a switch takes about 1/threads of the time. Layers with low-rank factors fold with a
    GEMM that torch already parallelises: they stay on this thread.
    """
    threads = torch.get_num_threads()
    scatter, rest = [], []
    for layer in layers:
        only_sparse = layer.sparse and not layer.blocks and not layer.dense and layer.module.weight.device.type == "cpu"
        (scatter if only_sparse else rest).append(layer)
    if threads < 2 or len(scatter) < 2:
        scatter, rest = [], scatter + rest

    def run(chunk) -> None:
        with torch.no_grad():  # grad mode is per thread
            for layer in chunk:
                fn(layer)

    pending = [_pool(threads).submit(run, scatter[i::threads]) for i in range(threads)] if scatter else []
    run(rest)
    for job in pending:
        job.result()
