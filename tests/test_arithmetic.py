"""Adapter arithmetic (PEFT's add_weighted_adapter): cat / svd / linear against formulas written
out here, the file CLI, and FILE:WEIGHT parsing."""

import json
import math

import pytest
import torch
from conftest import randomize_adapters, tiny_blip, write_tiny_model_dir
from PIL import Image

import eval as evaluate
import infer
from lora import LoRAConfig, inject_lora, load_adapter, read_metadata, save_adapter
from lora.arithmetic import add_weighted_adapter, main, split_weight
from models.api import Pipeline
from models.loading import load_model

ATOL = 1e-5


def two_adapters(r2: int = 4, rslora: bool = False):
    """Adapters "a" (r 4, alpha 8, query+value) and "b" (r r2, alpha 3, query+key), random."""
    inj = inject_lora(tiny_blip(), LoRAConfig(r=4, alpha=8, targets=("query", "value")), "a")
    inj.add_adapter("b", LoRAConfig(r=r2, alpha=3, rslora=rslora, targets=("query", "key")))
    randomize_adapters(inj, seed=1, std=0.2)
    return inj


def delta(layer) -> torch.Tensor:
    """scale · B A, written out (scale = alpha/r, alpha/sqrt(r) with rsLoRA)."""
    scale = layer.alpha / (math.sqrt(layer.r) if layer.rslora else layer.r)
    return scale * layer.B.detach() @ layer.A.detach()


def weighted_sum(inj, names, weights) -> dict[str, torch.Tensor]:
    """Σ w_i ΔW_i per Linear, over the adapters that adapt it."""
    out: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights, strict=True):
        for path, layer in inj.adapters[name].items():
            out[path] = out.get(path, 0) + w * delta(layer)
    return out


def deltas(inj, name) -> dict[str, torch.Tensor]:
    return {p: delta(m) for p, m in inj.adapters[name].items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exactly_the_weighted_sum_of_deltas(rslora):
    inj = two_adapters(r2=2, rslora=rslora)
    add_weighted_adapter(inj, ["a", "b"], [0.7, -1.3], "ab", method="cat")
    want, got = weighted_sum(inj, ["a", "b"], [0.7, -1.3]), deltas(inj, "ab")
    assert got.keys() == want.keys() and len(want) == 12  # union: query, value, key × 4 layers
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=0, atol=ATOL)
    query = "text_decoder.bert.encoder.layer.0.attention.self.query"
    ab = dict(inj.adapters["ab"].items())
    assert ab[query].r == 6 and ab[query].scale == 1.0  # ranks add up; alpha = r
    assert ab[query.replace("query", "value")].r == 4  # only "a" adapts value


def test_cat_model_equals_both_adapters_applied_with_their_weights(batch):
    inj = two_adapters()
    add_weighted_adapter(inj, ["a", "b"], [0.5, 2.0], "ab", method="cat", activate=False)
    inj.set_scale("a", 0.5)
    inj.set_scale("b", 2.0)
    inj.set_active(["a", "b"])
    with torch.no_grad():
        both = inj.model(**batch).logits
    inj.set_active(["ab"])
    with torch.no_grad():
        torch.testing.assert_close(inj.model(**batch).logits, both, rtol=0, atol=ATOL)


def test_svd_at_full_rank_is_the_weighted_sum():
    inj = two_adapters()
    add_weighted_adapter(inj, ["a", "b"], [0.7, 0.4], "s", method="svd", rank=8)
    want, got = weighted_sum(inj, ["a", "b"], [0.7, 0.4]), deltas(inj, "s")
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=0, atol=ATOL)


def test_svd_truncates_to_the_best_rank_k_approximation():
    inj = two_adapters()
    add_weighted_adapter(inj, ["a", "b"], [0.7, 0.4], "s", method="svd", rank=2)
    want, got = weighted_sum(inj, ["a", "b"], [0.7, 0.4]), deltas(inj, "s")
    for p in want:
        u, s, vh = torch.linalg.svd(want[p])
        torch.testing.assert_close(got[p], u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=0,
                                   atol=ATOL)
    assert {m.r for _, m in inj.adapters["s"].items()} == {2}


