"""PEFT directory layout, written and read without peft: exact round trip, documented keys,
and a golden fixture written once by real PEFT (tests/fixtures/peft_golden, see its README)."""

import json
import math
import re
from itertools import chain
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_blip
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration

from lora import AdapterFileError, LoRAConfig, inject_lora, load_peft, save_peft

GOLDEN = Path(__file__).parent / "fixtures" / "peft_golden"
# Logits are ~3 in size (fp32 ulp ~2.4e-7); PEFT adds B(A x)·s to the Linear's output while we
# fold s into one addmm, and a converted PiSSA adapter replaces (W - s·B0A0) + s·BA by
# W + s·(BA - B0A0): a few ulps apart. Measured 2.2e-6 at most; one module's alpha off by one
# moves them by far more (see test_golden_tolerance_catches_a_wrong_alpha).
ATOL = 1e-5


# --- PEFT's lookup rules, written from its source (not from lora/peft_format.py) -------------
def peft_value(path: str, patterns: dict, default: float) -> float:
    """peft >= 0.15 (utils/other.py get_pattern_key, PR #2419): first key k in order with
    re.match(rf"(.*\\.)?({k})$", path); no match -> default."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), path)
    return patterns.get(key, default)


def old_peft_values(path: str, config: dict) -> tuple[int, float]:
    """peft 0.13.2 (tuners/lora/model.py _create_and_replace): the first key of rank_pattern
    then alpha_pattern with re.match(rf".*\\.{k}$", path), else the path itself, looked up
    literally in both dicts."""
    ranks, alphas = config["rank_pattern"], config["alpha_pattern"]
    key = next((k for k in chain(ranks, alphas) if re.match(rf".*\.{k}$", path)), path)
    return ranks.get(key, config["r"]), alphas.get(key, config["lora_alpha"])


def peft_targets(target_modules: str | list, names: list[str]) -> list[str]:
    """PEFT's check_target_module_exists: a string must fullmatch, a list entry must equal the
    name or be a dotted suffix of it."""
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


def read_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def write_config(folder: Path, config: dict) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(config))


def model_snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: torch.nn.Module, snapshot: tuple[dict, dict]) -> None:
    state, flags = snapshot
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


# --- our writer and reader ----------------------------------------------------------------
def test_peft_export_import_round_trip(tmp_path, batch):
    model = tiny_blip()
    cfg = LoRAConfig(r=4, alpha=8, targets=("text",), rank_pattern={"intermediate.dense": 2},
                     alpha_pattern={"query": 2.0}, rslora=True)
    inj = inject_lora(model, cfg)
    randomize_adapters(inj)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_peft(inj, tmp_path / "peft", base_model="tiny-test")

    config = read_config(out)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["base_model_name_or_path"] == "tiny-test"
    assert config["target_modules"] == inj.adapters["default"].paths
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 2
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    paths = inj.adapters["default"].paths
    assert keys == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}

    fresh = tiny_blip()
    loaded = load_peft(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    for (p1, a), (p2, b) in zip(inj.adapters["default"].items(),
                                loaded.adapters["default"].items(), strict=True):
        assert p1 == p2 and (a.r, a.alpha, a.base_scale) == (b.r, b.alpha, b.base_scale)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_peft_export_patterns_are_plain_paths_old_and_new_peft_agree(tmp_path):
    """Issue 11.6: keys are the module paths themselves (no regex escapes), which peft < 0.15
    looks up literally and peft >= 0.15 matches as a regex that only matches that path."""
    model = tiny_blip()
    cfg = LoRAConfig(r=4, alpha=8, targets=("text", "vision"),
                     rank_pattern={"crossattention.self.key": 2, "qkv": 6},
                     alpha_pattern={"fc1": 3.0, "query": 12.0})
    inj = inject_lora(model, cfg)
    config = read_config(save_peft(inj, tmp_path / "p"))
    layers = dict(inj.adapters["default"].items())
    assert set(config["rank_pattern"]) == {p for p, m in layers.items() if m.r != 4} != set()
    assert set(config["alpha_pattern"]) == {p for p, m in layers.items() if m.alpha != 8} != set()
    assert not any("\\" in k for k in chain(config["rank_pattern"], config["alpha_pattern"]))
    for path, m in layers.items():
        assert old_peft_values(path, config) == (m.r, m.alpha), path
        assert peft_value(path, config["rank_pattern"], config["r"]) == m.r, path
        assert peft_value(path, config["alpha_pattern"], config["lora_alpha"]) == m.alpha, path


class Nested(torch.nn.Module):
    """Two Linears where one path is a dotted suffix of the other: 'query' and 'sub.query'."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(4, 4)
        self.sub = torch.nn.Module()
        self.sub.query = torch.nn.Linear(4, 4)


