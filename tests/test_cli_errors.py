"""Bad input through the real command line: one message naming the file/line/flag, exit 2.

Each case runs ``python train.py`` / ``python infer.py`` in a subprocess, as a user would, and
checks the status, that no traceback reaches the terminal, and what the message names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset

import train

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["red"] * 200)  # far more tokens than the tiny models' 32 text positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny caption and VQA models, their data, and a trained VQA adapter."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"cap": write_tiny_model_dir(root / "cap"),
             "vqa": write_tiny_model_dir(root / "vqa", vqa=True),
             "data": write_tiny_dataset(root / "data", n=6),
             "vdata": write_tiny_vqa_dataset(root / "vdata", n=6)}
    paths["vqa_adapter"] = train.main([
        "--model", str(paths["vqa"]), "--task", "vqa", "--train-file", str(paths["vdata"]),
        "--eval-file", "none", "--epochs", "1", "--batch-size", "6", "--val-fraction", "0",
        "--output-dir", str(root / "vqa-run"), "--threads", "1"])
    paths["image"] = root / "data" / "0.png"
    return paths


def cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python <script> args`` as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def assert_user_error(done: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2, no traceback, every string in ``named`` in the message."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for text in named:
        assert text in done.stderr, (text, done.stderr)


def train_cli(tiny, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("train.py", "--model", str(tiny["cap"]), "--train-file", str(tiny["data"]),
               "--epochs", "1", "--batch-size", "6", "--eval-file", "none", "--threads", "1",
               "--output-dir", str(tmp_path / "run"), *extra)


def test_vqa_adapter_without_question(tiny):
    done = cli("infer.py", str(tiny["image"]), "--adapter", str(tiny["vqa_adapter"]))
    assert_user_error(done, "--question", "vqa")


@pytest.mark.parametrize("flag", ["--rank-pattern", "--alpha-pattern"])
def test_unmatched_pattern(tiny, tmp_path, flag):
    done = train_cli(tiny, tmp_path, flag, "nosuchlayer=4")
    assert_user_error(done, flag, "nosuchlayer")
    assert not (tmp_path / "run/adapter.safetensors").exists()


def test_bad_data_line_names_file_line_and_flag(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = tiny["data"].read_text().splitlines()
    bad.write_text("\n".join([*lines[:2], '{"image": "1.png"}', *lines[3:]]) + "\n")
    for png in tiny["data"].parent.glob("*.png"):
        (tmp_path / png.name).symlink_to(png)
    done = cli("train.py", "--model", str(tiny["cap"]), "--train-file", str(bad),
               "--eval-file", "none", "--threads", "1", "--output-dir", str(tmp_path / "run"))
    assert_user_error(done, f"{bad}:3", "--skip-bad-samples")


def test_annotations_with_caption_data_names_the_flag(tiny, tmp_path):
    done = train_cli(tiny, tmp_path, "--annotations", str(tiny["data"]))
    assert_user_error(done, "--annotations", str(tiny["data"]))


def test_output_by_extension(tiny, tmp_path):
    image = str(tiny["image"])
    outputs = {ext: tmp_path / f"out{ext}" for ext in (".txt", ".jsonl", ".json")}
    for path in outputs.values():
        done = cli("infer.py", image, "--model", str(tiny["cap"]), "--output", str(path))
        assert done.returncode == 0, done.stderr
    caption = json.loads(outputs[".json"].read_text())[0]["caption"]
    assert outputs[".txt"].read_text() == f"{image}\t{caption}\n"
    assert json.loads(outputs[".jsonl"].read_text()) == {"image": image, "caption": caption}
    done = cli("infer.py", image, "--model", str(tiny["cap"]), "--output",
               str(tmp_path / "out.csv"))
    assert_user_error(done, "--output", "out.csv", ".txt", ".jsonl", ".json")
    assert not (tmp_path / "out.csv").exists()


def test_prompt_longer_than_the_model_takes(tiny):
    done = cli("infer.py", str(tiny["image"]), "--model", str(tiny["cap"]), "--prompt", LONG)
    assert_user_error(done, "--prompt", "32")


def test_long_prompt_with_many_new_tokens_is_capped(tiny):
    # 3 prompt tokens + bos + 30 new tokens overflow the 32 positions: capped with a warning.
    done = cli("infer.py", str(tiny["image"]), "--model", str(tiny["cap"]), "--prompt",
               "a red cube")
    assert done.returncode == 0, done.stderr
    assert "--max-new-tokens" in done.stderr and "32" in done.stderr


def test_long_vqa_question_is_cut_with_a_warning(tiny):
    done = cli("infer.py", str(tiny["image"]), "--model", str(tiny["vqa"]), "--question", LONG)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "question" in done.stderr and "32" in done.stderr
    assert len(done.stdout.splitlines()) == 1
