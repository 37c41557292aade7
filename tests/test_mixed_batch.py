"""Mixed-adapter batches: one forward where each sample uses its own adapter (or none) equals
running the batch once per adapter and keeping that adapter's rows."""

import pytest
import torch
from blip2_tiny import tiny_blip2
from conftest import VOCAB, randomize_adapters, tiny_blip
from torch import nn

from lora import LoRAConfig, LoRAInjection, inject_lora
from lora.mixed_batch import RowPlan

NAMES = ["a", "b", None, "a", "c", "b"]  # adapter of each sample; None: the base


@pytest.fixture
def setup():
    """Tiny BLIP with three adapters on different targets and ranks, deltas non-zero."""
    model = tiny_blip()
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8), name="a")
    inj.add_adapter("b", LoRAConfig(r=2, alpha=3, targets=("text",)))
    inj.add_adapter("c", LoRAConfig(r=8, alpha=8, targets=("vision", "attention.self.query")))
    randomize_adapters(inj, std=0.2)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (len(NAMES), 7), generator=g)
    ids[:, 0] = 1
    return model, inj, {"pixel_values": torch.randn(len(NAMES), 3, 32, 32, generator=g),
                        "input_ids": ids}


def one_at_a_time(inj: LoRAInjection, names, run) -> torch.Tensor:
    """The naive loop: each adapter (set_active) runs ``run(rows)`` on its own samples only;
    the results are put back in sample order."""
    out = None
    for name in dict.fromkeys(names):
        inj.set_active([] if name is None else [name])
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        result = run(rows)
        if out is None:
            out = torch.zeros((len(names), *result.shape[1:]), dtype=result.dtype)
        out[rows] = result
    return out


def rows_of(batch: dict, rows: torch.Tensor) -> dict:
    return {k: v[rows] for k, v in batch.items()}


@pytest.mark.parametrize("grad", [False, True])
def test_forward_equals_one_adapter_at_a_time(setup, grad):
    # no_grad writes into each Linear's output in place; with autograd on, into a copy
    model, inj, batch = setup
    with torch.set_grad_enabled(grad):
        expected = one_at_a_time(inj, NAMES, lambda r: model(**rows_of(batch, r)).logits)
        inj.set_active(["a", "b"])  # per_sample ignores what is active
        with inj.per_sample(NAMES):
            mixed = model(**batch).logits
    if grad:  # gradients flow to every adapter that has samples in the batch
        mixed.sum().backward()
        assert all(p.grad is not None for n in "abc" for p in inj.adapter_parameters(n))
    with torch.no_grad():
        mixed = mixed.detach()
        after = model(**batch).logits
        inj.set_active(["a", "b"])
        assert torch.equal(after, model(**batch).logits)  # the ordinary hooks are back
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-6)
    # and each adapter really changed its samples: the rows differ from the base's
    with torch.no_grad(), inj.per_sample([None] * len(NAMES)):
        base = model(**batch).logits
    for i, name in enumerate(NAMES):
        assert (name is None) == torch.equal(mixed[i], base[i])


def test_generate_with_beams_equals_one_adapter_at_a_time(setup):
    # generate repeats each sample num_beams times on the text side (B·3 rows) while the vision
    # tower and the image embeddings stay at B rows: both are assigned per sample.
    model, inj, batch = setup
    kw = dict(max_new_tokens=6, num_beams=3, min_new_tokens=6)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        expected = one_at_a_time(inj, NAMES, lambda r: model.generate(pixels[r], **kw))
        with inj.per_sample(NAMES):
            mixed = model.generate(pixels, **kw)
    assert torch.equal(mixed, expected)
    assert len({tuple(expected[i].tolist()) for i in range(len(NAMES))}) > 1  # not all alike


def test_single_adapter_and_all_base(setup):
    model, inj, batch = setup
    with torch.no_grad():
        inj.set_active(["b"])
        only_b = model(**batch).logits
        inj.set_active([])
        base = model(**batch).logits
        with inj.per_sample(["b"] * len(NAMES)):
            assert torch.equal(model(**batch).logits, only_b)
        with inj.per_sample([None] * len(NAMES)):
            assert torch.equal(model(**batch).logits, base)


def listed(groups) -> list:
    """(name, row list) whether the plan gave a slice (contiguous rows) or indices."""
    return [(n, list(range(r.start, r.stop)) if isinstance(r, slice) else r.tolist())
            for n, r in groups]


def test_row_plan_expands_each_sample_to_its_k_rows():
    cpu = torch.device("cpu")
    plan = RowPlan(["x", None, "y", "x"])
    assert listed(plan.groups(4, cpu)) == [("x", [0, 3]), ("y", [2])]
    # k = 3 (beams, or (B, 3, d) flattened): sample i owns rows 3i, 3i+1, 3i+2
    assert listed(plan.groups(12, cpu)) == [("x", [0, 1, 2, 9, 10, 11]), ("y", [6, 7, 8])]
    assert isinstance(plan.groups(12, cpu)[1][1], slice)  # contiguous rows: a view, no gather
    with pytest.raises(ValueError, match="10 rows, not a multiple of the 4"):
        plan.groups(10, cpu)


