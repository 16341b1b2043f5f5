"""Checks of the scripts' arguments beyond their type: every size and rate within a named bound
(argparse type functions), and outputs kept apart from inputs."""

import argparse
import contextlib
import math
import os

from runtime import InputError


def bounded(kind, low, high, what=None):
    """An argparse type: `kind(text)` within [low, high], else the usage error `argument --flag: VALUE:
    expected ... from A to B` (exit code 2). `kind`: int or float; inf and nan are refused too."""
    what = what or ("an integer" if kind is int else "a number")

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text}: expected {what} from {low:g} to {high:g}")
        return value
    parse.__name__ = f"{kind.__name__} from {low:g} to {high:g}"  # argparse's message for a bad value
    return parse


def check_not_inputs(outputs, inputs):
    """Before any work: no `(path, flag)` of `outputs` may name a file of `inputs`, by its path or as
    the same file under another name (a link); no tool overwrites or deletes a file it was given."""
    def identity(path):
        with contextlib.suppress(OSError, ValueError):
            return os.stat(path)[1:3]  # (inode, device)
        return None

    given = {}
    for path in inputs:
        given[os.path.realpath(path)] = path
        if identity(path) is not None:
            given[identity(path)] = path
    for path, flag in outputs:
        found = given.get(os.path.realpath(path)) or (identity(path) and given.get(identity(path)))
        if found is not None:
            raise InputError(f"{flag} {path!r} is the input {found!r}: a tool never overwrites or deletes its input; "
                             "choose another output")
