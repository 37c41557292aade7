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
    NonFiniteAdapterError,
    base_fingerprint,
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
    assert meta["base_fingerprint"] == base_fingerprint(tiny_blip(seed=5))  # weights don't count
    assert meta["base_fingerprint"] != base_fingerprint(tiny_blip(vocab=80))


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


def _snapshot(model):
    """Everything a failed load must leave alone: weights, requires_grad flags, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_hooks) for m in model.modules()))


def _assert_unchanged(model, before):
    state, flags, hooks = _snapshot(model)
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(v, before[0][k]) for k, v in state.items())
    assert hooks == before[2]


def _assert_untouched(model):
    """A fresh tiny_blip after a failed load: no hooks, every parameter still trainable."""
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


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
    before, adapters = _snapshot(model), {k: v.clone() for k, v in inj.state_dict().items()}
    bad = _rewrite(path, tmp_path / "bad.safetensors", meta_update={"lora_vlm_format": "0"})
    with pytest.raises(AdapterFileError):
        load_adapter(inj, bad)
    assert list(inj.adapters) == ["good"] and inj.active == ["good"]
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(inj, path, name="good")
    _assert_unchanged(model, before)
    assert all(torch.equal(v, adapters[k]) for k, v in inj.state_dict().items())


# --- metadata and tensors that lie: AdapterFileError naming file and key, model unchanged ---
FC1 = "vision_model.encoder.layers.0.mlp.fc1"


def _lying_files(path, tmp_path):
    """{(file, key the error must name): ...} for metadata and tensors a file must not carry."""
    meta = read_metadata(path)
    modules, config = json.loads(meta["modules"]), json.loads(meta["config"])

    def modules_with(value):
        return {"modules": json.dumps({**modules, FC1: value})}

    def config_with(**kw):
        return {"config": json.dumps({**config, **kw})}

    a_key, b_key = f"{FC1}.lora_A.weight", f"{FC1}.lora_B.weight"
    nan_a = torch.zeros(4, 48)
    nan_a[1, 2] = float("nan")
    inf_b = torch.zeros(64, 4)
    inf_b[0, 0] = float("-inf")
    cases = {
        "modules_list": ({"modules": json.dumps(list(modules.items()))}, None, "'modules'"),
        "modules_null": ({"modules": "null"}, None, "'modules'"),
        "modules_not_json": ({"modules": "{oops"}, None, "'modules'"),
        "r_zero": (modules_with([0, 8.0]), None, FC1),
        "r_zero_with_empty_tensors": (modules_with([0, 8.0]),
                                      {a_key: torch.zeros(0, 48), b_key: torch.zeros(64, 0)}, FC1),
        "r_negative": (modules_with([-4, 8.0]), None, FC1),
        "r_float": (modules_with([2.5, 8.0]), None, FC1),
        "r_bool": (modules_with([True, 8.0]), None, FC1),
        "alpha_nan": (modules_with([4, float("nan")]), None, FC1),
        "alpha_inf": (modules_with([4, float("inf")]), None, FC1),
        "alpha_string": (modules_with([4, "8"]), None, FC1),
        "entry_not_a_pair": (modules_with([4]), None, FC1),
        "config_r_zero": (config_with(r=0), None, "'config'"),
        "config_alpha_nan": (config_with(alpha=float("nan")), None, "'config'"),
        "config_dropout": (config_with(dropout=1.5), None, "'config'"),
        "config_list": ({"config": "[1, 2]"}, None, "'config'"),
        "config_patterns_list": (config_with(rank_pattern=[1]), None, "'config'"),
        "config_targets_numbers": (config_with(targets=[1, 2]), None, "'config'"),
        "tensor_nan": (None, {a_key: nan_a}, a_key),
        "tensor_inf": (None, {b_key: inf_b}, b_key),
    }
    return {name: (_rewrite(path, tmp_path / f"{name}.safetensors", add=add, meta_update=meta),
                   key) for name, (meta, add, key) in cases.items()}


def test_lying_files_are_refused_before_touching_a_fresh_model(saved, tmp_path):
    path, *_ = saved
    for name, (bad, key) in _lying_files(path, tmp_path).items():
        model = tiny_blip()
        before = _snapshot(model)
        with pytest.raises(AdapterFileError) as err:
            load_adapter(model, bad)
        assert str(bad) in str(err.value) and key in str(err.value), (name, str(err.value))
        _assert_unchanged(model, before)
        _assert_untouched(model)


def test_lying_files_are_refused_before_touching_an_injection(saved, tmp_path):
    path, *_ = saved
    model = tiny_blip()
    inj = load_adapter(model, path, name="good")
    inj.merge()
    before, adapters = _snapshot(model), {k: v.clone() for k, v in inj.state_dict().items()}
    for name, (bad, key) in _lying_files(path, tmp_path).items():
        with pytest.raises(AdapterFileError) as err:
            load_adapter(inj, bad)
        assert str(bad) in str(err.value) and key in str(err.value), (name, str(err.value))
        assert (list(inj.adapters), inj.active, inj.merged) == (["good"], ["good"], ["good"]), name
        _assert_unchanged(model, before)
        assert all(torch.equal(v, adapters[k]) for k, v in inj.state_dict().items())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_adapters(value, tmp_path):
    inj = inject_lora(tiny_blip(), CFG)
    randomize_adapters(inj)
    layer = dict(inj.adapters["default"].items())[FC1]
    with torch.no_grad():
        layer.B[3, 1] = value
    out = tmp_path / "adapter.safetensors"
    with pytest.raises(NonFiniteAdapterError, match=rf"{FC1}\.lora_B\.weight"):
        save_adapter(inj, out)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left
    assert issubclass(NonFiniteAdapterError, ValueError)


@pytest.mark.parametrize("kw", [
    {"r": 0}, {"r": 2.5}, {"r": True}, {"alpha": float("nan")}, {"alpha": float("inf")},
    {"alpha": "8"}, {"dropout": 1.0}, {"dropout": float("nan")}, {"rank_pattern": {"qkv": 0}},
    {"rank_pattern": [("qkv", 2)]}, {"alpha_pattern": {"qkv": float("inf")}},
    {"targets": (1,)}, {"rslora": "yes"},
])
def test_config_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        LoRAConfig(**kw)


def test_fingerprint_mismatch_warns(saved, caplog):
    path, *_ = saved
    model = tiny_blip(vocab=80)  # same Linear shapes except the LM head: adapters still fit
    load_adapter(model, path)
    assert "fingerprint" in caplog.text