def test_svd_default_rank_is_the_largest_input_rank():
    inj = two_adapters(r2=2)
    add_weighted_adapter(inj, ["a", "b"], [1.0, 1.0], "s", method="svd")
    query = "text_decoder.bert.encoder.layer.0.attention.self.query"
    assert dict(inj.adapters["s"].items())[query].r == 4


def test_linear_follows_peft_formula():
    """A = Σ sign(w) sqrt(|w| s) A_i, B = Σ sqrt(|w| s) B_i (cross terms included)."""
    inj = two_adapters()
    weights = {"a": 0.6, "b": -0.8}
    add_weighted_adapter(inj, list(weights), list(weights.values()), "lin", method="linear")
    query = "text_decoder.bert.encoder.layer.1.attention.self.query"
    a, b = (dict(inj.adapters[n].items())[query] for n in "ab")
    sa, sb = 8 / 4, 3 / 4
    want_a = math.sqrt(0.6 * sa) * a.A - math.sqrt(0.8 * sb) * b.A
    want_b = math.sqrt(0.6 * sa) * a.B + math.sqrt(0.8 * sb) * b.B
    got = dict(inj.adapters["lin"].items())[query]
    torch.testing.assert_close(got.A, want_a.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(got.B, want_b.detach(), rtol=0, atol=ATOL)
    assert got.scale == 1.0


def test_linear_of_one_adapter_scales_its_delta_even_negatively():
    inj = two_adapters()
    add_weighted_adapter(inj, ["a"], [-0.5], "neg", method="linear")
    for p, d in deltas(inj, "neg").items():
        torch.testing.assert_close(d, -0.5 * deltas(inj, "a")[p], rtol=0, atol=ATOL)


def test_refusals():
    inj = two_adapters(r2=2)
    with pytest.raises(ValueError, match="linear needs adapters of one rank"):
        add_weighted_adapter(inj, ["a", "b"], [1, 1], "x", method="linear")
    with pytest.raises(ValueError, match="method 'sum'"):
        add_weighted_adapter(inj, ["a", "b"], [1, 1], "x", method="sum")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        add_weighted_adapter(inj, ["a", "b"], [1], "x", method="cat")
    with pytest.raises(ValueError, match="only svd takes a rank"):
        add_weighted_adapter(inj, ["a", "b"], [1, 1], "x", method="cat", rank=3)
    assert "x" not in inj.adapters
    pissa = inject_lora(tiny_blip(), LoRAConfig(r=2, alpha=4, init="pissa", targets=("query",)))
    with pytest.raises(ValueError, match=r"PiSSA/OLoRA adapter .* convert it first"):
        add_weighted_adapter(pissa, ["default"], [1], "x", method="cat")


# --- files and the command line ---------------------------------------------------------------
def saved_pair(tmp_path):
    inj = two_adapters()
    extra = {"task": "caption", "prompt": "a picture of "}
    for name in "ab":
        save_adapter(inj, tmp_path / f"{name}.safetensors", name=name, base_model="m",
                     extra=extra)
    return inj


def test_cli_writes_the_combination_as_an_adapter_file(tmp_path, capsys):
    inj = saved_pair(tmp_path)
    out = tmp_path / "ab.safetensors"
    main([f"{tmp_path}/a.safetensors:0.7", f"{tmp_path}/b.safetensors:-0.2", "--method", "cat",
          "-o", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    loaded = load_adapter(tiny_blip(), out)
    want = weighted_sum(inj, ["a", "b"], [0.7, -0.2])
    for p, d in deltas(loaded, "ab").items():
        torch.testing.assert_close(d, want[p], rtol=0, atol=ATOL)
    meta = read_metadata(out)
    assert (meta["task"], meta["prompt"], meta["base_model"]) == ("caption", "a picture of ", "m")
    combined = json.loads(meta["combined_from"])
    assert combined["method"] == "cat"
    assert [x["weight"] for x in combined["adapters"]] == [0.7, -0.2]


def test_cli_errors_are_one_line(tmp_path):
    saved_pair(tmp_path)
    a = f"{tmp_path}/a.safetensors"
    for argv, message in (([f"{a}:x"], "weight 'x' is not a finite number"),
                          ([f"{a}:inf"], "weight 'inf' is not a finite number"),
                          ([f"{tmp_path}/none.safetensors"], "no such adapter file"),
                          ([a, f"{a}:2", "--method", "svd", "--rank", "0"], "must be positive")):
        with pytest.raises(SystemExit, match=message) as e:
            main([*argv, "-o", str(tmp_path / "o.safetensors")])
        assert "\n" not in str(e.value)


def test_cli_refuses_adapters_of_different_bases(tmp_path):
    saved_pair(tmp_path)
    other = inject_lora(tiny_blip(hidden=16), LoRAConfig(r=2, alpha=4, targets=("query",)))
    save_adapter(other, tmp_path / "c.safetensors")
    with pytest.raises(SystemExit, match="different base_fingerprint"):
        main([f"{tmp_path}/a.safetensors", f"{tmp_path}/c.safetensors", "-o",
              str(tmp_path / "o.safetensors")])


def test_split_weight(tmp_path):
    assert split_weight("runs/x/adapter.safetensors:0.7") == ("runs/x/adapter.safetensors", 0.7)
    assert split_weight("a.safetensors:-2") == ("a.safetensors", -2.0)
    assert split_weight("a.safetensors") == ("a.safetensors", 1.0)
    odd = tmp_path / "a:0.5.safetensors"  # an existing path keeps its colon
    odd.write_bytes(b"")
    assert split_weight(odd) == (str(odd), 1.0)
    with pytest.raises(ValueError, match="weight 'nan' is not a finite number"):
        split_weight("a.safetensors:nan")


# --- PATH:WEIGHT in the Python API, infer.py and eval.py --------------------------------------
def test_pipeline_weight_scales_the_delta_before_merging(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "m")
    model, _, _ = load_model(str(model_dir))
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("query",)))
    randomize_adapters(inj, seed=3, std=0.2)
    path = save_adapter(inj, tmp_path / "a.safetensors", base_model=str(model_dir),
                        extra={"task": "caption"})
    base = dict(load_model(str(model_dir))[0].named_parameters())
    pipe = Pipeline(str(model_dir), [f"{path}:0.5"], merge=True, device="cpu")
    merged = dict(pipe.model.named_parameters())
    for p, layer in inj.adapters["default"].items():
        want = base[f"{p}.weight"] + 0.5 * (4 / 2) * layer.B @ layer.A  # W + w·(alpha/r)·BA
        torch.testing.assert_close(merged[f"{p}.weight"], want.detach(), rtol=0, atol=ATOL)
    assert pipe.adapter_paths == [str(path)]


def test_infer_and_eval_refuse_a_bad_weight_in_one_line(tmp_path, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "m")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    capsys.readouterr()  # the model writer's progress bar
    for entry, argv in ((infer.main, [str(image)]),
                        (evaluate.main, ["--out-dir", str(tmp_path / "e")])):
        with pytest.raises(SystemExit) as e:
            entry([*argv, "--model", str(model_dir), "--adapter", "a.safetensors:0,7"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("weight '0,7' is not a finite number (FILE:WEIGHT, e.g. "
                            "adapter.safetensors:0.7)")
        assert "\n" not in err and "Traceback" not in err


def test_eval_names_a_weighted_column_by_its_weight():
    assert evaluate.column_names(["runs/x/adapter.safetensors:0.7", "runs/x/adapter.safetensors",
                                  "b.safetensors:-1"]) == ["x:0.7", "x", "b:-1"]
