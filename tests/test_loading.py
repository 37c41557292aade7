"""load_model(quantize=...): the same quantized model as load-then-quantize, without keeping the
full-precision Linear weights (or the checkpoint's memory map) alive, and without the full-
precision base ever reaching the target device."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model_dir
from torch import nn
from transformers import PreTrainedModel

from lora import QuantizedLinear, quantizable_linears, quantize_model
from models.loading import load_model

MODES = ["int8", "nf4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("m"))


def mapped_files() -> set[str]:
    """Paths of the files this process has memory-mapped (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_quantize_while_loading_equals_load_then_quantize(model_dir, batch, mode, double_quant):
    reference, _, _ = load_model(str(model_dir))
    paths = quantize_model(reference, mode, double_quant)
    model, _, _ = load_model(str(model_dir), quantize=mode, double_quant=double_quant)
    assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)] == paths
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():  # codes, scales, biases and the rest: bit-identical
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # the tied LM head still shares the word embeddings after the rest was copied
    assert model.text_decoder.cls.predictions.decoder.weight is \
        model.text_decoder.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_load_keeps_neither_fp32_weights_nor_the_mapped_file(tmp_path, mode):
    # A plain load maps the checkpoint and its tensors read from the mapping; once quantized,
    # the mapping must go, or every page quantization read stays resident next to the codes.
    checkpoint = str((write_tiny_model_dir(tmp_path / "m") / "model.safetensors").resolve())
    plain, _, _ = load_model(str(tmp_path / "m"))
    assert checkpoint in mapped_files()  # what a quantized load must not keep
    del plain
    model, _, _ = load_model(str(tmp_path / "m"), quantize=mode)
    assert checkpoint not in mapped_files()
    assert quantizable_linears(model) == []  # no full-precision Linear left to quantize
    assert all(isinstance(model.get_submodule(n), QuantizedLinear)
               for n, m in model.named_modules() if n.endswith(".query"))


def test_nothing_full_precision_moves_to_the_device_before_it_is_quantized(model_dir,
                                                                          monkeypatch):
    # "meta" stands in for a GPU: quantization runs there too, but holds no data.
    moves = []
    to = nn.Module.to

    def spy(module, *args, **kwargs):
        if isinstance(module, PreTrainedModel):  # the whole model moves: all quantized by now
            moves.append(quantizable_linears(module))
        elif isinstance(module, nn.Linear):
            moves.append(module)  # one Linear at a time, right before its quantization
        return to(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    model, _, _ = load_model(str(model_dir), device="meta", quantize="nf4")
    assert moves[-1] == []  # the model moved after every Linear it quantizes was quantized
    assert sum(isinstance(m, nn.Linear) for m in moves) == len(
        [m for m in model.modules() if isinstance(m, QuantizedLinear)])
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
