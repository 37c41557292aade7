"""Adapter files: safetensors with only adapter tensors, their settings in the metadata.

Keys are ``<module path>.lora_A.weight`` (r, in) and ``<module path>.lora_B.weight`` (out, r),
fp32; with trainable token rows also ``<embedding path>.token_rows.delta`` (k, dim), the ids in
the config's ``trainable_tokens``; a DoRA adapter adds ``<module path>.lora_magnitude_vector``
(out,). Metadata (all strings, as safetensors requires):
  format="pt", lora_vlm_format=FORMAT_VERSION, config (LoRAConfig JSON), modules (JSON
  {path: [r, alpha]}), base_model, base_fingerprint, versions (JSON), plus caller extras.
Loading checks everything before it touches the model, so a bad file changes nothing: the
metadata's types and values (r a positive int, alpha finite, dropout in [0, 1)), every key and
shape, and that every tensor is finite. Saving refuses a non-finite adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig, check_alpha, check_rank
from .dora import MAGNITUDE_KEY, DoRALinear
from .init_methods import Factors, saved_form
from .injection import AdapterSet, AdapterSpec, LoRAInjection
from .quantized_linear import QuantizedLinear
from .targets import linear_modules
from .token_rows import KEY as TOKEN_ROWS_KEY
from .token_rows import check_token_ids, token_embedding

FORMAT_VERSION = "1"
log = logging.getLogger(__name__)


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded into this model; the message names file and key."""


class NonFiniteAdapterError(ValueError):
    """An adapter holding NaN or inf, refused on save; the message names the tensor."""


def _logical_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each parameter, a quantized Linear's weight as its (out, in) matrix."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, QuantizedLinear):  # its weight became buffers; name it as before
            yield f"{dot}weight", (module.out_features, module.in_features)
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # tied weights count once, as in named_parameters()
                seen.add(id(p))
                yield f"{dot}{name}", tuple(p.shape)


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the model class and each parameter's name and shape: same architecture, same hash.

    Quantizing the base does not change it, so adapters move between int8/NF4/full bases.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, shape in _logical_shapes(model):
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions recorded with every adapter and run."""
    import safetensors
    import transformers

    from . import __version__

    return {"lora_vlm": __version__, "torch": str(torch.__version__),
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def current_umask() -> int:
    """The process's umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict[str, str]) -> None:
    """save_file to a temp file in the same folder, then rename: no half-written checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp's file is 0600 (and save_file keeps it); give it the mode open() would
        # (0666 less the umask), so the adapter is as readable as the run's other outputs.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_copies(tensors: Iterable[tuple[str, torch.Tensor]], name: str
                  ) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU copies under their file keys; all finite, or NonFiniteAdapterError
    naming the first tensor that is not (such a file loads nowhere)."""
    state = {}
    for key, param in tensors:
        if not torch.isfinite(param).all():
            raise NonFiniteAdapterError(
                f"adapter {name!r}: {key} holds {int((~torch.isfinite(param)).sum())} "
                "NaN/inf values; refusing to write it (the run diverged?)")
        state[key] = param.detach().float().contiguous().cpu()
    return state


def factors_state(factors: Factors, name: str) -> dict[str, torch.Tensor]:
    """Per-path (A, B) under their file keys (see finite_copies)."""
    return finite_copies(((f"{path}.lora_{ab}.weight", t) for path, (a, b, _) in factors.items()
                          for ab, t in (("A", a), ("B", b))), name)


def token_rows_state(adapter: AdapterSet, name: str) -> dict[str, torch.Tensor]:
    """The trained embedding rows' delta under its file key, if the adapter has any."""
    rows = adapter.token_rows
    return {} if rows is None else finite_copies([(rows.key, rows.delta)], name)


def magnitude_state(adapter: AdapterSet, name: str) -> dict[str, torch.Tensor]:
    """DoRA's magnitude vectors under their file keys ({} for a plain LoRA adapter)."""
    return finite_copies(((f"{path}.{MAGNITUDE_KEY}", layer.magnitude)
                          for path, layer in adapter.items() if isinstance(layer, DoRALinear)),
                         name)


