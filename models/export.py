"""Export base + adapters as one standalone checkpoint (merged), or as a PEFT adapter directory.

The merged directory is what ``save_pretrained`` writes for the model and its processor, plus
``lora_vlm.json`` (task, prompt, base model, every adapter's settings and sha256, versions) and
a model card (``README.md``) rendered from it; it loads with plain transformers. A PEFT
directory is lora.save_peft's layout plus the same two files. Either is written under a
temporary name beside its destination and renamed into place, so an interrupted export leaves
no half-written directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lora import save_peft
from lora.adapter_file import library_versions
from lora.peft_format import WEIGHTS_NAME
from lora.quantized_linear import tied_linears

from .adapters import SIDECAR_NAME, adapter_metadata
from .api import Pipeline
from .bnb_format import bnb_config, nf4_state_dict
from .model_card import render_card

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """An export that cannot be done as asked; the one-line message says why."""


@dataclass
class AdapterSource:
    """One adapter as the user named it, with what the export records about it."""

    path: Path
    weights: Path  # the file hashed: the adapter file, or a PEFT dir's adapter_model.safetensors
    sha256: str
    metadata: dict[str, str]
    eval: dict[str, Any] | None  # the training run's eval.json, when it scored this file
    eval_file: str | None  # what that eval.json scored (run_config.json's eval_file)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _run_eval(adapter: Path) -> tuple[dict[str, Any] | None, str | None]:
    """train.py's <run>/eval.json scores <run>/adapter.safetensors (not best.safetensors or a
    checkpoint); an eval.json older than the adapter belongs to an earlier adapter."""
    path = adapter.parent / "eval.json"
    if adapter.name != "adapter.safetensors" or not path.is_file():
        return None, None
    if path.stat().st_mtime < adapter.stat().st_mtime:
        log.warning("%s is older than %s: not reported in the model card", path, adapter)
        return None, None
    try:
        scores = json.loads(path.read_text())
        run_config = adapter.parent / "run_config.json"
        eval_file = json.loads(run_config.read_text()).get("eval_file") \
            if run_config.is_file() else None
    except (OSError, ValueError) as e:
        log.warning("%s: not readable (%s): not reported in the model card", path, e)
        return None, None
    if not isinstance(scores, dict):
        return None, None
    # train.py records what it scored beside the scores (older runs: run_config's eval_file).
    scored = scores.pop("evaluated_on", None)
    if isinstance(scored, dict) and scored.get("file"):
        eval_file = f"{scored['file']} ({scored.get('split', 'test')} split)"
    return scores, eval_file


def describe_source(path: str | Path) -> AdapterSource:
    """Hash, metadata and the run's eval numbers of an adapter file or PEFT directory."""
    path = Path(path)
    metadata = adapter_metadata(path)  # AdapterFileError for a missing or unreadable adapter
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    scores, eval_file = _run_eval(path)
    return AdapterSource(path, weights, sha256_file(weights), metadata, scores, eval_file)