@pytest.mark.parametrize("targets, rank_pattern, refused", [
    (("query",), {"sub.query": 2}, None),  # 'sub.query' selects only itself: fine
    (("query",), {"re:query": 2}, "pattern key 'query' would also set"),  # PEFT: both get r=2
    (("re:query",), {}, "would also select 'sub.query'"),  # PEFT would add a LoRA to sub.query
])
def test_peft_export_refuses_keys_peft_would_read_otherwise(tmp_path, targets, rank_pattern,
                                                            refused):
    inj = inject_lora(Nested(), LoRAConfig(r=4, targets=targets, rank_pattern=rank_pattern))
    if refused:
        with pytest.raises(ValueError, match=re.escape(refused)):
            save_peft(inj, tmp_path / "p")
        return
    config = read_config(save_peft(inj, tmp_path / "p"))
    for path, m in inj.adapters["default"].items():
        assert old_peft_values(path, config) == (m.r, m.alpha)
        assert peft_value(path, config["rank_pattern"], config["r"]) == m.r


@pytest.mark.parametrize("key", [
    "text_decoder\\.bert\\.encoder\\.layer\\.1\\.attention\\.self\\.query",  # lora-vlm < this fix
    "text_decoder.bert.encoder.layer.1.attention.self.query",  # full path, as written now
    "layer.1.attention.self.query",  # dotted suffix
    "text_decoder\\.bert\\.encoder\\.layer\\.1\\..*\\.self\\.query",  # regex, also cross-attn
    "query",  # short suffix: every query
])
def test_peft_import_reads_every_pattern_key_form(tmp_path, key):
    model = tiny_blip()
    out = save_peft(inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("text",))),
                    tmp_path / "p")
    config = read_config(out)
    config["alpha_pattern"] = {key: 5}
    write_config(out, config)
    loaded = load_peft(tiny_blip(), out)
    alphas = {p: m.alpha for p, m in loaded.adapters["default"].items()}
    selected = {p for p in alphas if re.match(rf"(.*\.)?({key})$", p)}
    assert selected and all(alphas[p] == (5 if p in selected else 8) for p in alphas)
    assert "text_decoder.bert.encoder.layer.1.attention.self.query" in selected
    assert ("text_decoder.bert.encoder.layer.1.crossattention.self.query" in selected) == (
        key == "query" or ".*" in key)


def test_peft_import_refuses_rank_pattern_that_disagrees_with_tensors(tmp_path):
    """A config whose rank for a module differs from its tensors' rank fails in PEFT with a
    shape error; the scale alpha/r would be ambiguous, so refuse it, naming module and key."""
    model = tiny_blip()
    out = save_peft(inject_lora(model, LoRAConfig(r=4, targets=("text",))), tmp_path / "p")
    config = read_config(out)
    config["rank_pattern"] = {"intermediate.dense": 2}
    write_config(out, config)
    with pytest.raises(AdapterFileError, match=r"rank_pattern.*intermediate\.dense.*rank 4"):
        load_peft(tiny_blip(), out)


# --- what the importer refuses ------------------------------------------------------------
def saved_adapter(tmp_path: Path) -> Path:
    model = tiny_blip()
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("text",)))
    randomize_adapters(inj)
    return save_peft(inj, tmp_path / "p")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "lora_ga",
                                  "loftq", "some_future_init"])
