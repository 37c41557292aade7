"""What every command-line entry point shares: where the project and its shipped data are,
the help formatter, and the output-folder rule. Flag groups are in ``cli.flags``.

No entry point (train.py, infer.py, eval.py, export.py) imports another: the pieces they
have in common live here.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The shipped synthetic data of each task: (train file, test file), relative to ROOT.
DEFAULT_DATA = {"caption": ("annotations.jsonl", "annotations_test.jsonl"),
                "vqa": ("vqa_train.jsonl", "vqa_test.jsonl")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after each flag's help, unless the help already says it ("default: ...") or
    there is none to show (None, "", []); the description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        # "default:" in the help already describes it; None and [] would say nothing.
        if "default:" in help_text or action.default in (None, "", [], argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def numbered_dir(base: Path) -> Path:
    """``base`` if it is new or empty, else the first free ``base-2``, ``base-3``, ..."""
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return out
    raise AssertionError  # itertools.count never ends


__all__ = ["DEFAULT_DATA", "ROOT", "HelpFormatter", "numbered_dir"]
