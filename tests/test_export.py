"""export.py: merged models that plain transformers reloads with the hooked model's logits,
PEFT directories that load_peft / infer.py read back, the model card, and one-line errors."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blip2_tiny import tiny_blip2
from conftest import randomize_adapters, tiny_blip, write_tiny_model_dir
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
)

import export
import infer
from lora import LoRAConfig, QuantizedLinear, inject_lora, load_adapter, load_peft, save_adapter
from models.api import Pipeline
from models.blip_vqa import answer_logits

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a picture of"
# Merged W + s·BA in fp32 vs the hook's W x + s·B(A x): a few ulps of logits ~1 in size.
ATOL = 1e-5
BLIP2_TARGETS = ("vision", "qformer", "language")


def image(colour=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def make_adapter(model, path: Path, base: Path, targets=("vision", "text"), task="caption",
                 prompt=PROMPT, seed=0) -> Path:
    """A random (non-zero) r=4 adapter on ``model``, saved as train.py saves it."""
    injection = inject_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    randomize_adapters(injection, seed=seed)
    save_adapter(injection, path, base_model=str(base), extra={"task": task, "prompt": prompt})
    injection.remove()
    return path


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """(base dir, run dir with adapter.safetensors + eval.json + run_config.json)."""
    root = tmp_path_factory.mktemp("blip")
    base = write_tiny_model_dir(root / "base")
    run = root / "run"
    run.mkdir()
    make_adapter(BlipForConditionalGeneration.from_pretrained(base), run / "adapter.safetensors",
                 base)
    (run / "eval.json").write_text(json.dumps({"adapter": {"all": 0.75, "normal": 0.8},
                                               "base": {"all": 0.125, "normal": 0.1}}))
    (run / "run_config.json").write_text(json.dumps({"eval_file": "my_test.jsonl"}))
    return base, run / "adapter.safetensors"


def caption_inputs(processor) -> dict:
    return processor(images=[image(), image((30, 30, 220))], text=[PROMPT + " red cube"] * 2,
                     return_tensors="pt")


def hooked(model, adapter: Path):
    """The model with the adapter attached by forward hooks (not merged)."""
    load_adapter(model, adapter)
    return model


def export_main(*argv) -> None:
    export.main([*map(str, argv), "--threads", "1"])


@torch.no_grad()
def test_merged_blip_caption_reloads_with_plain_transformers(blip, tmp_path):
    base, adapter = blip
    out = tmp_path / "merged"
    export_main("--adapter", adapter, "--out", out)
    merged = BlipForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = caption_inputs(processor)
    base_processor = AutoProcessor.from_pretrained(base)
    assert torch.equal(inputs["input_ids"], caption_inputs(base_processor)["input_ids"])
    want = hooked(BlipForConditionalGeneration.from_pretrained(base).eval(), adapter)
    want_logits = want(**inputs).logits
    plain = BlipForConditionalGeneration.from_pretrained(base).eval()(**inputs).logits
    assert (want_logits - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged(**inputs).logits, want_logits, atol=ATOL, rtol=0)
    assert not any(n.startswith(".") for n in (p.name for p in tmp_path.iterdir()))  # no temp


def test_model_card_and_sidecar(blip, tmp_path):
    base, adapter = blip
    out = tmp_path / "merged"
    export_main("--adapter", adapter, "--out", out)
    info = json.loads((out / "lora_vlm.json").read_text())
    assert (info["task"], info["prompt"], info["base_model"]) == ("caption", PROMPT, str(base))
    (record,) = info["adapters"]
    sha = hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert (record["sha256"], record["r"], record["alpha"]) == (sha, 4, 8.0)
    assert record["modules"] == 2 * 4 + 2 * 10  # vision: qkv, projection, fc1, fc2; text: 10
    card = (out / "README.md").read_text()
    for text in (sha, str(base), f"text={PROMPT!r}", "r 4, alpha 8 (scale 2)", "my_test.jsonl",
                 "all 75.0%, normal 80.0%", "base model (adapters off): all 12.5%",
                 "BlipForConditionalGeneration.from_pretrained"):
        assert text in card, text
    assert oct(next(out.glob("*.safetensors")).stat().st_mode & 0o044) == oct(0o044)


def test_eval_numbers_only_for_the_file_they_scored(blip, tmp_path):
    _, adapter = blip
    other = adapter.parent / "best.safetensors"  # train.py's eval.json scored adapter.safetensors
    other.write_bytes(adapter.read_bytes())
    export_main("--adapter", other, "--out", tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "75.0%" not in card and "evaluation: none recorded" in card


@pytest.mark.parametrize("family", ["opt", "t5"])
@torch.no_grad()
def test_merged_blip2_reloads_with_plain_transformers(family, tmp_path):
    model, processor = tiny_blip2(family)
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    adapter = make_adapter(model, tmp_path / "a.safetensors", base, targets=BLIP2_TARGETS)
    out = tmp_path / "merged"
    export_main("--adapter", adapter, "--out", out)
    processor = AutoProcessor.from_pretrained(out)
    inputs = dict(processor(images=[image()], text=["a photo of"], return_tensors="pt"))
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 8, 9]])
    merged = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    want = hooked(Blip2ForConditionalGeneration.from_pretrained(base).eval(), adapter)
    torch.testing.assert_close(merged(**inputs).logits, want(**inputs).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_merged_blip_vqa_reloads_with_plain_transformers(tmp_path):
    base = write_tiny_model_dir(tmp_path / "base", vqa=True)
    adapter = make_adapter(BlipForQuestionAnswering.from_pretrained(base), tmp_path / "a.st",
                           base, task="vqa", prompt="")
    out = tmp_path / "merged"
    export_main("--adapter", adapter, "--out", out)
    enc = AutoProcessor.from_pretrained(out)(images=[image()], text=["is the cube red?"],
                                             return_tensors="pt")
    answer = torch.tensor([[1, 40, 2]])
    batch = {**enc, "answer_ids": answer, "answer_mask": torch.ones_like(answer)}
    merged = BlipForQuestionAnswering.from_pretrained(out).eval()
    want = hooked(BlipForQuestionAnswering.from_pretrained(base).eval(), adapter)
    torch.testing.assert_close(answer_logits(merged, batch), answer_logits(want, batch),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_peft_dir_loads_back_with_the_hooked_logits(blip, tmp_path):
    base, adapter = blip
    peft = tmp_path / "peft"
    export_main("--adapter", adapter, "--peft", peft)
    assert not (tmp_path / "merged").exists()
    config = json.loads((peft / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        (4, 8.0, str(base))
    inputs = caption_inputs(AutoProcessor.from_pretrained(base))
    want = hooked(BlipForConditionalGeneration.from_pretrained(base).eval(), adapter)
    got = BlipForConditionalGeneration.from_pretrained(base).eval()
    load_peft(got, peft)
    torch.testing.assert_close(got(**inputs).logits, want(**inputs).logits, atol=0, rtol=0)
    pipe = Pipeline(adapters=[peft])  # base, task and prompt from the directory
    assert (pipe.task.name, pipe.task.prompt) == ("caption", PROMPT)
    assert "PeftModel.from_pretrained" in (peft / "README.md").read_text()


def test_infer_peft_dir_equals_adapter_file(blip, tmp_path):
    base, adapter = blip
    peft, merged = tmp_path / "peft", tmp_path / "merged"
    export_main("--adapter", adapter, "--peft", peft, "--out", merged)
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 40, 40), (30, 30, 220), (30, 200, 30)]):
        image(colour).save(images / f"{i}.png")
    argv = [str(images), "--threads", "1", "--max-new-tokens", "6"]
    from_file = infer.main([*argv, "--adapter", str(adapter)])
    assert infer.main([*argv, "--adapter", str(peft)]) == from_file
    assert infer.main([*argv, "--model", str(merged)]) == from_file  # prompt from lora_vlm.json
    assert infer.main([*argv, "--model", str(base)]) != from_file  # the adapter matters


@torch.no_grad()
def test_two_adapters_merge_into_one_model_and_fp16(blip, tmp_path):
    base, adapter = blip
    second = make_adapter(BlipForConditionalGeneration.from_pretrained(base),
                          tmp_path / "b.safetensors", base, targets=("text",), seed=3)
    out = tmp_path / "merged"
    export_main("--adapter", adapter, "--adapter", second, "--out", out)
    inputs = caption_inputs(AutoProcessor.from_pretrained(out))
    want = hooked(BlipForConditionalGeneration.from_pretrained(base).eval(), adapter)
    load_adapter(want, second)  # a second injection on the same model: deltas add up
    merged = BlipForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(merged(**inputs).logits, want(**inputs).logits, atol=ATOL, rtol=0)
    assert len(json.loads((out / "lora_vlm.json").read_text())["adapters"]) == 2
    export_main("--adapter", adapter, "--out", tmp_path / "half", "--dtype", "fp16")
    half = BlipForConditionalGeneration.from_pretrained(tmp_path / "half")
    assert half.dtype == torch.float16


def test_overwrite_replaces_only_a_complete_export(blip, tmp_path, monkeypatch, capsys):
    _, adapter = blip
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        export_main("--adapter", adapter, "--out", out)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"export.py: error: {out} is not empty: choose another directory or pass "
                   "--overwrite (which replaces it once the export is complete)"]

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BlipForConditionalGeneration, "save_pretrained", crash)
    with pytest.raises(SystemExit):
        export_main("--adapter", adapter, "--out", out, "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dir left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()
    export_main("--adapter", adapter, "--out", out, "--overwrite")
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_refuses_a_destination_holding_an_input(blip, tmp_path, capsys):
    _, adapter = blip
    with pytest.raises(SystemExit) as e:
        export_main("--adapter", adapter, "--out", adapter.parent, "--overwrite")
    assert e.value.code == 2 and "holds the input" in capsys.readouterr().err
    assert adapter.is_file()


def test_refuses_merging_into_a_tied_weight(blip, tmp_path, capsys):
    base, _ = blip
    tied = make_adapter(BlipForConditionalGeneration.from_pretrained(base),
                        tmp_path / "head.safetensors", base,
                        targets=("text_decoder.cls.predictions.decoder",))
    with pytest.raises(SystemExit) as e:
        export_main("--adapter", tied, "--out", tmp_path / "merged")
    assert e.value.code == 2 and "shared with another module" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    export_main("--adapter", tied, "--peft", tmp_path / "peft")  # PEFT keeps it an adapter
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_a_missing_adapter_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "export.py", "--adapter", "missing.safetensors",
                           "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()  # an info line on threads may come first
    assert lines[-1] == "export.py: error: missing.safetensors: no such adapter file"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_peft_export_of_two_adapters_is_refused(blip, tmp_path, capsys):
    _, adapter = blip
    with pytest.raises(SystemExit) as e:
        export_main("--adapter", adapter, "--adapter", adapter, "--peft", tmp_path / "p")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "export.py: error: --peft writes one adapter, got 2: export each alone"


def test_infer_reports_a_bad_peft_dir_in_one_line(tmp_path, capsys):
    (tmp_path / "not_peft").mkdir()
    image().save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        infer.main([str(tmp_path / "x.png"), "--adapter", str(tmp_path / "not_peft")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"infer.py: error: {tmp_path / 'not_peft'}: a directory without adapter_config.json, "
        "so not a PEFT adapter directory (lora-vlm adapters are .safetensors files)")


# --- --quantize nf4: bitsandbytes' serialized layout ----------------------------------------
@pytest.fixture(scope="module")
def wide_blip(tmp_path_factory):
    """(base dir, adapter) of a tiny BLIP whose Linears are all 64 wide: bitsandbytes' CPU
    kernels need in_features % 64 == 0 (others stay full precision in an NF4 export)."""
    root = tmp_path_factory.mktemp("wide")
    base = write_tiny_model_dir(root / "base")
    vocab = len((base / "vocab.txt").read_text().split())
    tiny_blip(hidden=64, vision_hidden=64, vocab=vocab).save_pretrained(base)
    model = BlipForConditionalGeneration.from_pretrained(base)
    return base, make_adapter(model, root / "adapter.safetensors", base)


def count_linears(base: Path) -> int:
    model = BlipForConditionalGeneration.from_pretrained(base)
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def nf4_reference(base: Path, adapter: Path):
    """infer.py --merge --quantize nf4 --no-double-quant's model."""
    return Pipeline(str(base), [adapter], merge=True, quantize="nf4", double_quant=False).model