def test_peft_import_refuses_adapters_for_a_modified_base(tmp_path, init):
    """Issue 11.7: these inits subtract (or quantize) part of the base weight; the trained A/B
    only fit that modified base unless PEFT converted them to plain LoRA at save time."""
    out = saved_adapter(tmp_path)
    config = read_config(out)
    config["init_lora_weights"] = init
    write_config(out, config)
    model = tiny_blip()
    snapshot = model_snapshot(model)
    hint = {"loftq": "merge_and_unload", "some_future_init": "cannot tell whether"}.get(
        init, "path_initial_model_for_weight_conversion")
    with pytest.raises(AdapterFileError, match=f"init_lora_weights='{init}'(.|\n)*{hint}"):
        load_peft(model, out)
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_peft_import_accepts_inits_that_leave_the_base_alone(tmp_path, batch, init):
    out = saved_adapter(tmp_path)
    fresh = tiny_blip()
    load_peft(fresh, out)
    with torch.no_grad():
        expected = fresh(**batch).logits
    config = read_config(out)
    config["init_lora_weights"] = init
    write_config(out, config)
    model = tiny_blip()
    load_peft(model, out)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("field, value", [
    ("bias", "all"), ("bias", "lora_only"), ("fan_in_fan_out", True),
    ("modules_to_save", ["text_decoder.cls"]), ("trainable_token_indices", [3, 4]),
    ("layer_replication", [[0, 2], [1, 2]]), ("lora_bias", True),
    ("megatron_config", {"tensor_model_parallel_size": 1}), ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]), ("target_parameters", ["mlp.experts.down_proj"]),
    ("use_bdlora", {"target_modules_bd_a": ["query"]}), ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 1e-4}), ("velora_config", {"num_groups": 4}),
    ("monteclora_config", {"n_experts": 4}), ("peft_type", "LOHA"),
    ("a_field_from_a_newer_peft", True),
])
def test_peft_import_refuses_fields_that_change_the_maths(tmp_path, field, value):
    out = saved_adapter(tmp_path)
    config = read_config(out)
    config[field] = value
    write_config(out, config)
    model = tiny_blip()
    snapshot = model_snapshot(model)
    with pytest.raises(AdapterFileError, match=re.escape(field)):
        load_peft(model, out)
    assert_unchanged(model, snapshot)


def test_peft_import_accepts_unknown_fields_left_empty(tmp_path):
    out = saved_adapter(tmp_path)
    config = read_config(out)
    config.update(a_field_from_a_newer_peft=None, another_one=[], use_dora=False, bias="none")
    write_config(out, config)
    assert load_peft(tiny_blip(), out).adapters["default"].paths


@pytest.mark.parametrize("edit, key", [
    ({"r": None}, "r"), ({"lora_alpha": None}, "lora_alpha"), ({"r": "four"}, "r"),
    ({"r": 0}, "r"), ({"r": True}, "r"), ({"r": 4.5}, "r"), ({"lora_alpha": "x"}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"use_rslora": "yes"}, "use_rslora"), ({"rank_pattern": [2]}, "rank_pattern"),
    ({"rank_pattern": {"query": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"(": 2}}, "alpha_pattern"),
    ({"alpha_pattern": {"query": "big"}}, "alpha_pattern"),
])
@pytest.mark.parametrize("into_injection", [False, True])
def test_peft_bad_config_names_file_and_key_model_unchanged(tmp_path, edit, key, into_injection):
    """Issue 11.19: a missing or malformed setting is an AdapterFileError naming the file and the
    key, raised before the model (or the injection it goes into) changes. None = key absent."""
    out = saved_adapter(tmp_path)
    config = read_config(out)
    for k, v in edit.items():
        if v is None:
            del config[k]
        else:
            config[k] = v
    write_config(out, config)
    model = tiny_blip()
    target = inject_lora(model, LoRAConfig(targets=("vision",))) if into_injection else model
    snapshot = model_snapshot(model)
    with pytest.raises(AdapterFileError) as err:
        load_peft(target, out, name="new")
    assert str(out / "adapter_config.json") in str(err.value) and key in str(err.value)
    assert_unchanged(model, snapshot)
    if into_injection:
        assert list(target.adapters) == ["default"] and target.active == ["default"]


