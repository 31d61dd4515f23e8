"""Hints for a misspelt config key: the closest accepted keys and the list of those accepted there.

`key_hint(parser, message)` reads jsonargparse's error message for the three ways a key can be wrong:
    unrecognized arguments: --model.optimiser.lr              (command line)
    Group 'trainer' does not accept option 'max_epoch'        (experiment file)
    class_path 'X': Option 'batch_sise' is not accepted       (init_args of a class)
and returns text to append to it. The accepted keys come from public APIs only: the parser's
`get_defaults()` (one entry per key) and the class's signature.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re

from jsonargparse import ArgumentParser


def _hint(bad: str, allowed: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(bad, allowed, n=3, cutoff=0.6)
    text = f"\n  '{prefix}{bad}' is not a key."
    if close:
        text += " Did you mean: " + ", ".join(f"{prefix}{c}" for c in close) + "?"
    return text + f"\n  Accepted{' under ' + prefix.rstrip('.') if prefix else ''}: " + ", ".join(allowed)


def parser_keys(parser: ArgumentParser) -> list[str]:
    """Every key the parser accepts, dotted (`trainer.max_epochs`), in declaration order."""
    return [k for k in parser.get_defaults().keys() if k != "help" and not k.endswith(".help")]


def key_hint(parser: ArgumentParser, message: str) -> str:
    """Text to append to `message` (a jsonargparse error) naming the closest keys; "" if none applies."""
    unrecognized = re.findall(r"unrecognized arguments: (--[\w.\-]+)", message)
    in_group = re.findall(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    in_class = re.findall(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    keys = parser_keys(parser) if unrecognized or in_group else []

    def children(group: str) -> list[str]:
        return [k[len(group) + 1:] for k in keys if k.startswith(group + ".") and "." not in k[len(group) + 1:]]

    out = ""
    for bad in unrecognized:
        parts = bad.lstrip("-").split(".")
        # The deepest known group on the key's path, e.g. "model" for --model.optimiser.lr.
        i = next((i for i in range(len(parts) - 1, 0, -1) if children(".".join(parts[:i]))), 0)
        group = ".".join(parts[:i])
        allowed = children(group) if group else [k for k in keys if "." not in k]
        out += _hint(parts[i], allowed, group + "." if group else "")
    for group, bad in in_group:
        out += _hint(bad, children(group), group + ".")
    for class_path, bad in in_class:
        try:
            module, _, name = class_path.rpartition(".")
            params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        except (ImportError, AttributeError, ValueError, TypeError):
            continue
        out += _hint(bad, [p for p in params if p not in ("self", "args", "kwargs")], "init_args.")
    return out
