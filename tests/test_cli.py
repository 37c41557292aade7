"""The command-line entry points: shared flags, --help, no entry point importing another, and
--debug (a user error is one line and exit status 2; with --debug, also its traceback)."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ["train", "infer", "eval", "export"]
# train.py's data flags that mean the same in eval.py (point 5 of issue 13).
SHARED_WITH_EVAL = ["--image-root", "--quantize", "--double-quant", "--device", "--threads",
                    "--num-beams"]


@pytest.mark.parametrize("name", [*ENTRY_POINTS, "sweep"])
def test_no_entry_point_imports_another(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & ({*ENTRY_POINTS, "sweep"} - {name})


def _parser_actions(name: str) -> dict:
    module = importlib.import_module("cli.train_flags" if name == "train" else name)
    return {opt: a for a in module.build_parser()._actions for opt in a.option_strings}


def test_eval_has_train_data_flags_defined_once():
    train, evaluate = _parser_actions("train"), _parser_actions("eval")
    for flag in [*SHARED_WITH_EVAL, "--task", "--annotations", "--prompt", "--max-new-tokens",
                 "--debug"]:
        assert flag in evaluate, flag
    for flag in SHARED_WITH_EVAL:  # the same definition: help, default, choices
        a, b = train[flag], evaluate[flag]
        assert (a.help, a.default, a.choices) == (b.help, b.default, b.choices), flag


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_shows_each_default_once(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "--debug" in text
    for flag_help in text.split(" --"):  # never a default appended after one in words
        assert flag_help.count("default:") <= 1, flag_help


def test_help_appends_a_default_not_described():
    import argparse

    from cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate")
    p.add_argument("--out", default="x", help="folder (default: runs/x, numbered)")
    text = " ".join(p.format_help().split())
    assert "learning rate (default: 0.1)" in text
    assert "folder (default: runs/x, numbered)" in text and "(default: x)" not in text


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Per entry point, arguments that are a user error: a file that is no adapter."""
    tmp = tmp_path_factory.mktemp("cli")
    model = write_tiny_model_dir(tmp / "m")
    bad = tmp / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    Image.new("RGB", (32, 32), "red").save(tmp / "a.png")
    data = tmp / "data.jsonl"
    data.write_text('{"image": "a.png", "text": "a red cube"}\n{"image": "a.png"\n')
    return {
        "train": ["--model", str(model), "--train-file", str(data), "--output-dir",
                  str(tmp / "run"), "--epochs", "1"],
        "infer": [str(tmp / "a.png"), "--model", str(model), "--adapter", str(bad)],
        "eval": ["--model", str(model), "--adapter", str(bad), "--out-dir", str(tmp / "e")],
        "export": ["--model", str(model), "--adapter", str(bad), "--out", str(tmp / "x")],
    }


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("debug", [False, True])
def test_user_error_is_one_line_and_debug_shows_the_traceback(name, debug, bad_inputs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*bad_inputs[name], "--threads", "1", *(["--debug"] if debug else [])]
    done = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"\n{name}.py: error: " in f"\n{done.stderr}"  # (a data error lists its lines)
    assert ("Traceback (most recent call last)" in done.stderr) == debug, done.stderr
