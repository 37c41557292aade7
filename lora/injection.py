"""Forward-hook injection: named LoRA adapters on a frozen model, merge/unmerge, removal.

The base model is never rebuilt: each targeted nn.Linear keeps its identity, parameters and
state_dict keys; a forward hook returns ``output + Σ delta(input)`` over the adapters that are
active and not merged. The adapters live in this object's own ModuleDict, keyed by module path,
so moving the model does not move them: ``injection.to(device)`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import mixed_batch
from .config import LoRAConfig
from .dora import MAGNITUDE_KEY, AdapterConflictError, DoRALinear, frozen_weight
from .init_methods import initialise_from_weights
from .layer import LoRALinear
from .quantized_linear import QuantizedLinear
from .targets import (
    candidate_summary,
    first_match,
    linear_modules,
    resolve_targets,
    select_targets,
    unmatched_patterns,
)
from .token_rows import TokenRows

# module path -> (r, alpha): the resolved shape of one adapter.
AdapterSpec = dict[str, tuple[int, float]]


def resolve_spec(model: nn.Module, config: LoRAConfig) -> AdapterSpec:
    """Per-module (r, alpha) for the Linears ``config.targets`` selects, patterns applied; a
    pattern that selects none of them is a ValueError (a typo would silently change nothing)."""
    paths = select_targets(model, config.targets)
    for kind, patterns in (("rank", config.rank_pattern), ("alpha", config.alpha_pattern)):
        if unmatched := unmatched_patterns(paths, patterns):
            raise ValueError(
                f"{kind} pattern {unmatched[0]!r} (--{kind}-pattern) selects none of the "
                f"{len(paths)} Linear layers the LoRA targets select; they are:\n  "
                f"{candidate_summary(paths)}")
    spec = {}
    for path in paths:
        r = first_match(path, config.rank_pattern)
        alpha = first_match(path, config.alpha_pattern)
        spec[path] = (int(r or config.r), float(config.alpha if alpha is None else alpha))
    return spec


class AdapterSet(nn.Module):
    """The LoRALinear layers of one named adapter, keyed by module path (and its token rows)."""

    def __init__(self, config: LoRAConfig, layers: dict[str, LoRALinear]) -> None:
        super().__init__()
        self.config = config
        self.paths = list(layers)
        # ModuleDict keys may not contain '.', so paths are stored with '/'.
        self.layers = nn.ModuleDict({p.replace(".", "/"): m for p, m in layers.items()})
        self.token_rows: TokenRows | None = None  # config.trainable_tokens' embedding rows
        # PiSSA/OLoRA: path -> (A0, B0), the values at init, for conversion (lora.init_methods)
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def items(self) -> Iterator[tuple[str, LoRALinear]]:
        """(module path, LoRALinear) pairs in model order."""
        return zip(self.paths, self.layers.values(), strict=True)  # type: ignore[return-value]


def _device(linear: nn.Module) -> torch.device:
    return linear.weight.device if isinstance(linear, nn.Linear) else linear.device


def _moved(path: str, adapter: torch.device, other: torch.device, what: str) -> RuntimeError:
    return RuntimeError(
        f"LoRA adapter on {path} is on {adapter} but its {what} is on {other}: the model moved "
        f"after injection; call injection.to({str(other)!r}) too (adapters live in the "
        "injection, not in the model)")


def _make_hook(path: str, layers: list[LoRALinear]) -> Callable:
    # The device check costs ~0.1 µs per call (a hook call is ~17 µs on tiny tensors); without
    # it, a model moved to cuda fails deep in F.linear and one moved to meta passes silently.
    if len(layers) == 1:  # the common case: no loop on the hot path
        (layer,) = layers
        if isinstance(layer, DoRALinear):  # alone on its Linear (_dora_conflicts)

            def dora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if args[0].device != layer.A.device:
                    raise _moved(path, layer.A.device, args[0].device, "input")
                return layer(args[0], module.training, output, module)

            return dora_hook

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if args[0].device != layer.A.device:
                raise _moved(path, layer.A.device, args[0].device, "input")
            return layer(args[0], module.training, output)

        return hook

    def hook_many(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if args[0].device != layer.A.device:
                raise _moved(path, layer.A.device, args[0].device, "input")
            output = layer(args[0], module.training, output)
        return output

    return hook_many


def _conflict_hook(why: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        raise AdapterConflictError(why)

    return hook


class LoRAInjection(nn.Module):
    """Named adapters hooked into a frozen ``model``; ``remove()`` restores it exactly.

    Creating it freezes every base parameter (their old ``requires_grad`` flags come back on
    remove). Only adapter parameters are trainable. The model is not registered as a
    submodule, so ``self.state_dict()`` and ``self.parameters()`` hold adapters only, and
    ``model.to(device)`` leaves them behind: move them with ``injection.to(device)`` (hooks and
    merge refuse a mismatch with a message saying so). Changing the model's dtype needs nothing:
    adapters stay fp32 and compute in the input's dtype. Invariant: ``merged ⊆ active``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: not a submodule
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self._linears = linear_modules(model)
        self._hooks: dict[str, RemovableHandle] = {}
        self._token_hooks: list[RemovableHandle] = []
        self._backups: dict[str, torch.Tensor] = {}  # pre-merge weights, for exact unmerge
        self._originals: dict[str, torch.Tensor] = {}  # weights PiSSA/OLoRA replaced by residuals
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoRAConfig, activate: bool = True) -> AdapterSet:
        """A fresh adapter (B = 0: outputs unchanged) on the Linears that ``config`` selects.

        The adapter keeps ``config`` with ``auto`` resolved, so its file names the presets used.
        ``config.init`` pissa/olora starts it from the base weights instead, which then hold their
        residuals until the adapter is deleted (outputs still unchanged; lora.init_methods).
        """
        config = dataclasses.replace(config, targets=resolve_targets(self.model, config.targets))
        adapter = self.attach(name, config, resolve_spec(self.model, config), activate=activate)
        if config.init != "default":
            try:
                initialise_from_weights(self, name)
            except ValueError:
                self.delete_adapter(name)
                raise
        return adapter

    def attach(
        self,
        name: str,
        config: LoRAConfig,
        spec: AdapterSpec,
        state: dict[str, torch.Tensor] | None = None,
        activate: bool = True,
    ) -> AdapterSet:
        """Build adapter ``name`` from a resolved spec, optionally filling A/B from ``state``.

        ``state`` maps ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` (and, with DoRA,
        ``<path>.lora_magnitude_vector``; with trainable_tokens, the token rows' key) to tensors
        whose shapes the caller has already validated.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists; delete it first")
        rows = TokenRows.for_model(self.model, config.trainable_tokens) \
            if config.trainable_tokens else None
        if rows is not None and state is not None:
            with torch.no_grad():
                rows.delta.copy_(state[rows.key])
        layers = {}
        kind = DoRALinear if config.dora else LoRALinear
        for path, (r, alpha) in spec.items():
            base = self._linears.get(path)
            if base is None:
                raise KeyError(f"{path!r} is not an nn.Linear of {type(self.model).__name__}")
            layer = kind(base.in_features, base.out_features, r, alpha, config.dropout,
                         config.rslora, device=_device(base))
            if state is not None:
                with torch.no_grad():
                    layer.A.copy_(state[f"{path}.lora_A.weight"])
                    layer.B.copy_(state[f"{path}.lora_B.weight"])
                    if config.dora:
                        layer.magnitude.copy_(state[f"{path}.{MAGNITUDE_KEY}"])
            elif config.dora:
                layer.init_magnitude(frozen_weight(base))
            layers[path] = layer
        self.adapters[name] = AdapterSet(config, layers)
        self.adapters[name].token_rows = rows
        if activate:
            self.active.append(name)
        self._refresh_hooks()
        return self.adapters[name]

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first if merged; base weights it replaced come
        back)."""
        self._get(name)
        if name in self.merged:
            self.unmerge([name])
        self.restore_base_weights(self._get(name).initial)
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]
        self._refresh_hooks()

    def set_active(self, names: str | Iterable[str]) -> None:
        """Exactly these adapters contribute to the forward pass (an empty list: none).

        A merged adapter left out is unmerged first, so its delta leaves W too; a newly active
        adapter hooks (``merge()`` folds it in).
        """
        names = list(dict.fromkeys([names] if isinstance(names, str) else names))
        for n in names:
            self._get(n)
        self.unmerge([n for n in self.merged if n not in names])
        self.active = names
        self._refresh_hooks()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Base-model outputs inside the block; every adapter as it was after it (errors too).

        Merged adapters are unmerged on entry and merged again on exit, so W comes back
        bit-identical where merge kept a backup (``exact_unmerge=True``), otherwise within a few
        roundings of W's dtype. Changes made inside the block (set_active, merge) are undone.
        While a PiSSA/OLoRA adapter exists, W holds its residual: lora.init_methods.to_plain
        first for the original base's outputs.
        """
        active, merged, backups = list(self.active), list(self.merged), dict(self._backups)
        self.set_active([])
        try:
            yield
        finally:
            self.set_active([])
            self.active = [n for n in active if n in self.adapters]
            merged = [n for n in merged if n in self.active]
            paths = {p for n in merged for p in self._get(n).paths}
            with torch.no_grad():  # the kept backups: W bit-exact, and no second copy
                for path in paths & set(backups):
                    self._linears[path].weight.copy_(backups[path])
                    self._backups[path] = backups[path]
            for name in merged:
                self._fold(name, ())
            self._refresh_hooks()

    def per_sample(self, names: Sequence[str | None]) -> AbstractContextManager[None]:
        """``with injection.per_sample(["a", None, "b"]):`` sample i of each forward uses
        adapter ``names[i]`` (None: the base), in one batched forward (lora/mixed_batch.py)."""
        return mixed_batch.per_sample(self, names)

    def set_scale(self, name: str, multiplier: float) -> None:
        """Scale adapter ``name``'s delta by ``multiplier`` × alpha/r (1.0 restores it)."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before changing its scale")
        for _, layer in self._get(name).items():
            layer.scale = layer.base_scale * multiplier

    @torch.no_grad()
    def replace_base_weight(self, path: str, weight: torch.Tensor) -> None:
        """Linear ``path``'s weight := ``weight`` (a PiSSA/OLoRA residual), keeping the original
        for ``restore_base_weights`` (delete_adapter and remove call it)."""
        current = self._linears[path].weight
        self._originals.setdefault(path, current.detach().clone())
        current.copy_(weight)

    @torch.no_grad()
    def restore_base_weights(self, paths: Iterable[str]) -> None:
        """The original weights of ``paths`` that replace_base_weight replaced, bit-exact."""
        for path in [p for p in paths if p in self._originals]:
            self._linears[path].weight.copy_(self._originals.pop(path))
    def _dora_conflicts(self, names: list[str]) -> dict[str, str]:
        """{path: why} for the Linears where a DoRA adapter of ``names`` meets another one.

        DoRA rescales its Linear's whole output, so what it computes next to another adapter
        would depend on their order, and merged would differ from hooked. Such a set may be
        active (eval.py loads every adapter, then runs one at a time), but a forward pass
        through such a Linear, or a merge, raises AdapterConflictError.
        """
        owners: dict[str, list[tuple[str, LoRALinear]]] = {}
        for name in names:
            for path, layer in self._get(name).items():
                owners.setdefault(path, []).append((name, layer))
        conflicts = {}
        for path, sharing in owners.items():
            dora = [n for n, layer in sharing if isinstance(layer, DoRALinear)]
            if dora and len(sharing) > 1:
                other = next(n for n, _ in sharing if n != dora[0])
                conflicts[path] = (
                    f"DoRA adapter {dora[0]!r} and adapter {other!r} are both active on {path}: "
                    "DoRA rescales the Linear's whole output, so it must be the only active "
                    "adapter there; use one at a time")
        return conflicts

    def _get(self, name: str) -> AdapterSet:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; have {list(self.adapters)}")
        return self.adapters[name]  # type: ignore[return-value]

    # --- hooks ----------------------------------------------------------------------------
    def _refresh_hooks(self) -> None:
        """One hook per Linear that has an active, unmerged adapter; none anywhere else."""
        wanted: dict[str, list[LoRALinear]] = {}
        for name in self.active:
            if name not in self.merged:
                for path, layer in self._get(name).items():
                    wanted.setdefault(path, []).append(layer)
        for handle in [*self._hooks.values(), *self._token_hooks]:
            handle.remove()
        conflicts = self._dora_conflicts(self.active)  # merged ones included: W holds them
        self._hooks = {
            path: self._linears[path].register_forward_hook(
                _conflict_hook(conflicts[path]) if path in conflicts else _make_hook(path, layers))
            for path, layers in wanted.items()
        }
        self._token_hooks = [h for name in self.active if name not in self.merged
                             and (rows := self._get(name).token_rows) is not None
                             for h in rows.hook(self.model)]

    # --- merge ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None, exact_unmerge: bool = False) -> None:
        """W += scale·B A for each named adapter (default: the active ones); idempotent.

        A DoRA adapter sets W = m ⊙ (W + scale·B A) / ‖W + scale·B A‖_row instead and keeps
        that norm (out,) for unmerge, which divides by m (a copy of W is kept if m has a zero).

        Merged adapters stop hooking, so inference costs exactly the base model. Only active
        adapters can be merged (an inactive one is refused: merging it would change outputs
        that ``active`` says it does not). By default unmerge subtracts in fp32 (W within two
        roundings of its dtype); ``exact_unmerge`` keeps a copy of each Linear's weight at its
        first merge, which unmerge restores bit-exactly, at the cost of that memory.
        """
        names = [n for n in dict.fromkeys(self.active if names is None else names)
                 if n not in self.merged]
        for name in names:
            if name not in self.active:
                self._get(name)
                raise RuntimeError(f"adapter {name!r} is not active (active: {self.active}); "
                                   "set_active([...]) it before merging")
            self._refuse_quantized(name)
            self._check_device(name)
        if conflicts := self._dora_conflicts(self.active):
            raise AdapterConflictError(next(iter(conflicts.values())))
        for name in names:
            self._fold(name, self._get(name).paths if exact_unmerge else ())
        self._refresh_hooks()

    @torch.no_grad()
    def _fold(self, name: str, backup: Collection[str]) -> None:
        """Add adapter ``name`` into W, first copying W of the ``backup`` paths not yet merged."""
        for path, layer in self._get(name).items():
            weight = self._linears[path].weight
            # DoRA divides by m to unmerge: with a zero in m only a copy of W brings W back.
            exact = path in backup or (isinstance(layer, DoRALinear) and not layer.invertible())
            if exact and not self._merged_into(path):
                self._backups[path] = weight.detach().clone()
            weight.copy_(layer.merged_weight(weight.float()))  # one rounding to W's dtype
        if (rows := self._get(name).token_rows) is not None:
            rows.merge_into(self.model)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Undo merge for the named adapters (default: all merged ones)."""
        for name in list(self.merged if names is None else names):
            if name not in self.merged:
                continue
            self.merged.remove(name)
            for path, layer in self._get(name).items():
                weight = self._linears[path].weight
                if not self._merged_into(path) and path in self._backups:
                    weight.copy_(self._backups.pop(path))
                else:
                    weight.copy_(layer.unmerged_weight(weight.float()))
            if (rows := self._get(name).token_rows) is not None:
                rows.unmerge_from(self.model)
        self._refresh_hooks()

    def _refuse_quantized(self, name: str) -> None:
        """Merging into int8/NF4 would round W + BA a second time: refuse, say what to do."""
        quantized = [p for p in self._get(name).paths
                     if isinstance(self._linears[p], QuantizedLinear)]
        if quantized:
            raise RuntimeError(
                f"cannot merge adapter {name!r} into a quantized base ({len(quantized)} "
                f"quantized Linears, e.g. {quantized[0]}): load the base unquantized, merge, "
                "then quantize the merged model if needed (infer.py --merge --quantize does this)")

    def _check_device(self, name: str) -> None:
        for path, layer in self._get(name).items():
            device = _device(self._linears[path])
            if device != layer.A.device:
                raise _moved(path, layer.A.device, device, "weight")

    def _merged_into(self, path: str) -> bool:
        return any(path in self._get(n).paths for n in self.merged)

    # --- whole-model ----------------------------------------------------------------------
    def remove(self) -> None:
        """Unmerge everything, drop every hook and adapter, restore the base weights
        (PiSSA/OLoRA residuals) and requires_grad flags."""
        self.unmerge()
        self.restore_base_weights(list(self._originals))
        self.active = []
        self._refresh_hooks()
        self.adapters = nn.ModuleDict()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[n])

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Trainable parameters of one adapter (default: of all adapters)."""
        sets = self.adapters.values() if name is None else [self._get(name)]
        return [p for s in sets for p in s.parameters()]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts over the base model plus adapters.

        A quantized Linear counts its logical (out × in) weight, which it stores as buffers,
        so the totals do not depend on how the base is stored.
        """
        params = list(self.model.parameters()) + list(self.parameters())
        quantized = sum(m.out_features * m.in_features for m in self.model.modules()
                        if isinstance(m, QuantizedLinear))
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params) + quantized

    def describe(self) -> str:
        """One line: trainable vs total parameters."""
        trainable, total = self.parameter_counts()
        return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"


def inject_lora(model: nn.Module, config: LoRAConfig, name: str = "default") -> LoRAInjection:
    """Freeze ``model`` and hook a fresh adapter ``name`` into the Linears ``config`` targets."""
    injection = LoRAInjection(model)
    injection.add_adapter(name, config)
    return injection