def test_peft_import_rejects_unreadable_config(tmp_path):
    with pytest.raises(AdapterFileError, match="cannot read PEFT config"):
        load_peft(tiny_blip(), tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="not a JSON object"):
        load_peft(tiny_blip(), tmp_path / "bad")


# --- golden fixture written by real PEFT --------------------------------------------------
@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "expected.safetensors")


def golden_base() -> BlipForConditionalGeneration:
    return BlipForConditionalGeneration.from_pretrained(GOLDEN / "base").eval()


def golden_logits(model: torch.nn.Module, golden: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=golden["pixel_values"], input_ids=golden["input_ids"]).logits


@pytest.mark.parametrize("name, expected", [("patterns", "patterns_logits"),
                                            ("rslora", "rslora_logits"),
                                            ("pissa_converted", "pissa_logits")])
def test_golden_import_reproduces_peft_logits(golden, name, expected):
    model = golden_base()
    assert torch.equal(golden_logits(model, golden), golden["base_logits"])  # the fixture's base
    load_peft(model, GOLDEN / name)
    got = golden_logits(model, golden)
    assert (golden[expected] - golden["base_logits"]).abs().max() > 1  # adapters matter here
    torch.testing.assert_close(got, golden[expected], rtol=0, atol=ATOL)


def test_golden_tolerance_catches_a_wrong_alpha(golden):
    """ATOL is tight enough: one module's alpha off by one (of 20 adapted Linears) fails it."""
    model = golden_base()
    inj = load_peft(model, GOLDEN / "patterns")
    layer = dict(inj.adapters["default"].items())[
        "text_decoder.bert.encoder.layer.1.attention.self.value"]
    layer.scale = (layer.alpha + 1) / layer.r
    diff = (golden_logits(model, golden) - golden["patterns_logits"]).abs().max()
    assert diff > 100 * ATOL


def test_golden_unconverted_pissa_is_refused():
    model = golden_base()
    snapshot = model_snapshot(model)
    with pytest.raises(AdapterFileError, match="init_lora_weights='pissa'"):
        load_peft(model, GOLDEN / "pissa_unconverted")
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("name", ["patterns", "rslora", "pissa_converted"])
def test_golden_export_is_equivalent_to_peft(tmp_path, name):
    """load_peft then save_peft: the same tensors under the same keys, the same Linears targeted
    by PEFT's target rule, and the same r/alpha per Linear by PEFT's pattern rules (old and new)
    as the directory PEFT wrote. (Real PEFT loading our export: see the fixture's README.)"""
    model = golden_base()
    out = save_peft(load_peft(model, GOLDEN / name), tmp_path / name)
    ours, theirs = read_config(out), read_config(GOLDEN / name)
    mine, theirs_t = (load_file(d / "adapter_model.safetensors") for d in (out, GOLDEN / name))
    assert mine.keys() == theirs_t.keys()
    assert all(torch.equal(mine[k], theirs_t[k]) for k in theirs_t)

    names = [n for n, _ in model.named_modules()]
    targets = peft_targets(theirs["target_modules"], names)
    assert peft_targets(ours["target_modules"], names) == targets
    paths = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in theirs_t}
    assert paths == set(targets)
    for key in ("use_rslora", "lora_dropout", "init_lora_weights", "peft_type", "bias"):
        assert ours[key] == theirs[key], key
    for path in targets:
        want = (peft_value(path, theirs["rank_pattern"], theirs["r"]),
                peft_value(path, theirs["alpha_pattern"], theirs["lora_alpha"]))
        assert (peft_value(path, ours["rank_pattern"], ours["r"]),
                peft_value(path, ours["alpha_pattern"], ours["lora_alpha"])) == want, path
        assert old_peft_values(path, ours) == want, path
        assert want[0] == theirs_t[f"base_model.model.{path}.lora_A.weight"].shape[0]
    assert math.isclose(ours["lora_alpha"], theirs["lora_alpha"]) and ours["r"] == theirs["r"]
