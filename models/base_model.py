"""Finding an adapter's base model from any working directory.

train.py stores the model id as the user gave it (``base_model``) and, when that was a local
directory, its absolute path (``base_model_path``); the base fingerprint travels too (checked
by lora.load_adapter). Loading an adapter without ``--model`` tries, in order: the given id as a
local directory (from the working directory, then the checkout, as load_model resolves it), the
stored absolute path, then the hub id (only the hub cache when the base was a local directory);
it logs which one it used, or names everything it tried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig

from .loading import local_model_dirs, resolve_model_id

log = logging.getLogger(__name__)


class BaseModelNotFoundError(FileNotFoundError):
    """No candidate for an adapter's base model exists here; the message lists what was tried."""


def base_model_metadata(model_id: str) -> dict[str, str]:
    """Adapter metadata naming the base: the id as given and, for a local directory, its
    absolute path ("" for a hub id)."""
    local = Path(resolve_model_id(model_id))
    return {"base_model": model_id, "base_model_path": str(local.resolve()) if local.is_dir()
            else ""}


def _is_hub_id(model_id: str) -> bool:
    """Whether ``model_id`` could name a hub repository (``../x`` and ``/a/b`` cannot)."""
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def _local_candidates(given: str, stored: str) -> list[tuple[Path, str]]:
    """(directory, where it came from) in the order tried, each directory once."""
    candidates = local_model_dirs(given)
    if stored:
        candidates.append((Path(stored), "stored in the adapter"))
    unique: dict[Path, str] = {}
    for path, how in candidates:
        unique.setdefault(path, how)
    return list(unique.items())


def locate_base_model(meta: Mapping[str, str], source: str) -> str:
    """The directory or hub id of the base model an adapter's metadata names (see the module
    docstring for the order); BaseModelNotFoundError listing every candidate if none works."""
    given, stored = meta["base_model"], meta.get("base_model_path", "")
    tried: list[tuple[Path, str]] = []
    for path, how in _local_candidates(given, stored):
        if path.is_dir():
            earlier = ", ".join(str(p) for p, _ in tried)
            why = (f"as given, {how}" if how != "stored in the adapter"
                   else f"the path stored in the adapter; tried first: {earlier}")
            log.info("base model: %s (%s)", path, why)
            return str(path)
        tried.append((path, how))
    problems = [f"{path} ({how}): not a directory" for path, how in tried]
    if _is_hub_id(given):
        # A base trained from a local directory is looked for in the hub cache only: fetching
        # what was a relative path (models/x) would wait ~25 s of retries offline for nothing.
        online = not stored
        try:
            AutoConfig.from_pretrained(given, local_files_only=not online)
        except (OSError, ValueError) as e:
            problems.append(f"hub id {given!r}: " + (str(e).splitlines()[0] if online else
                            "not in the hub cache (not fetched: it was a local directory when "
                            "the adapter was trained)"))
        else:
            log.info("base model: %s (hub id; no such local directory: %s)", given,
                     ", ".join(str(p) for p, _ in tried))
            return given
    raise BaseModelNotFoundError(
        f"{source}: its base model {given!r} is not here; tried:\n  " + "\n  ".join(problems)
        + "\npass --model with the base model's directory or hub id")


def locate_adapters_base(adapters: Sequence[str | Path],
                         metas: Sequence[Mapping[str, str]]) -> str | None:
    """The located base model of the first adapter whose metadata names one, else None
    (``metas`` may go on past the adapters; those entries are not adapters')."""
    for adapter, meta in zip(adapters, metas, strict=False):
        if meta.get("base_model"):
            return locate_base_model(meta, str(adapter))
    return None