def test_nf4_export_is_bitsandbytes_layout_of_infer_weights(wide_blip, tmp_path):
    base, adapter = wide_blip
    out = tmp_path / "nf4"
    export_main("--adapter", adapter, "--out", out, "--quantize", "nf4")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["load_in_4bit"], config["bnb_4bit_quant_type"],
            config["bnb_4bit_use_double_quant"]) == ("bitsandbytes", True, "nf4", False)
    assert config["llm_int8_skip_modules"] == ["text_decoder.cls.predictions.decoder"]
    ref = nf4_reference(base, adapter)
    quantized = {n: m for n, m in ref.named_modules() if isinstance(m, QuantizedLinear)}
    saved = load_file(out / "model.safetensors")
    assert len(quantized) == count_linears(base) - 1  # every Linear but the tied LM head
    for name, layer in quantized.items():
        packed = saved[f"{name}.weight"]
        assert packed.dtype == torch.uint8 and packed.shape == (layer.weight_packed.numel(), 1)
        state = bytes(saved[f"{name}.weight.quant_state.bitsandbytes__nf4"].tolist())
        assert json.loads(state) == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32",
                                     "shape": [layer.out_features, layer.in_features]}
        # bitsandbytes' decoding, written out: high nibble first, code × absmax of its 64-block
        idx = torch.stack((packed.flatten() >> 4, packed.flatten() & 15), 1).flatten().long()
        absmax = saved[f"{name}.weight.absmax"].repeat_interleave(64)
        weight = (saved[f"{name}.weight.quant_map"][idx] * absmax).view(layer.out_features, -1)
        assert torch.equal(weight, layer.dequantize()), name
    rest = {k: v for k, v in ref.state_dict().items() if k in saved}
    assert all(torch.equal(saved[k], v) for k, v in rest.items())
    assert len(rest) == len(saved) - 4 * len(quantized)
    card = (out / "README.md").read_text()
    assert "bitsandbytes NF4" in card and "pip install bitsandbytes accelerate" in card


