"""Generate the cube-scene captioning dataset (seeded, byte-identical on re-run).

    python -m data.make_dataset --seed 0

writes into --out-dir (default: the repository root)
    annotations.jsonl        train split, {"image": "image_train/00000.png", "text": ...}
    annotations_test.jsonl   test split, same fields plus "split": "normal" | "heldout_pairs"
    image_train/*.png, image_test/*.png

Train mixes ~20% single cubes, ~65% two-cube stacks, ~15% empty scenes. The test split has a
"normal" part drawn the same way (only stacks seen in training) and a "heldout_pairs" part made
only of the HELDOUT_PAIRS stacks, which never occur in train: they measure whether a model
composes colours it knows into an order it has never seen captioned.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.scenes import COLOURS, STACK_PAIRS, cube_caption, render_cube_scene

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# (top, bottom) pairs kept out of train: a 6-cycle over the colours, so every colour is still
# seen in train as a top (4 times) and as a bottom (4 times), and no pair is held out with its
# mirror image
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "green"),
    ("green", "blue"),
    ("blue", "yellow"),
    ("yellow", "purple"),
    ("purple", "orange"),
    ("orange", "red"),
)
TRAIN_PAIRS = tuple(p for p in STACK_PAIRS if p not in HELDOUT_PAIRS)
MIX = {"single": 0.20, "stacked": 0.65, "empty": 0.15}


def sample_stacks(n: int, pairs: tuple[tuple[str, str], ...], rng: np.random.Generator,
                  mix: dict[str, float] = MIX) -> list[tuple[str, ...]]:
    """n stacks with the given kind mix; colours and pairs cycle so each is equally frequent."""
    n_single, n_empty = round(n * mix["single"]), round(n * mix["empty"])
    n_stacked = n - n_single - n_empty
    colours = list(COLOURS)
    stacks = [(colours[i % len(colours)],) for i in range(n_single)]
    stacks += [pairs[i % len(pairs)] for i in range(n_stacked)]
    stacks += [()] * n_empty
    return [stacks[i] for i in rng.permutation(len(stacks))]


def write_split(stacks: list[tuple[str, ...]], out_dir: Path, image_dir: str, size: int,
                rng: np.random.Generator, start: int = 0) -> list[dict[str, str]]:
    """Render stacks to out_dir/image_dir/NNNNN.png; return their annotation records."""
    (out_dir / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for i, stack in enumerate(tqdm(stacks, desc=image_dir), start=start):
        rel = f"{image_dir}/{i:05d}.png"
        render_cube_scene(stack, rng, size=size).save(out_dir / rel, optimize=False)
        records.append({"image": rel, "text": cube_caption(stack)})
    return records


def write_jsonl(records: list[dict[str, str]], path: Path) -> None:
    """One JSON object per line, keys in insertion order, '\\n' line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the numpy generator (default 0)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT,
                   help="where annotations*.jsonl and image_*/ go (default: repository root)")
    p.add_argument("--n-train", type=int, default=400, help="train images (default 400)")
    p.add_argument("--n-test", type=int, default=100,
                   help="test images of the 'normal' split (default 100)")
    p.add_argument("--n-heldout", type=int, default=50,
                   help="test images of the 'heldout_pairs' split (default 50)")
    p.add_argument("--size", type=int, default=64,
                   help="stored image side in px; rendered at 128 then box-downscaled (default 64)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out_dir
    for d in ("image_train", "image_test"):  # stale files from a bigger earlier run would linger
        for f in sorted((out / d).glob("*.png")):
            f.unlink()
    rng = np.random.default_rng(args.seed)
    train = write_split(sample_stacks(args.n_train, TRAIN_PAIRS, rng), out, "image_train",
                        args.size, rng)
    normal = write_split(sample_stacks(args.n_test, TRAIN_PAIRS, rng), out, "image_test",
                         args.size, rng)
    heldout_stacks = [HELDOUT_PAIRS[i % len(HELDOUT_PAIRS)] for i in range(args.n_heldout)]
    heldout_stacks = [heldout_stacks[i] for i in rng.permutation(args.n_heldout)]
    heldout = write_split(heldout_stacks, out, "image_test", args.size, rng, start=len(normal))
    test = [{**r, "split": "normal"} for r in normal]
    test += [{**r, "split": "heldout_pairs"} for r in heldout]
    write_jsonl(train, out / "annotations.jsonl")
    write_jsonl(test, out / "annotations_test.jsonl")
    log.info("wrote %d train and %d test (%d normal, %d heldout_pairs) images to %s",
             len(train), len(test), len(normal), len(heldout), out)


if __name__ == "__main__":
    main()