def save_adapter(
    injection: LoRAInjection,
    path: str | Path,
    name: str = "default",
    base_model: str = "",
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter ``name`` to ``path`` (atomic) with its settings in the metadata; a
    PiSSA/OLoRA adapter is written converted, for the original base (lora.init_methods)."""
    adapter = injection._get(name)
    config, factors, converted = saved_form(adapter)
    return write_adapter(path, config, factors, name, base_fingerprint(injection.model),
                         base_model, {**converted, **dict(extra or {})},
                         {**magnitude_state(adapter, name), **token_rows_state(adapter, name)})


def write_adapter(path: str | Path, config: LoRAConfig, factors: Factors, name: str,
                  fingerprint: str, base_model: str = "",
                  extra: Mapping[str, str] | None = None,
                  extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write per-path (A, B, alpha) and ``extra_tensors`` (e.g. token rows) as adapter file
    ``path`` (atomic); ``name`` for errors."""
    metadata = {
        "format": "pt",
        "lora_vlm_format": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "modules": json.dumps({p: [a.shape[0], alpha] for p, (a, _, alpha) in factors.items()}),
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "versions": json.dumps(library_versions()),
        **dict(extra or {}),
    }
    path = Path(path)
    atomic_save_tensors({**factors_state(factors, name), **dict(extra_tensors or {})}, path,
                        metadata)
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, or AdapterFileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """An adapter file's raw string metadata, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from e


def validate_state(model_linears: Mapping[str, nn.Linear], spec: AdapterSpec,
                   tensors: Mapping[str, torch.Tensor], source: str, dora: bool = False) -> None:
    """Keys exactly match ``spec`` (plus DoRA's magnitudes with ``dora``); every path is a Linear
    of the model; shapes fit it; every tensor is floating point and finite."""
    if not spec:
        raise AdapterFileError(f"{source}: holds no adapter modules")
    expected = {f"{p}.lora_{ab}.weight" for p in spec for ab in "AB"}
    expected |= {f"{p}.{MAGNITUDE_KEY}" for p in spec} if dora else set()
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise AdapterFileError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise AdapterFileError(
            f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for path, (r, _) in spec.items():
        base = model_linears.get(path)
        if base is None:
            raise AdapterFileError(
                f"{source}: key {path + '.lora_A.weight'!r} names {path!r}, which is not an "
                "nn.Linear of this model (wrong base model?)")
        shapes = {f"{path}.lora_A.weight": (r, base.in_features),
                  f"{path}.lora_B.weight": (base.out_features, r)}
        if dora:
            shapes[f"{path}.{MAGNITUDE_KEY}"] = (base.out_features,)
        for key, shape in shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise AdapterFileError(
                    f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, this model "
                    f"needs {shape} (wrong base model?)")
            if not tensors[key].is_floating_point():
                raise AdapterFileError(f"{source}: key {key!r} has dtype {tensors[key].dtype}")
            bad = int((~torch.isfinite(tensors[key])).sum())
            if bad:
                raise AdapterFileError(f"{source}: key {key!r} holds {bad} NaN/inf values")


def split_token_rows(model: nn.Module, config: LoRAConfig, tensors: Mapping[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``tensors``, after checking the token-rows delta that
    ``config.trainable_tokens`` asks for: its key names this model's token embedding, its shape
    is (ids, dim), it is floating point and finite. Without trainable tokens, all of them."""
    if not config.trainable_tokens:
        return dict(tensors)  # a stray token-rows key is then reported as unexpected
    try:
        path = token_embedding(model)
        vocab, dim = model.get_submodule(path).weight.shape
        ids = check_token_ids(config.trainable_tokens, vocab)
    except ValueError as e:
        raise AdapterFileError(f"{source}: {e} (wrong base model?)") from None
    key = f"{path}.{TOKEN_ROWS_KEY}"
    if key not in tensors:
        raise AdapterFileError(f"{source}: the config trains {len(ids)} token rows but the "
                               f"file has no key {key!r}")
    delta = tensors[key]
    if tuple(delta.shape) != (len(ids), dim) or not delta.is_floating_point():
        raise AdapterFileError(f"{source}: key {key!r} is {delta.dtype} {tuple(delta.shape)}, "
                               f"this model needs floating point {(len(ids), dim)}")
    if bad := int((~torch.isfinite(delta)).sum()):
        raise AdapterFileError(f"{source}: key {key!r} holds {bad} NaN/inf values")
    return {k: v for k, v in tensors.items() if k != key}


def _metadata_json(meta: Mapping[str, str], key: str, source: str) -> dict[str, Any]:
    """The JSON value of metadata ``key``, which must be an object."""
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise AdapterFileError(f"{source}: bad adapter metadata: no key {key!r}") from None
    except ValueError as e:
        raise AdapterFileError(f"{source}: bad adapter metadata {key!r}: not JSON ({e})") from e
    if not isinstance(value, dict):
        raise AdapterFileError(f"{source}: bad adapter metadata {key!r}: expected a JSON "
                               f"object, got {json.dumps(value)[:40]}")
    return value


def _parse_spec(modules: dict, source: str) -> AdapterSpec:
    """{path: [r, alpha]} with r a positive int and alpha finite, checked entry by entry."""
    spec = {}
    for path, value in modules.items():
        try:
            if not isinstance(value, list) or len(value) != 2:
                raise ValueError(f"expected [r, alpha], got {value!r}")
            spec[path] = (check_rank(value[0]), check_alpha(value[1]))
        except ValueError as e:
            raise AdapterFileError(
                f"{source}: bad adapter metadata 'modules', entry {path!r}: {e}") from e
    return spec


def _parse_metadata(meta: Mapping[str, str], source: str) -> tuple[LoRAConfig, AdapterSpec]:
    version = meta.get("lora_vlm_format")
    if version != FORMAT_VERSION:
        hint = " (a PEFT file? use lora.load_peft on its directory)" if version is None else ""
        raise AdapterFileError(
            f"{source}: adapter format version {version!r}, expected {FORMAT_VERSION!r}{hint}")
    config = _metadata_json(meta, "config", source)
    try:
        config = LoRAConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{source}: bad adapter metadata 'config': {e}") from e
    if config.init != "default":  # save_adapter converts these; a file that was not fits no base
        raise AdapterFileError(f"{source}: init {config.init!r} saved unconverted: it fits only "
                               "the residual base of its training run")
    return config, _parse_spec(_metadata_json(meta, "modules", source), source)


def read_adapter(path: str | Path) -> tuple[LoRAConfig, AdapterSpec, dict[str, torch.Tensor],
                                             dict[str, str]]:
    """An adapter file's config, per-module (r, alpha), tensors and metadata, checked as far as
    no model is needed: keys exactly the modules', A (r, ·) and B (·, r), all finite."""
    tensors, meta = read_adapter_file(path)
    config, spec = _parse_metadata(meta, str(path))
    a, b = ({p: tensors.get(f"{p}.lora_{ab}.weight") for p in spec} for ab in "AB")
    sizes = {p: SimpleNamespace(in_features=a[p].shape[-1], out_features=b[p].shape[0])
             for p in spec if a[p] is not None and b[p] is not None and a[p].ndim == b[p].ndim == 2}
    validate_state(sizes, spec, tensors, str(path))  # shapes against themselves: r only
    return config, spec, tensors, meta


def load_adapter(
    target: nn.Module | LoRAInjection,
    path: str | Path,
    name: str | None = None,
    activate: bool = True,
) -> LoRAInjection:
    """Load an adapter file into a model (a new injection) or an existing injection.

    ``name`` defaults to the file's stem. Everything is validated before the model changes.
    """
    injection = target if isinstance(target, LoRAInjection) else None
    model = injection.model if injection is not None else target
    tensors, meta = read_adapter_file(path)
    config, spec = _parse_metadata(meta, str(path))
    validate_state(linear_modules(model), spec, split_token_rows(model, config, tensors, str(path)),
                   str(path), config.dora)
    saved_fp = meta.get("base_fingerprint")
    if saved_fp and saved_fp != base_fingerprint(model):
        log.warning("%s was trained on a base with fingerprint %s (%s); this model's is %s: "
                    "shapes fit, but outputs may not be what was trained", path, saved_fp,
                    meta.get("base_model") or "unknown", base_fingerprint(model))
    name = name or Path(path).stem
    if injection is not None and name in injection.adapters:
        raise ValueError(f"adapter {name!r} already exists; pass another name")
    injection = injection or LoRAInjection(model)
    injection.attach(name, config, spec, tensors, activate=activate)
    return injection
