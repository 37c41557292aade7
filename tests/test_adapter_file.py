"""Adapter files: exact round trips, exact key sets, and a clear error for every bad file."""

import json

import pytest
import torch
from conftest import randomize_adapters, tiny_blip
from safetensors import safe_open
from safetensors.torch import save_file

from lora import (
    AdapterFileError,
    LoRAConfig,
    inject_lora,
    load_adapter,
    read_metadata,
    save_adapter,
)

CFG = LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("vision", "attention.self.query"),
                 rank_pattern={"qkv": 2})


@pytest.fixture
def saved(tmp_path, batch):
    model = tiny_blip()
    inj = inject_lora(model, CFG)
    randomize_adapters(inj)
    with torch.no_grad():
        expected = model(**batch).logits
    path = save_adapter(inj, tmp_path / "adapter.safetensors", base_model="tiny-test")
    return path, inj, expected


def test_save_load_bit_identical(saved, batch, tmp_path):
    path, _inj, expected = saved
    model = tiny_blip()
    loaded = load_adapter(model, path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
    assert list(loaded.adapters) == ["adapter"]
    layer = dict(loaded.adapters["adapter"].items())["vision_model.encoder.layers.0.self_attn.qkv"]
    assert (layer.r, layer.alpha, layer.dropout) == (2, 8.0, 0.1)
    assert list(tmp_path.iterdir()) == [path]  # atomic write left no temp file


def test_saved_keys_are_exactly_the_adapter_set(saved):
    path, inj, _ = saved
    paths = inj.adapters["default"].paths
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert keys == {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    assert len(paths) == 4 * 2 + 2  # vision preset + one query per text layer


def test_metadata_records_settings(saved):
    path, _inj, _ = saved
    meta = read_metadata(path)
    assert meta["lora_vlm_format"] == "1" and meta["base_model"] == "tiny-test"
    assert LoRAConfig.from_dict(json.loads(meta["config"])) == CFG
    assert set(json.loads(meta["versions"])) == {"lora_vlm", "torch", "transformers", "safetensors"}
    modules = json.loads(meta["modules"])
    assert modules["vision_model.encoder.layers.1.mlp.fc1"] == [4, 8.0]
    assert len(meta["base_fingerprint"]) == 16


def _rewrite(path, out, drop=None, add=None, meta_update=None):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    meta.update(meta_update or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def _assert_untouched(model):
    assert all(not m._forward_hooks for m in model.modules())


def test_wrong_base_shape_mismatch(saved):
    path, *_ = saved
    model = tiny_blip(hidden=48)
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors.*lora_A\.weight.*shape"):
        load_adapter(model, path)
    _assert_untouched(model)


def test_missing_unexpected_version_corrupt(saved, tmp_path):
    path, *_ = saved
    key = "vision_model.encoder.layers.0.mlp.fc1.lora_B.weight"
    cases = {
        "missing key '" + key: _rewrite(path, tmp_path / "m.safetensors", drop=key),
        "unexpected key 'extra.lora_A.weight'": _rewrite(
            path, tmp_path / "u.safetensors", add={"extra.lora_A.weight": torch.zeros(2, 2)}),
        "format version '9'": _rewrite(
            path, tmp_path / "v.safetensors", meta_update={"lora_vlm_format": "9"}),
        "bad adapter metadata": _rewrite(
            path, tmp_path / "j.safetensors", meta_update={"config": "{not json"}),
    }
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    cases["not a readable safetensors"] = tmp_path / "t.safetensors"
    (tmp_path / "r.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["not a readable safetensors "] = tmp_path / "r.safetensors"
    cases["no such adapter file"] = tmp_path / "absent.safetensors"
    for message, bad in cases.items():
        model = tiny_blip()
        with pytest.raises(AdapterFileError) as err:
            load_adapter(model, bad)
        assert str(bad) in str(err.value) and message.strip() in str(err.value), str(err.value)
        _assert_untouched(model)


def test_failed_load_into_injection_changes_nothing(saved, tmp_path, batch):
    path, *_ = saved
    model = tiny_blip()
    inj = load_adapter(model, path, name="good")
    bad = _rewrite(path, tmp_path / "bad.safetensors", meta_update={"lora_vlm_format": "0"})
    with pytest.raises(AdapterFileError):
        load_adapter(inj, bad)
    assert list(inj.adapters) == ["good"] and inj.active == ["good"]
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(inj, path, name="good")


def test_fingerprint_mismatch_warns(saved, caplog):
    path, *_ = saved
    model = tiny_blip(vocab=80)  # same Linear shapes except the LM head: adapters still fit
    load_adapter(model, path)
    assert "fingerprint" in caplog.text
