"""Trainable token rows: deltas for chosen rows of the token embedding and of its tied LM head.

PEFT's ``trainable_token_indices`` (TrainableTokensLayer). As with LoRA the base model stays
untouched: forward hooks add ``delta[i]`` to the embedding output wherever token ``ids[i]``
occurs, and ``x @ deltaᵀ`` to those vocabulary columns of every Linear that shares the
embedding's weight (BLIP's ``text_decoder.cls.predictions.decoder``, BLIP-2's ``lm_head``).
Together that equals the model with rows ``W[ids]`` replaced by ``W[ids] + delta``.

The trained embedding is the one an output Linear shares its weight with (the decoder's: it
both reads and writes the target words), else ``get_input_embeddings()``. A head that does not
share the weight keeps its rows, as in PEFT, which ties the head only when the weights are tied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

KEY = "token_rows.delta"  # file key: <embedding path>.token_rows.delta, shape (k, dim), fp32


def token_embedding(model: nn.Module) -> str:
    """Path of the nn.Embedding whose rows train: the one tied to an output Linear, else the
    model's input embedding; ValueError if it has neither."""
    modules = dict(model.named_modules())
    owners = {id(m.weight): n for n, m in modules.items() if isinstance(m, nn.Embedding)}
    for m in modules.values():
        if isinstance(m, nn.Linear) and id(m.weight) in owners:
            return owners[id(m.weight)]
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if get_input else None
    for name, m in modules.items():
        if m is embedding and isinstance(m, nn.Embedding):
            return name
    raise ValueError(f"{type(model).__name__} has no token embedding (nn.Embedding) to train")


def tied_modules(model: nn.Module, path: str) -> tuple[list[nn.Embedding], list[nn.Linear]]:
    """Every Embedding and every Linear whose weight is the one of the embedding at ``path``
    (T5 shares it between three Embedding modules and the head)."""
    weight = model.get_submodule(path).weight
    modules = [m for m in model.modules() if getattr(m, "weight", None) is weight]
    return ([m for m in modules if isinstance(m, nn.Embedding)],
            [m for m in modules if isinstance(m, nn.Linear)])


def check_token_ids(ids: Iterable[int], vocab: int, what: str = "trainable token") -> list[int]:
    """``ids`` sorted and deduplicated, each an int in [0, vocab), else ValueError."""
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise ValueError(f"{what} id {i!r} is not in this model's vocabulary [0, {vocab})")
    if not ids:
        raise ValueError(f"no {what} ids given")
    return sorted(set(ids))


