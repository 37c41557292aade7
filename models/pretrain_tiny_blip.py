"""Pretrain a tiny BlipForConditionalGeneration on shape scenes: a stand-in LoRA base model.

    python -m models.pretrain_tiny_blip --out models/tiny_blip --seed 0

Same architecture as Salesforce/blip-image-captioning-* (ViT encoder + BERT decoder with
cross-attention), shrunk to ~1M parameters so it trains on 2 CPU cores in minutes. It is trained
fully (no LoRA) on in-memory shape scenes from data/scenes.py ("a red circle left of a green
square", "a lone purple triangle", "an empty canvas"), a caption style and vocabulary different
from the cube captions it will later be adapted to. Writes to --out: vocab.txt and tokenizer
files, preprocessor_config.json, config.json, generation_config.json, model.safetensors and a
README.md model card holding the numbers measured by this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import string
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tqdm import tqdm
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipPreTrainedModel,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from data.scenes import COLOURS, RELATIONS, SHAPES, render_shape_scene, sample_shape_scene
from data.scenes import shape_caption as caption_of

log = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# General English words so that any short caption a user writes tokenizes into whole words;
# includes the cube captions' words (cube, block, stacked, single, present, image, no, is).
_COMMON_TEXT = """
the a an of and or with without on in at to from by for over under into onto off up down out
is are was were be been being has have had do does did not no yes there here this that these
those it its they them their he she his her we our you your i me my one two three four five six
seven eight nine ten zero first second third last next other another some any all each every
both many few more most less least only just also very too much lot lots several pair pairs
single double lone alone empty blank plain nothing none something thing things object objects
cube cubes block blocks box boxes brick bricks stack stacks stacked stacking pile piled tower
toy toys ball balls sphere circle circles square squares triangle triangles rectangle shape
shapes cylinder cone pyramid ring star line lines dot dots piece pieces part side sides face
top bottom middle center centre left right above below beside behind front back next between
near far close together apart atop upon underneath beneath inside outside around across along
against sitting sits sit standing stands stand resting rests rest lying lies placed place put
shown showing shows show visible present absent appears appear seen see look looks looking
image images picture pictures photo photos photograph scene scenes view canvas background
foreground floor table ground surface wall room white black grey gray red green blue yellow
purple orange pink brown violet cyan magenta gold silver dark light bright pale colour color
colored coloured big small large tiny little huge long short tall wide narrow flat round solid
hollow same different another which what where who how why when than then as but if so can
could will would should may might must make makes made get gets got take takes go goes going
come comes man woman person people cat dog car tree house water sky sun
day night new old good bad great best better high low full half whole end edge corner row
column group set kind type way time number count 3d 2d
"""
COMMON_WORDS = _COMMON_TEXT.split()


def build_tokenizer(out: Path, task_words: list[str]) -> BertTokenizer:
    """Write vocab.txt (specials, chars, ##chars, whole words) and load it as a BertTokenizer."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'\"-:;()/&")
    vocab = SPECIAL + chars + ["##" + c for c in chars]
    for w in task_words + COMMON_WORDS:
        if w not in vocab and all(c in chars for c in w):  # keep whole words BERT can emit
            vocab.append(w)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizer(vocab_file=...) silently ignores the file in transformers 5.x: pass vocab=
    return BertTokenizer(vocab=str(out / "vocab.txt"), model_max_length=40)  # = text positions


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2D sin-cos position code, row-major like the ViT patch order."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega  # (grid*grid, dim/4)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


def build_model(
    tok: BertTokenizer, image_size: int, hidden: int, layers: int,
    model_cls: type[BlipPreTrainedModel] = BlipForConditionalGeneration,
) -> BlipPreTrainedModel:
    """A tiny BLIP (captioner, or ``model_cls``) whose special ids match the tokenizer (generate
    relies on them). Vision and text share one width, as BlipForQuestionAnswering requires."""
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in
           [("bos", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")]}
    vision = BlipVisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, image_size=image_size, patch_size=8,
        initializer_range=0.02,  # the BlipVisionConfig default 1e-10 gives a dead vision tower
    )
    text = BlipTextConfig(
        vocab_size=len(tok), hidden_size=hidden, encoder_hidden_size=hidden,
        intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=40, initializer_range=0.02, label_smoothing=0.0,
        # generate() forces input_ids[:, 0] = bos and stops on sep: make them [CLS] and [SEP],
        # which is what the tokenizer puts around every caption we train on
        bos_token_id=ids["bos"], sep_token_id=ids["sep"], eos_token_id=ids["sep"],
        pad_token_id=ids["pad"],
    )
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=hidden, initializer_range=0.02)
    config.pad_token_id, config.bos_token_id = ids["pad"], ids["bos"]
    config.eos_token_id = ids["sep"]
    model = model_cls(config)
    # Start patch positions at a 2D sin-cos code (as MAE does) instead of noise, so patch tokens
    # carry a usable "where" from step 0: the captions are all about where things are.
    pos = model.vision_model.embeddings.position_embedding  # (1, 1 + grid**2, hidden)
    with torch.no_grad():
        pos[0, 0].zero_()  # class token
        pos[0, 1:] = sincos_2d(image_size // vision.patch_size, hidden)
    model.generation_config.max_length = text.max_position_embeddings
    model.generation_config.num_beams = 1
    model.generation_config.do_sample = False
    return model


def make_shape_set(n: int, seed: int, processor: BlipProcessor) -> dict:
    """n fresh shape scenes (64 px, as the cube dataset stores them) as processor tensors."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in tqdm(range(n), desc=f"render {n} shape scenes", leave=False):
        objects, relation = sample_shape_scene(rng)
        images.append(render_shape_scene(objects, relation, rng, size=64))
        captions.append(caption_of(objects, relation))
    batch = processor(images=images, text=captions, padding="longest", return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # pad is not a target
    return {"pixel_values": batch.pixel_values, "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask, "labels": labels, "captions": captions}


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to peak, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def greedy_captions(model: BlipForConditionalGeneration, processor: BlipProcessor,
                    pixel_values: torch.Tensor, batch_size: int = 128) -> list[str]:
    """Greedy-decode a caption for every image in pixel_values (N, 3, H, W)."""
    model.eval()
    out = []
    for i in range(0, len(pixel_values), batch_size):
        ids = model.generate(pixel_values=pixel_values[i:i + batch_size], num_beams=1,
                             do_sample=False, max_length=40)
        out += [s.strip() for s in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


def exact_match(pred: list[str], ref: list[str]) -> float:
    """Fraction of predictions equal to their reference string."""
    return sum(p == r for p, r in zip(pred, ref, strict=True)) / max(1, len(ref))


def train(model: BlipForConditionalGeneration, data: dict, args: argparse.Namespace) -> None:
    """Full fine-tuning of every weight: AdamW, warm-up + cosine, optional bf16 autocast."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases, LayerNorms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n, total = len(data["labels"]), args.steps
    model.train()
    bar = tqdm(range(total), desc="pretrain")
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in bar:
        if pos + args.batch_size > n:  # new epoch: reshuffle
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.warmup, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            batch = {k: data[k][idx] for k in ("pixel_values", "input_ids", "attention_mask",
                                               "labels")}
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")


def eval_cubes(out: Path, annotations: Path) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Reload the saved model; exact match of its greedy captions per cube test split + examples."""
    model = BlipForConditionalGeneration.from_pretrained(out)
    processor = BlipProcessor.from_pretrained(out)
    rows = [json.loads(line) for line in annotations.read_text().splitlines() if line.strip()]
    images = [Image.open(annotations.parent / r["image"]).convert("RGB") for r in rows]
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    pred = greedy_captions(model, processor, pixel_values)
    result, examples = {}, []
    for split in sorted({r.get("split", "all") for r in rows}):
        keep = [i for i, r in enumerate(rows) if r.get("split", "all") == split]
        result[split] = exact_match([pred[i] for i in keep], [rows[i]["text"] for i in keep])
        examples += [(rows[i]["text"], pred[i]) for i in keep[:2]]
    for ref, p in examples:
        log.info("cube  ref: %-40s  pred: %s", ref, p)
    return result, examples


def write_card(out: Path, args: argparse.Namespace, stats: dict) -> None:
    """README.md model card with what this is and the numbers this run measured."""
    cubes = ", ".join(f"{k} {v:.1%}" for k, v in stats["cube_exact_match"].items()) or "not run"
    examples = "\n".join(f"  - `{ref}` -> `{pred}`" for ref, pred in stats["cube_examples"])
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if not isinstance(v, bool))
    flags += " --bf16" * args.bf16
    text = f"""# tiny_blip: a tiny BLIP captioner pretrained on flat shape scenes

**What it is.** A `BlipForConditionalGeneration` with the same architecture as
`Salesforce/blip-image-captioning-base/large` (ViT image encoder + BERT text decoder with
cross-attention), shrunk to {stats['params']:,} parameters: vision {args.layers} layers, text
{args.layers} layers, hidden {args.hidden}, 4 heads, MLP {4 * args.hidden}, 64x64 px images in
8x8 patches, a {stats['vocab']}-token WordPiece vocabulary. It is **not** a real BLIP: it has
never seen natural images or real captions. It exists as a small, honest, *pretrained* base
model for LoRA experiments that run on a CPU in seconds.

**Training.** Full training of all weights from random init (initializer_range 0.02; vision
patch positions start at a 2D sin-cos code, then train) on
{args.n_train:,} procedurally rendered shape scenes (`data/scenes.py`: circles, squares and
triangles in red/green/blue/yellow/purple/orange; one shape, two shapes named in reading order
("left of" / "above"), or an empty canvas; squares touching vertically in all 30 colour pairs).
AdamW lr {args.lr}, weight decay {args.weight_decay}, batch {args.batch_size}, {args.steps} steps
({args.warmup} warm-up, cosine decay), bf16 autocast {'on' if args.bf16 else 'off'}, seed
{args.seed}, {args.threads} CPU threads.

**Caption style.** `a red circle left of a green square`, `a yellow square above a blue square`,
`a lone purple triangle`, `an empty canvas`. It knows nothing about the cube captions of this
repository (`a single red cube`, `a blue cube stacked on a green cube`,
`no block is present in the image`): those words are in its vocabulary but it never produced them.

**Measured by the run that wrote this directory.**
- Greedy exact match on {args.n_eval} fresh held-out shape scenes: {stats['shape_exact_match']:.1%}
- Greedy exact match on the cube test captions (`annotations_test.jsonl`): {cubes}. It
  describes cube images in its own style, e.g. (reference -> its caption):
{examples}
- Wall time: {stats['wall_s']:.0f} s ({platform.processor() or platform.machine()},
  torch {torch.__version__}, transformers {transformers.__version__})

**Reproduce.**

```
python -m models.pretrain_tiny_blip {flags}
```

Load with `BlipForConditionalGeneration.from_pretrained(dir)` and
`BlipProcessor.from_pretrained(dir)`. Special ids: bos = [CLS], sep = eos = [SEP], pad = [PAD]
(BLIP's `generate()` starts from bos and stops on sep).
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def add_recipe_args(p: argparse.ArgumentParser, n_eval: int, steps: int, threads: int,
                    batch_size: int = 32, batch_help: str = "examples per step") -> None:
    """The flags every tiny-model recipe shares (defaults, and what a batch counts, differ per
    recipe)."""
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and shuffling")
    p.add_argument("--n-train", type=int, default=6000, help="shape scenes to train on")
    p.add_argument("--n-eval", type=int, default=n_eval,
                   help="fresh held-out shape scenes to score")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on matrices")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of vision and text")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (results can differ in the last bits across counts)")


def start_recipe(args: argparse.Namespace) -> None:
    """Logging, threads and every seed a recipe draws from."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()  # the torchvision-fallback warning is noise here
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/tiny_blip"),
                   help="output directory (default models/tiny_blip)")
    add_recipe_args(p, n_eval=500, steps=3600, threads=2)
    p.add_argument("--layers", type=int, default=2, help="layers in vision and in text")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--cube-annotations", type=Path, default=Path("annotations_test.jsonl"),
                   help="cube test split to score the saved model on ('' to skip)")
    args = p.parse_args()
    start_recipe(args)
    t0 = time.time()

    task_words = ["a", "an", "lone", "empty", "canvas", *COLOURS, *SHAPES,
                  *" ".join(RELATIONS).split()]
    tok = build_tokenizer(args.out, task_words)
    image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tok)
    model = build_model(tok, 64, args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("vocab %d tokens, model %d parameters", len(tok), n_params)

    # seeds seed+1 / seed+2 keep train and held-out scenes independent of the init stream
    data = make_shape_set(args.n_train, args.seed + 1, processor)
    held = make_shape_set(args.n_eval, args.seed + 2, processor)
    train(model, data, args)
    shape_em = exact_match(greedy_captions(model, processor, held["pixel_values"]),
                           held["captions"])
    log.info("held-out shape exact match: %.1f%% (%d scenes)", 100 * shape_em, args.n_eval)

    model.save_pretrained(args.out)  # safetensors
    processor.save_pretrained(args.out)
    image_processor.save_pretrained(args.out)  # preprocessor_config.json, for older loaders
    tok.save_pretrained(args.out)  # vocab.txt next to tokenizer.json
    cube_em, cube_examples = {}, []
    if args.cube_annotations.is_file():
        cube_em, cube_examples = eval_cubes(args.out, args.cube_annotations)
        log.info("cube test exact match (base model): %s", cube_em)
    stats = {"params": n_params, "vocab": len(tok), "shape_exact_match": shape_em,
             "cube_exact_match": cube_em, "cube_examples": cube_examples,
             "wall_s": time.time() - t0}
    write_card(args.out, args, stats)
    log.info("wrote %s in %.0f s", args.out, stats["wall_s"])


if __name__ == "__main__":
    main()
