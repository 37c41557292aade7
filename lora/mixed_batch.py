"""Mixed-adapter batches: one forward in which each sample uses its own adapter, or none.

Inside ``with injection.per_sample(["a", "b", None, "a"]):`` each hooked Linear adds adapter
a's delta to the rows of samples 0 and 3 only, b's to sample 1's, and nothing to sample 2's:
the outputs of running each sample alone with ``set_active([its adapter])``, in one forward.
The names choose the adapters whatever ``set_active`` says; merged adapters cannot be mixed
(they are in W, so they reach every sample).

Which rows are a sample's: every hooked Linear of BLIP / BLIP-2 takes its input batch-first,
with a leading dim of B (the number of names) times k. k = 1 for the batch as given (vision
tower, cross-attention keys/values over the image batch); k = num_beams × num_return_sequences
in ``generate``, which repeats each sample k times in a row (``repeat_interleave``); k = T where
a (B, T, d) input is flattened to (B·T, d). In each case row i belongs to sample i // k. A
leading dim that is not a multiple of B cannot be assigned, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer import LoRALinear

if TYPE_CHECKING:
    from .injection import LoRAInjection

# One adapter's rows of the (B·k, ...) input: a slice when they are contiguous (a view, no
# copy), else their indices; None when it holds every row.
Group = tuple[str, slice | torch.Tensor | None]


class RowPlan:
    """Per adapter, the input rows its samples occupy; built once per (k, device) and reused by
    every layer of the forward (and of later forwards), not indexed again per layer."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self._groups: dict[tuple[int, torch.device], list[Group]] = {}

    def groups(self, rows: int, device: torch.device) -> list[Group]:
        """(adapter, row indices) for an input whose leading dim is ``rows``."""
        key = (rows, device)
        if key not in self._groups:
            self._groups[key] = self._build(rows, device)
        return self._groups[key]

    def _build(self, rows: int, device: torch.device) -> list[Group]:
        b = len(self.names)
        if rows % b:
            raise ValueError(
                f"a hooked Linear got an input of {rows} rows, not a multiple of the {b} "
                "per-sample adapter names: pass one name per sample of the batch (generate's "
                "num_beams / num_return_sequences copies are handled)")
        k = rows // b
        if len(set(self.names)) == 1:  # one adapter (or none) for all: no indexing at all
            return [] if self.names[0] is None else [(self.names[0], None)]
        groups: list[Group] = []
        for name in dict.fromkeys(n for n in self.names if n is not None):
            samples = torch.tensor([i for i, n in enumerate(self.names) if n == name])
            rows = (samples[:, None] * k + torch.arange(k)).flatten()  # sample i: i·k … i·k+k-1
            start, stop = int(rows[0]), int(rows[-1]) + 1
            contiguous = stop - start == len(rows)  # a sorted batch: each adapter's run of rows
            groups.append((name, slice(start, stop) if contiguous else rows.to(device)))
        return groups


def _mixed_hook(plan: RowPlan, layers: dict[str, LoRALinear], guard: Callable[[], None]
                ) -> Callable:
    """A forward hook: each adapter's ``base + delta`` on its rows, the base on the others."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        guard()
        x, out = args[0], None
        for name, rows in plan.groups(x.shape[0], x.device):
            layer = layers.get(name)
            if layer is None:  # this adapter does not target this Linear
                continue
            if rows is None:
                return layer(x, module.training, output)
            if out is None:  # the Linear's fresh output is ours to fill, unless autograd is on
                out = output.clone() if torch.is_grad_enabled() else output
            # the single-adapter computation on the adapter's rows: the naive loop's numbers
            if isinstance(rows, slice):
                out[rows] = layer(x[rows], module.training, output[rows])
            else:
                part = layer(x.index_select(0, rows), module.training,
                             output.index_select(0, rows))
                out.index_copy_(0, rows, part)
        return output if out is None else out

    return hook


@contextmanager
def per_sample(injection: LoRAInjection, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, sample i of every forward uses adapter ``names[i]`` (None: the base).

    The ordinary hooks come back on exit (errors too). Changing adapters inside the block
    (set_active, merge, add/delete) is refused at the next forward.
    """
    names = list(names)
    if not names:
        raise ValueError("per_sample needs one adapter name (or None) per sample; got none")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"per_sample takes adapter names or None, got {bad[0]!r}")
    for name in {n for n in names if n is not None}:
        config = injection._get(name).config  # KeyError naming the adapters there are
        if what := config.tensors_beyond_ab():  # per-row deltas only: not these variants
            raise ValueError(f"adapter {name!r} is {what}, which per_sample cannot mix: only "
                             "plain LoRA adapters are applied per sample")
    if injection.merged:
        raise RuntimeError(
            f"adapters {injection.merged} are merged into the base weights, so they reach every "
            "sample and cannot be mixed per sample: unmerge() them first")
    plan = RowPlan(names)
    by_path: dict[str, dict[str, LoRALinear]] = {}
    for name in dict.fromkeys(n for n in names if n is not None):
        for path, layer in injection._get(name).items():
            by_path.setdefault(path, {})[name] = layer
    for handle in [*injection._hooks.values(), *injection._token_hooks]:
        handle.remove()
    injection._token_hooks = []  # token rows of active adapters would reach every sample
    injection._hooks = mine = {}  # stays this object while no one refreshes the hooks

    def guard() -> None:
        if injection._hooks is not mine:
            raise RuntimeError("adapters changed inside injection.per_sample(...): set them "
                               "up before the block")

    handles = [injection._linears[path].register_forward_hook(_mixed_hook(plan, layers, guard))
               for path, layers in by_path.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        injection._refresh_hooks()