def check_destination(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse a non-empty ``out`` without ``overwrite``, a file, and a folder that is or holds
    an input (overwriting it would delete what the export reads)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    for src in inputs:
        if src.exists() and (src.resolve() == out.resolve() or
                             out.resolve() in src.resolve().parents):
            raise ExportError(f"{out} holds the input {src}: export to another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty: choose another directory or pass --overwrite "
                          "(which replaces it once the export is complete)")


def _readable(folder: Path) -> None:
    """Give the files the mode a plain write would (0o666 less the umask): safetensors and
    mkstemp write 0o600, which would keep a shared model from other users."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out``; when the block ends it becomes ``out`` (an old
    ``out`` is moved aside first and deleted after). On error the temp dir is removed and
    ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0o700 mode would stay on the renamed directory
    try:
        yield tmp
        _readable(tmp)
        if out.exists():  # rename(2) replaces an empty directory, not a full one
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_names(pipe: Pipeline) -> list[str]:
    """The pipeline's adapter names, in the order they were given."""
    return list(pipe.injection.adapters) if pipe.injection is not None else []


def refuse_tied_targets(pipe: Pipeline) -> None:
    """Merging into a Linear whose weight is shared (BLIP's LM head is the word embeddings)
    would change the other module too: the merged model would not compute what the hooks do."""
    tied = tied_linears(pipe.model)
    for name in adapter_names(pipe):
        hit = sorted(set(pipe.injection.adapters[name].paths) & tied)
        if hit:
            raise ExportError(
                f"adapter {name!r} adapts {hit[0]}, whose weight is shared with another module "
                "(e.g. the LM head tied to the word embeddings): a merged model would change "
                "both. Export it as a PEFT directory (--peft) instead")


def _adapter_record(pipe: Pipeline, name: str, source: AdapterSource) -> dict[str, Any]:
    adapter = pipe.injection.adapters[name]
    meta = source.metadata
    versions = json.loads(meta["versions"]) if meta.get("versions") else None
    return {
        "source": str(source.path), "weights": str(source.weights), "sha256": source.sha256,
        **adapter.config.to_dict(), "modules": len(adapter.paths),
        "own_r_alpha": {p: [m.r, m.alpha] for p, m in adapter.items()
                        if (m.r, m.alpha) != (adapter.config.r, adapter.config.alpha)},
        "parameters": sum(p.numel() for p in adapter.parameters()),
        "task": meta.get("task"), "prompt": meta.get("prompt"),
        "trained_on_quantization": meta.get("trained_on_quantization"),
        "trained_with": versions, "eval": source.eval, "eval_file": source.eval_file,
    }


def export_info(kind: str, pipe: Pipeline, sources: Sequence[AdapterSource], base_model: str,
                dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What lora_vlm.json holds and the model card shows; ``kind`` is "merged" or "peft"."""
    names = adapter_names(pipe)
    return {
        "kind": kind,
        "base_model": base_model,
        "architecture": type(pipe.model).__name__,
        "task": pipe.task.name,
        "prompt": pipe.task.prompt,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "adapters": [_adapter_record(pipe, n, s) for n, s in zip(names, sources, strict=True)],
        "versions": library_versions(),
    }


def _write_info(folder: Path, info: dict[str, Any], where: Path) -> None:
    (folder / SIDECAR_NAME).write_text(json.dumps(info, indent=2) + "\n")
    (folder / "README.md").write_text(render_card(info, str(where)))


NF4_METHOD = "bitsandbytes NF4: blocks of 64, fp32 absmax, no double quantization"
WHY_NOT = {  # quantization modes that have no faithful transformers-loadable form
    "int8": "bitsandbytes' int8 (LLM.int8) also quantizes the activations, so a model saved "
            "in its format would compute something else than lora-vlm's weight-only int8",
}


def _quantized_state(pipe: Pipeline, quantize: str,
                     dtype: torch.dtype) -> tuple[dict | None, dict | None]:
    """(state dict for save_pretrained, what lora_vlm.json records), for a merged model."""
    if quantize == "none":
        return None, None
    if quantize != "nf4":
        raise ExportError(f"--quantize {quantize} cannot be exported: {WHY_NOT[quantize]}. "
                          "Export unquantized and run infer.py --merge --quantize "
                          f"{quantize} on it, or export --quantize nf4")
    state, nf4, kept = nf4_state_dict(pipe.model, dtype)
    pipe.model.config.quantization_config = bnb_config(kept, dtype)
    return state, {"method": NF4_METHOD, "nf4_linears": len(nf4), "full_precision_linears": kept}


def export_merged(pipe: Pipeline, sources: Sequence[AdapterSource], out: Path, base_model: str,
                  dtype: torch.dtype = torch.float32, quantize: str = "none") -> Path:
    """Merge every adapter in fp32 (W + scale·BA), cast to ``dtype`` (``quantize="nf4"``: the
    Linears as bitsandbytes NF4, see bnb_format), and write ``out`` with save_pretrained (model
    and processor), lora_vlm.json and README.md. Changes ``pipe``'s model: its adapters end
    merged."""
    refuse_tied_targets(pipe)
    pipe.injection.merge()  # no copy of W is kept (exact_unmerge): the model is written next
    state, quantization = _quantized_state(pipe, quantize, dtype)
    pipe.model.to(dtype)
    info = {**export_info("merged", pipe, sources, base_model, dtype),
            "quantization": quantization}
    with staged_dir(out) as tmp:
        pipe.model.save_pretrained(tmp, state_dict=state)
        pipe.processor.save_pretrained(tmp)
        _write_info(tmp, info, out)
    return out


def export_peft(pipe: Pipeline, source: AdapterSource, out: Path, base_model: str) -> Path:
    """Write the pipeline's one adapter to ``out`` as a PEFT directory (lora.save_peft), with
    lora_vlm.json (task and prompt, which PEFT's config has no place for) and README.md."""
    names = adapter_names(pipe)
    if len(names) != 1:
        raise ExportError(f"--peft writes one adapter, got {len(names)}: export each on its own")
    info = export_info("peft", pipe, [source], base_model)
    with staged_dir(out) as tmp:
        save_peft(pipe.injection, tmp, name=names[0], base_model=base_model)
        _write_info(tmp, info, out)
    return out