def test_rows_are_indexed_once_per_expansion_not_per_layer(setup, monkeypatch):
    model, inj, batch = setup
    built = []
    original = RowPlan._build
    monkeypatch.setattr(RowPlan, "_build", lambda self, rows, device: built.append(rows)
                        or original(self, rows, device))
    with torch.no_grad(), inj.per_sample(NAMES):
        model.generate(pixel_values=batch["pixel_values"], max_new_tokens=3, num_beams=2)
    assert sorted(built) == [len(NAMES), 2 * len(NAMES)]  # image batch, beam-expanded text


def test_flattened_batch_rows_follow_their_sample():
    # A Linear fed (B·T, d): row i is sample i // T, as repeat_interleave lays it out.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3))
    inj = inject_lora(net, LoRAConfig(r=2, alpha=3, targets=("0",)), name="a")
    inj.add_adapter("b", LoRAConfig(r=4, alpha=5, targets=("0",)))
    randomize_adapters(inj, std=0.3)
    x = torch.randn(3, 4, 5)
    with torch.no_grad(), inj.per_sample(["b", None, "a"]):
        flat = net(x.reshape(12, 5)).view(3, 4, 3)
    with torch.no_grad():
        expected = one_at_a_time(inj, ["b", None, "a"], lambda r: net(x[r]))
    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-6)


def test_blip2_opt_forward_equals_one_adapter_at_a_time():
    model, processor = tiny_blip2("opt")
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("qformer", "language")),
                      name="a")
    inj.add_adapter("b", LoRAConfig(r=4, alpha=4, targets=("language",)))
    randomize_adapters(inj, std=0.1)
    from PIL import Image
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    enc = processor(images=images, text=["a red", "two", "a blue cube"], padding="longest",
                    return_tensors="pt")
    names = ["b", "a", None]
    with torch.no_grad():
        expected = one_at_a_time(inj, names, lambda r: model(**rows_of(enc, r)).logits)
        with inj.per_sample(names):
            mixed = model(**enc).logits
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-6)


def test_bad_uses_fail_clearly(setup):
    model, inj, batch = setup
    with pytest.raises(KeyError, match="no adapter named 'zz'"), inj.per_sample(["a", "zz"]):
        pass
    with pytest.raises(ValueError, match="one adapter name"), inj.per_sample([]):
        pass
    four = ["a", "b", None, "a"]  # for 6 samples
    with pytest.raises(ValueError, match="not a multiple of the 4"), torch.no_grad(), \
            inj.per_sample(four):
        model(**batch)
    inj.set_active(["a"])
    inj.merge()
    with pytest.raises(RuntimeError, match="merged into the base weights"), \
            inj.per_sample(NAMES):
        pass
    inj.unmerge()
    with pytest.raises(RuntimeError, match="changed inside"), torch.no_grad(), \
            inj.per_sample(NAMES):
        inj.set_active(["b"])
        model(**batch)
    with torch.no_grad():  # the failed block left the ordinary hooks in place
        inj.set_active(["b"])
        ref = model(**batch).logits
        with inj.per_sample(["b"] * len(NAMES)):
            assert torch.equal(model(**batch).logits, ref)


def test_pipeline_predict_each_equals_activate_one_at_a_time(tmp_path):
    from conftest import COLOURS, write_tiny_model_dir
    from PIL import Image
    from transformers import BlipForConditionalGeneration

    from lora import save_adapter
    from models.api import Pipeline

    base = write_tiny_model_dir(tmp_path / "base")
    paths = []
    for seed, targets in ((0, ("vision", "text")), (1, ("text",))):
        inj = inject_lora(BlipForConditionalGeneration.from_pretrained(base),
                          LoRAConfig(r=4, alpha=8, targets=targets))
        randomize_adapters(inj, seed=seed, std=0.3)
        paths.append(save_adapter(inj, tmp_path / f"a{seed}.safetensors", base_model=str(base),
                                  extra={"task": "caption", "prompt": "a"}))
    pipe = Pipeline(str(base), paths)
    first, second = pipe.adapter_names
    images = [Image.new("RGB", (32, 32), c) for c in [*COLOURS.values(), (90, 90, 90)]]
    names = [second, first, first, second]
    kw = dict(num_beams=2, max_new_tokens=5)
    each = pipe.predict_each(images, names, **kw)
    alone = {n: pipe.activate(n).predict(images, None, **kw) for n in (first, second)}
    assert each == [alone[n][i] for i, n in enumerate(names)]
    assert alone[first] != alone[second]  # the two adapters caption differently
    with pytest.raises(ValueError, match="different prompts"):  # the base has no prompt
        pipe.predict_each(images, [None, first, first, first], **kw)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        pipe.predict_each(images, ["nope"] * 4)
    with pytest.raises(ValueError, match="4 images but 1 adapter names"):
        pipe.predict_each(images, [first])
