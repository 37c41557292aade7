"""An adapter finds its base model from any working directory, and says which one it used."""

import huggingface_hub.constants
import pytest
from conftest import write_tiny_dataset, write_tiny_model_dir
from safetensors import safe_open

from models.base_model import BaseModelNotFoundError, base_model_metadata, locate_base_model
from models.loading import ROOT


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A hub id fails at once instead of after ~25 s of retries on this offline machine."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def used(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("base model:")]


def test_train_relative_model_then_infer_from_elsewhere(tmp_path, monkeypatch, caplog):
    """train.py --model models/x in one folder; infer.py without --model in another."""
    import infer
    import train

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    base = write_tiny_model_dir(project / "models" / "x")
    data = write_tiny_dataset(tmp_path / "data", n=4)
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    adapter = train.main(["--model", "models/x", "--epochs", "1", "--batch-size", "4",
                          "--val-fraction", "0", "--train-file", str(data), "--eval-file",
                          str(data), "--output-dir", str(tmp_path / "run"), "--no-eval-base"])
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "models/x" and meta["base_model_path"] == str(base.resolve())

    monkeypatch.chdir(elsewhere)
    caplog.set_level("INFO")
    out = infer.main([str(data.parent / "0.png"), "--adapter", str(adapter),
                      "--max-new-tokens", "3"])
    assert len(out) == 1
    assert used(caplog) == [f"base model: {base.resolve()} (the path stored in the adapter; "
                            f"tried first: {elsewhere / 'models/x'}, {ROOT / 'models/x'})"]
    assert "fingerprint" not in caplog.text


def test_the_given_id_from_the_working_directory_comes_first(tmp_path, monkeypatch, caplog):
    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "stored").mkdir()
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    meta = {"base_model": "models/x", "base_model_path": str(tmp_path / "stored")}
    assert locate_base_model(meta, "a.safetensors") == str(tmp_path / "models" / "x")
    assert used(caplog) == [f"base model: {tmp_path / 'models' / 'x'} (as given, from the "
                            "working directory)"]


def test_the_given_id_in_the_checkout_comes_before_the_stored_path(tmp_path, monkeypatch):
    """The embedded tiny BLIP is named relative to the checkout: a moved checkout still works."""
    monkeypatch.chdir(tmp_path)
    meta = {"base_model": "models/tiny_blip", "base_model_path": str(tmp_path)}
    assert locate_base_model(meta, "a.safetensors") == str(ROOT / "models" / "tiny_blip")


def test_metadata_of_a_local_directory_and_of_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_metadata("m") == {"base_model": "m", "base_model_path": str(tmp_path / "m")}
    assert base_model_metadata("Salesforce/blip2-opt-2.7b") == {
        "base_model": "Salesforce/blip2-opt-2.7b", "base_model_path": ""}


def test_a_moved_base_is_one_error_listing_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = {"base_model": "models/x", "base_model_path": "/gone/models/x"}
    with pytest.raises(BaseModelNotFoundError) as e:
        locate_base_model(meta, "run/adapter.safetensors")
    message = str(e.value)
    assert message.startswith("run/adapter.safetensors: its base model 'models/x' is not here;")
    for tried in (f"{tmp_path / 'models/x'} (from the working directory): not a directory",
                  f"{ROOT / 'models/x'} (in the checkout): not a directory",
                  "/gone/models/x (stored in the adapter): not a directory",
                  "hub id 'models/x': not in the hub cache (not fetched: it was a local "
                  "directory when the adapter was trained)", "pass --model"):
        assert tried in message


def test_a_base_trained_from_the_hub_is_fetched_from_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BaseModelNotFoundError) as e:  # offline here: the fetch fails
        locate_base_model({"base_model": "someone/blip", "base_model_path": ""}, "a.safetensors")
    assert "hub id 'someone/blip': " in str(e.value)
    assert "not in the hub cache" not in str(e.value)


def test_a_path_that_is_no_hub_id_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"{tmp_path.name}-no-such-base"  # unique: '../<name>' exists neither here nor beside
    with pytest.raises(BaseModelNotFoundError) as e:  # the checkout
        locate_base_model({"base_model": f"../{name}"}, "a.safetensors")
    assert f"hub id '../{name}'" not in str(e.value)
    assert f"{tmp_path.parent / name} (from the working directory)" in str(e.value)


@pytest.mark.parametrize("script", ["infer", "eval"])
def test_a_missing_base_exits_2_with_one_line(script, tmp_path, monkeypatch, capsys):
    import eval as eval_py
    import infer
    from lora import LoRAConfig, inject_lora, save_adapter
    from models.loading import load_model

    model, _, _ = load_model("models/tiny_blip")
    adapter = save_adapter(inject_lora(model, LoRAConfig(r=2, alpha=4)), tmp_path / "a.safetensors",
                           extra={"base_model": "models/x", "base_model_path": "/gone/models/x"})
    image = write_tiny_dataset(tmp_path / "d", n=1).parent / "0.png"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # load_model's progress bar
    with pytest.raises(SystemExit) as e:
        if script == "infer":
            infer.main([str(image), "--adapter", str(adapter)])
        else:
            eval_py.main(["--adapter", str(adapter), "--out-dir", str(tmp_path / "ev")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{script}.py: error: ") and "/gone/models/x" in err
    assert "Traceback" not in err and err.count("error:") == 1
