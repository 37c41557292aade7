"""Adapter arithmetic: one new adapter from weighted existing ones (PEFT's add_weighted_adapter).

Per Linear, with weights w_i and each adapter's scale s_i (alpha/r, or alpha/sqrt(r) rsLoRA):
  cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: rank Σ r_i, and its delta is
          exactly Σ w_i ΔW_i (the adapters applied together, each scaled).
  linear  A = Σ sign(w_i) sqrt(|w_i| s_i) A_i, B = Σ sqrt(|w_i| s_i) B_i: equal ranks only. With
          one adapter the delta is w ΔW; with several it also holds cross terms B_i A_j (PEFT's
          definition: mixes factors, not deltas; peft PR #2918 puts a negative weight's sign on
          A alone).
  svd     the truncated SVD of Σ w_i ΔW_i: B = U_k S_k, A = V_kᵀ, k = ``rank`` (default: the
          largest r_i, at most the Linear's smaller side); exact when k reaches ΔW's rank.
The result has alpha = r and no rsLoRA, so its scale is 1: the weights and scales are in A and B
(as in PEFT, with its rsLoRA fix, PR #3449). A Linear that only some adapters adapt gets only
their terms.

    python -m lora.arithmetic a.safetensors:0.7 b.safetensors:0.3 --method cat -o ab.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapter_file import read_adapter, read_metadata, write_adapter
from .config import LoRAConfig
from .init_methods import Factors
from .injection import AdapterSet, LoRAInjection

METHODS = ("cat", "linear", "svd")
# path -> (A, B, scale): one adapter as the arithmetic sees it
Scaled = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def split_weight(spec: str | Path) -> tuple[str, float]:
    """``FILE:WEIGHT`` -> (FILE, WEIGHT); an existing path, or one without ':', -> (path, 1.0).

    A weight that is not a finite number is a ValueError naming the argument."""
    text = str(spec)
    if ":" not in text or Path(text).exists():
        return text, 1.0
    path, weight = text.rsplit(":", 1)
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{text}: weight {weight!r} is not a finite number (FILE:WEIGHT, e.g. "
                         "adapter.safetensors:0.7)")
    return path, value


def _combine_one(terms: list[tuple[float, torch.Tensor, torch.Tensor, float]], method: str,
                 rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combination at one Linear; ``terms`` are (w, A, B, scale)."""
    if method == "cat":
        return (torch.cat([w * s * a.float() for w, a, _, s in terms], dim=0),
                torch.cat([b.float() for _, _, b, _ in terms], dim=1))
    if method == "linear":
        root = [(math.copysign(math.sqrt(abs(w) * s), w), math.sqrt(abs(w) * s))
                for w, _, _, s in terms]
        return (sum(ra * a.float() for (ra, _), (_, a, _, _) in zip(root, terms, strict=True)),
                sum(rb * b.float() for (_, rb), (_, _, b, _) in zip(root, terms, strict=True)))
    delta = sum(w * s * (b.float() @ a.float()) for w, a, b, s in terms)  # (out, in)
    k = min(rank or max(a.shape[0] for _, a, _, _ in terms), *delta.shape)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:k].contiguous(), (u[:, :k] * sv[:k]).contiguous()


