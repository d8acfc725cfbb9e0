"""Hydra's own errors about the command line (a group choice, a key, an override) as one ``error:`` line.

Hydra reports a typo in ``vm=dino_b61`` or ``lp.kk=800`` with a block of lines (the config search path, a
``+lp.kk=800`` hint that would only add an unused key) and exit status 1. Inside
:func:`one_line_hydra_errors` the same mistakes print one line with the valid choices, keys or quoting, and
exit with status 2 like every other user error. ``HYDRA_FULL_ERROR=1`` keeps Hydra's full report.

The hook wraps ``hydra._internal.utils.run_and_report``, the one function through which Hydra runs a
``--run``, ``--multirun``, ``--cfg`` or ``--shell-completion`` command and prints its errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["hydra_error_line", "one_line_hydra_errors"]

_AMBIGUOUS = re.compile(r"Ambiguous value for argument '(?P<line>.*)'")
_OVERRIDE = re.compile(r"Could not override '(?P<key>[^']+)'")
_SWEEP = re.compile(r"Sweep parameters '(?P<line>.*)' requires --multirun")


def _choice_line(exc: Any) -> str | None:
    missing = str(getattr(exc, "missing_cfg_file", None) or "")
    group, _, choice = missing.rpartition("/")
    if not group:
        return None  # the primary config itself
    options = [str(o) for o in (getattr(exc, "options", None) or [])]
    if not options:
        return f"{group}={choice} is not a choice; the group {group} has no configs"
    return f"{group}={choice} is not a choice; valid: {', '.join(options)}"


def _key_line(exc: Exception, key: str) -> str:
    cause = exc.__cause__
    parent = getattr(cause, "parent_node", None)
    keys = [str(k) for k in parent.keys()] if parent is not None and hasattr(parent, "keys") else []
    section = key.rpartition(".")[0]
    if not section:
        keys = [k for k in keys if k != "hydra"]
    where = f"a key of {section}" if section else "a config key"
    if not keys:
        return f"{key} is not {where}"
    return f"{key} is not {where}; valid: {', '.join(keys)}"


def _quote_line(line: str) -> str:
    key, _, value = line.partition("=")
    return (
        f"{line} is ambiguous: a comma separates sweep values; quote the value: '{key}=\"{value}\"' "
        f"(or sweep over it with -m)"
    )


def hydra_error_line(exc: Exception) -> str:
    """One line (no ``error:`` prefix) for a Hydra composition or override-parsing error ``exc``."""
    text = str(exc)
    if getattr(exc, "missing_cfg_file", None) is not None:
        line = _choice_line(exc)
        if line is not None:
            return line
    match = _AMBIGUOUS.search(text)
    if match:
        return _quote_line(match["line"])
    match = _OVERRIDE.search(text)
    if match:
        return _key_line(exc, match["key"])
    match = _SWEEP.search(text)
    if match:
        return f"{match['line']} is a sweep: add -m (--multirun) to run every value"
    lines = text.split("\nConfig search path:")[0].splitlines()
    line = " ".join(part.strip() for part in lines if part.strip())
    from hydra.errors import OverrideParseException

    if isinstance(exc, OverrideParseException):
        line = f"cannot parse an override: {line.replace(' See ', '; see ')}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        line = f"{line}: {str(cause).strip().splitlines()[0]}"
    return line


def _one_line(func: Callable[[], Any]) -> Any:
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return func()
    try:
        return func()
    except (ConfigCompositionException, OverrideParseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)


@contextlib.contextmanager
def one_line_hydra_errors() -> Iterator[None]:
    """Within this block, Hydra's errors about the command line print one ``error:`` line and exit 2."""
    from hydra._internal import utils

    original = utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        return original(lambda: _one_line(func))

    utils.run_and_report = run_and_report
    try:
        yield
    finally:
        utils.run_and_report = original