@torch.no_grad()
def test_nf4_export_reloads_with_bitsandbytes(wide_blip, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # not a requirement: checked where installed
    pytest.importorskip("accelerate")
    base, adapter = wide_blip
    out = tmp_path / "nf4"
    export_main("--adapter", adapter, "--out", out, "--quantize", "nf4")
    model = BlipForConditionalGeneration.from_pretrained(out).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == count_linears(base) - 1
    for layer in layers:  # its AVX512-BF16 CPU kernel computes in bf16: use the generic one
        layer.support_avx512bf16_for_cpu = False
    inputs = caption_inputs(AutoProcessor.from_pretrained(out))
    want = nf4_reference(base, adapter)(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, want, atol=ATOL, rtol=0)


def test_nf4_export_keeps_what_transformers_keeps_in_full_precision(tmp_path):
    model, processor = tiny_blip2("opt")
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    adapter = make_adapter(model, tmp_path / "a.safetensors", base, targets=BLIP2_TARGETS)
    export_main("--adapter", adapter, "--out", tmp_path / "nf4", "--quantize", "nf4")
    kept = json.loads((tmp_path / "nf4" / "lora_vlm.json").read_text())["quantization"][
        "full_precision_linears"]
    # 64 in, 32 out: NF4-able, but Blip2 declares the Q-Former _keep_in_fp32_modules
    assert "qformer.encoder.layer.0.output_query.dense" in kept
    assert "language_model.model.decoder.layers.0.fc2" not in kept  # 64 in, 32 out: NF4
    saved = load_file(tmp_path / "nf4" / "model.safetensors")
    assert saved["language_model.model.decoder.layers.0.fc2.weight"].dtype == torch.uint8


def test_int8_export_is_refused_with_the_reason(blip, tmp_path, capsys):
    _, adapter = blip
    with pytest.raises(SystemExit) as e:
        export_main("--adapter", adapter, "--out", tmp_path / "q", "--quantize", "int8")
    assert e.value.code == 2
    assert "also quantizes the activations" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_infer_on_an_nf4_export_without_bitsandbytes_is_one_line(wide_blip, tmp_path, capsys):
    if importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("accelerate"):
        pytest.skip("bitsandbytes and accelerate are installed here")
    _, adapter = wide_blip
    export_main("--adapter", adapter, "--out", tmp_path / "nf4", "--quantize", "nf4")
    image().save(tmp_path / "x.png")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        infer.main([str(tmp_path / "x.png"), "--model", str(tmp_path / "nf4"), "--threads", "1"])
    assert e.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line.startswith("infer.py: error: ") and "bitsandbytes" in line