def combine(adapters: Sequence[Scaled], weights: Sequence[float], method: str = "svd",
            rank: int | None = None) -> Factors:
    """Per path (A, B, alpha = new rank) of the weighted combination; see the module doc."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    if rank is not None and (method != "svd" or rank <= 0):
        raise ValueError(f"rank {rank}: only svd takes a rank, and it must be positive")
    if method == "linear" and len({a.shape[0] for ad in adapters for a, _, _ in ad.values()}) > 1:
        raise ValueError("linear needs adapters of one rank (PEFT's rule); use cat or svd")
    paths = list(dict.fromkeys(p for ad in adapters for p in ad))  # union, first-seen order
    out = {}
    for path in paths:
        terms = [(w, *ad[path]) for ad, w in zip(adapters, weights, strict=True) if path in ad]
        a, b = _combine_one(terms, method, rank)
        out[path] = (a, b, float(a.shape[0]))
    return out


def _refuse_variants(config: LoRAConfig, source: str) -> None:
    """Weighted sums are defined on (A, B) pairs: DoRA magnitudes and token rows have none."""
    if what := config.tensors_beyond_ab():
        raise ValueError(f"{source} is {what}: adapter arithmetic combines plain LoRA adapters "
                         "only")


def _scaled(adapter: AdapterSet) -> Scaled:
    _refuse_variants(adapter.config, "adapter")
    if adapter.initial:
        raise ValueError("a PiSSA/OLoRA adapter is a delta on the residual base: convert it "
                         "first (lora.init_methods.to_plain)")
    return {p: (m.A.detach(), m.B.detach(), m.scale) for p, m in adapter.items()}


def result_config(first: LoRAConfig, factors: Factors) -> LoRAConfig:
    """The combined adapter's config: the first one's dropout, r = alpha = its first rank."""
    r = next(iter(factors.values()))[0].shape[0]
    return dataclasses.replace(first, r=r, alpha=float(r), rslora=False, targets=tuple(factors),
                               rank_pattern={}, alpha_pattern={}, init="default")


def add_weighted_adapter(injection: LoRAInjection, names: Sequence[str],
                         weights: Sequence[float], new_name: str, method: str = "svd",
                         rank: int | None = None, activate: bool = False) -> AdapterSet:
    """Adapter ``new_name`` in ``injection``, combined from ``names`` (scales as set_scale left
    them); ``activate`` also turns it on."""
    factors = combine([_scaled(injection._get(n)) for n in names], weights, method, rank)
    spec = {p: (a.shape[0], alpha) for p, (a, _, alpha) in factors.items()}
    state = {f"{p}.lora_{ab}.weight": t for p, (a, b, _) in factors.items()
             for ab, t in (("A", a), ("B", b))}
    config = result_config(injection._get(names[0]).config, factors)
    return injection.attach(new_name, config, spec, state, activate=activate)


def _read(path: str) -> tuple[Scaled, LoRAConfig, dict[str, str]]:
    try:  # before read_adapter, which would call a DoRA magnitude an unexpected key
        saved = LoRAConfig.from_dict(json.loads(read_metadata(path)["config"]))
    except (KeyError, TypeError, ValueError):
        saved = None  # a malformed file: read_adapter says what is wrong with it
    if saved is not None:
        _refuse_variants(saved, str(path))
    config, spec, tensors, meta = read_adapter(path)
    root = math.sqrt if config.rslora else float
    scaled = {p: (tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"], alpha / root(r))
              for p, (r, alpha) in spec.items()}
    return scaled, config, meta


# Metadata a combined file writes itself; the first input's other keys (task, prompt...) stay.
OWN_KEYS = {"format", "lora_vlm_format", "config", "modules", "base_model", "base_fingerprint",
            "versions", "converted_from", "combined_from"}


def combine_files(specs: Sequence[str], out: str | Path, method: str = "svd",
                  rank: int | None = None) -> Path:
    """Write the combination of adapter files given as ``FILE[:WEIGHT]`` to ``out``; base
    model, task and prompt come from the first, and all must share one base architecture."""
    files, weights = zip(*map(split_weight, specs), strict=True)
    read = [_read(f) for f in files]
    metas = [meta for _, _, meta in read]
    for key in ("base_fingerprint", "task"):
        if len({m.get(key) for m in metas}) > 1:
            listing = ", ".join(f"{f} ({m.get(key)})" for f, m in zip(files, metas, strict=True))
            raise ValueError(f"adapters with different {key}: {listing}")
    factors = combine([s for s, _, _ in read], weights, method, rank)
    first = metas[0]
    extra = {k: v for k, v in first.items() if k not in OWN_KEYS}
    extra["combined_from"] = json.dumps({"method": method, "rank": rank, "adapters": [
        {"file": str(f), "weight": w} for f, w in zip(files, weights, strict=True)]})
    return write_adapter(out, result_config(read[0][1], factors), factors, Path(out).stem,
                         first.get("base_fingerprint", ""), first.get("base_model", ""), extra)


def main(argv: list[str] | None = None) -> Path:
    """``python -m lora.arithmetic``: combine adapter files into a new one."""
    p = argparse.ArgumentParser(prog="python -m lora.arithmetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]",
                   help="lora-vlm adapter files, each with an optional weight (default 1)")
    p.add_argument("--method", choices=METHODS, default="svd",
                   help="cat: exact sum of the weighted deltas (ranks add up); linear: PEFT's "
                        "weighted sum of A's and of B's (one rank); svd: the sum truncated to "
                        "--rank (default svd, as PEFT)")
    p.add_argument("--rank", type=int, default=None,
                   help="svd only: rank of the result (default: the largest input rank)")
    p.add_argument("-o", "--output", required=True, help="the combined adapter file to write")
    args = p.parse_args(argv)
    try:
        path = combine_files(args.adapters, args.output, args.method, args.rank)
    except ValueError as e:  # AdapterFileError too: bad file, weight, method or rank
        raise SystemExit(f"lora.arithmetic: error: {e}") from None
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
