"""A grid of train.py settings: its axes, its cells, and the train.py flags of each cell.

An axis is one train.py flag and the values it takes, each value one shell word, so a comma
stays inside its value: ``--targets vision text vision,text`` is three cells, not four. A flag
that takes no value (``--rslora``) has the values ``on`` and ``off``. The grid is every
combination of its axes, the first axis varying slowest.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import itertools
import re
from dataclasses import dataclass

ON_OFF = ("on", "off")
# Flags sweep.py sets itself for every cell: its own output folder, and resuming into it.
OWNED_BY_SWEEP = ("--output-dir", "--resume")
FORBIDDEN = (*OWNED_BY_SWEEP, "--stop-after-steps", "--help", "-h")
_UNSAFE = re.compile(r"[^A-Za-z0-9._,+-]")  # no "=": it joins a key to its value


class GridError(ValueError):
    """A grid that cannot run: one line saying what is wrong."""


@dataclass(frozen=True)
class Axis:
    """One train.py flag (``--r``) and the values the grid gives it, in order."""

    flag: str
    values: tuple[str, ...]
    takes_value: bool = True

    @property
    def key(self) -> str:
        """The flag without its dashes: the column name and the folder-name prefix."""
        return self.flag.lstrip("-")

    def train_flags(self, value: str, no_flag: str | None) -> list[str]:
        """train.py flags that give this axis ``value`` (``off`` may need the --no- form)."""
        if self.takes_value:
            return [self.flag, value]
        if value == "on":
            return [self.flag]
        return [no_flag] if no_flag else []


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: its settings, folder name and train.py flags."""

    settings: dict[str, str]  # axis key -> value, in axis order
    train_args: list[str]  # the cell's flags, then the shared ones

    @property
    def name(self) -> str:
        """Folder name of the cell, made from its settings: ``r=4_targets=vision,text``."""
        return "_".join(f"{k}={safe_name(v)}" for k, v in self.settings.items())


def safe_name(value: str) -> str:
    """``value`` as a file-name part: unchanged if it is plain; else its odd characters become
    '-' and a short hash of the exact value keeps two such values apart."""
    cleaned = _UNSAFE.sub("-", value)[:40]
    if cleaned == value:
        return value
    return f"{cleaned}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def split_axes(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``['--r', '1', '4', '--targets', 'text']`` -> ``[('--r', ['1', '4']), ...]``; a word
    starting with '--' starts the next axis (a value such as -1 does not)."""
    axes: list[tuple[str, list[str]]] = []
    for token in tokens:
        if token.startswith("--"):
            axes.append((token.split("=", 1)[0], token.split("=", 1)[1:]))
        elif axes:
            axes[-1][1].append(token)
        else:
            raise GridError(f"{token!r} comes before any axis: name a train.py flag first, "
                            "e.g. --r 4 16")
    return axes


def find_action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    """The action of ``flag`` (spelt exactly, no abbreviation) in train.py's parser."""
    # argparse has no public map from option strings to actions.
    actions = {s: a for a in parser._actions for s in a.option_strings}
    if flag not in actions:
        close = difflib.get_close_matches(flag, actions, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise GridError(f"{flag} is not a train.py flag{hint}; see python train.py --help")
    return actions[flag]


def make_axes(tokens: list[str], parser: argparse.ArgumentParser) -> list[Axis]:
    """The grid's axes from its command-line words, each flag checked against ``parser``."""
    axes: list[Axis] = []
    for flag, values in split_axes(tokens):
        if flag in FORBIDDEN:
            raise GridError(f"{flag} cannot be swept: sweep.py sets it for every cell")
        action = find_action(parser, flag)
        takes_value = action.nargs != 0
        if flag in (a.flag for a in axes):
            raise GridError(f"{flag} is given twice: list all its values after one {flag}")
        if not values:
            raise GridError(f"{flag} has no values: e.g. {flag} "
                            f"{'4 16' if takes_value else 'on off'}")
        if len(set(values)) < len(values):
            raise GridError(f"{flag} lists a value twice: {' '.join(values)}")
        if not takes_value and set(values) - set(ON_OFF):
            raise GridError(f"{flag} takes no value in train.py: sweep it with 'on' and/or "
                            f"'off', not {' '.join(values)}")
        axes.append(Axis(flag, tuple(values), takes_value))
    if not axes:
        raise GridError("no axes: name at least one train.py flag and its values, e.g. "
                        "--r 4 16")
    return axes


def no_form(parser: argparse.ArgumentParser, flag: str) -> str | None:
    """The ``--no-`` spelling of a boolean flag that has one (BooleanOptionalAction)."""
    negative = "--no-" + flag[2:]
    return negative if negative in find_action(parser, flag).option_strings else None


def make_cells(axes: list[Axis], shared: list[str],
               parser: argparse.ArgumentParser) -> list[Cell]:
    """Every combination of the axes' values, the first axis varying slowest."""
    given = {s.split("=", 1)[0] for s in shared if s.startswith("-")}
    for flag in FORBIDDEN:
        if flag in given:
            raise GridError(f"{flag} cannot be passed to train.py: sweep.py sets it per cell")
    for axis in axes:
        if {axis.flag, no_form(parser, axis.flag)} & given:
            raise GridError(f"{axis.flag} is both an axis and a shared train.py flag after "
                            "'--': keep one")
    cells = []
    for values in itertools.product(*(a.values for a in axes)):
        flags = [f for a, v in zip(axes, values, strict=True)
                 for f in a.train_flags(v, no_form(parser, a.flag))]
        cells.append(Cell(dict(zip((a.key for a in axes), values, strict=True)),
                          [*flags, *shared]))
    return cells


def check_cells(cells: list[Cell], parse_args) -> None:
    """Parse each cell's flags with train.py's ``parse_args`` before anything runs; its first
    complaint becomes a one-line GridError naming the cell."""
    for cell in cells:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                parse_args(cell.train_args)
        except SystemExit:
            lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
            problem = re.sub(r"^\S+: error: ", "", lines[-1]) if lines else "refused"
            raise GridError(f"cell {cell.name}: train.py would refuse its flags: "
                            f"{problem}") from None