class TokenRows(nn.Module):
    """``delta`` (k, dim) fp32, zeros at first: row i is added to embedding row ``ids[i]``.

    ``slot`` maps each vocabulary id to 1 + its index in ``ids`` (0 for the other ids), so the
    embedding hook is one gather from ``[0; delta]``: no (vocab, dim) tensor per forward.
    """

    def __init__(self, embedding: str, ids: Sequence[int], vocab: int, dim: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.embedding, self.vocab, self.dim = embedding, vocab, dim
        ids = check_token_ids(ids, vocab)
        self.register_buffer("ids", torch.tensor(ids, device=device), persistent=False)
        slot = torch.zeros(vocab, dtype=torch.long, device=device)
        slot[self.ids] = torch.arange(1, len(ids) + 1, device=device)
        self.register_buffer("slot", slot, persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(ids), dim, device=device))
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None  # (W[ids] before, after)

    @classmethod
    def for_model(cls, model: nn.Module, ids: Sequence[int]) -> TokenRows:
        """Fresh rows (delta 0: outputs unchanged) on ``model``'s token embedding."""
        path = token_embedding(model)
        weight = model.get_submodule(path).weight
        return cls(path, ids, weight.shape[0], weight.shape[1], device=weight.device)

    @property
    def key(self) -> str:
        """This delta's key in an adapter file."""
        return f"{self.embedding}.{KEY}"

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """(..., dim) embedding output + delta of each chosen id (0 elsewhere)."""
        rows = torch.cat([self.delta.new_zeros(1, self.dim), self.delta]).to(output.dtype)
        return output + F.embedding(self.slot[input_ids], rows)

    def head(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(..., vocab) logits + x @ deltaᵀ in the chosen columns (x: the head's input)."""
        extra = F.linear(x, self.delta.to(x.dtype)).to(logits.dtype)  # (..., k)
        return logits.index_add(-1, self.ids, extra)

    def hook(self, model: nn.Module) -> list[RemovableHandle]:
        """Forward hooks on the embedding and every module tied to it; remove them to undo."""
        embeddings, heads = tied_modules(model, self.embedding)
        return ([m.register_forward_hook(self._hook(self.embed)) for m in embeddings]
                + [m.register_forward_hook(self._hook(self.head)) for m in heads])

    def _hook(self, add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.device != self.delta.device:
                raise RuntimeError(
                    f"trainable token rows of {self.embedding} are on {self.delta.device} but "
                    f"the model runs on {output.device}: call injection.to({str(output.device)!r})")
            return add(args[0], output)
        return hook

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        """W[ids] += delta in the shared weight (so the tied head follows); keeps W[ids]."""
        weight = model.get_submodule(self.embedding).weight
        before = weight[self.ids].clone()
        weight[self.ids] = (before.float() + self.delta).to(weight.dtype)  # one rounding
        self._merged = before, weight[self.ids].clone()

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        """Undo merge_into: the kept rows come back bit-exactly unless something changed them
        since (another adapter merged into the same rows); then delta is subtracted."""
        weight = model.get_submodule(self.embedding).weight
        before, after = self._merged or (None, None)
        if before is not None and torch.equal(weight[self.ids], after):
            weight[self.ids] = before
        else:
            weight[self.ids] = (weight[self.ids].float() - self.delta).to(weight.dtype)
        self._merged = None

    def base_rows(self, model: nn.Module) -> torch.Tensor:
        """(k, dim) fp32 rows W[ids] without this delta (PEFT saves W[ids] + delta)."""
        if self._merged is not None:
            return self._merged[0].float()
        return model.get_submodule(self.embedding).weight[self.ids].detach().float()

    def extra_repr(self) -> str:
        return f"embedding={self.embedding}, rows={len(self.ids)}, dim={self.dim}"


def parse_token_spec(spec: str, tokenizer: object) -> list[int]:
    """Ids of ``--trainable-tokens`` entries: comma-separated ids (101) or vocabulary tokens
    (red, ##s, Ġred); an all-digit entry is an id. ValueError naming an entry the vocabulary
    lacks."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    ids = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            raise ValueError(f"--trainable-tokens {spec!r}: empty entry")
        if entry.isdigit():
            ids.append(int(entry))
            continue
        if entry not in vocab:
            pieces = tokenizer.tokenize(entry)  # type: ignore[attr-defined]
            raise ValueError(f"--trainable-tokens: {entry!r} is not one token of this "
                             f"vocabulary (it splits into {pieces}); name its tokens or ids")
        ids.append(vocab[entry])
    return ids


def target_token_ids(label_batches: Iterable[torch.Tensor]) -> list[int]:
    """The sorted distinct ids in label tensors, -100 (ignored positions) left out."""
    seen: set[int] = set()
    for labels in label_batches:
        seen.update(labels[labels != -100].unique().tolist())
    return sorted(seen)


def resolve_trainable_tokens(spec: str, tokenizer: object,
                             target_labels: Callable[[], Iterable[torch.Tensor]]
                             ) -> tuple[int, ...]:
    """``--trainable-tokens`` as sorted ids: ``auto`` = every id in the training targets
    (``target_labels()`` yields label tensors), else parse_token_spec's ids and tokens."""
    ids = target_token_ids(target_labels()) if spec == "auto" else parse_token_spec(spec, tokenizer)
    if not ids:
        raise ValueError(f"--trainable-tokens {spec!r} names no token")
    return tuple(sorted(set(ids)))  # the range is checked against the embedding (TokenRows)


def task_target_labels(task: object, samples: Sequence[object],
                       batch_size: int = 64) -> Iterator[torch.Tensor]:
    """The label tensors the training collator makes of ``samples``; a 1-pixel placeholder
    stands in for each image (labels come from the text alone), so no image is read."""
    from PIL import Image  # only here: the rest of lora/ needs no imaging

    blank = Image.new("RGB", (1, 1))
    for i in range(0, len(samples), batch_size):
        items = [task.item(s, blank) for s in samples[i:i + batch_size]]  # type: ignore[attr-defined]
        yield task.collate(items)["labels"]  # type: ignore[attr-defined]
