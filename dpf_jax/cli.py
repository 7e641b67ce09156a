"""Command-line plumbing shared by `dpf_jax.main` and `dpf_jax.train.multirun`: finding the
repository a `--config` file belongs to, so its configs import and its errors can say where
relative paths are resolved."""

from __future__ import annotations

import sys
from pathlib import Path


def config_root(argv: list[str]) -> Path | None:
    """The repository holding the `--config` file (the folder above its `configs/`), or None.

    Reads the flag as absl does: `--config PATH`, `--config=PATH`, one dash too, nothing
    after a bare `--`; a `PATH:arg` suffix (ml_collections' config argument) is dropped."""
    path = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name != "config":
            continue
        if eq:
            path = value
        elif i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return None
    root = Path(path.split(":")[0]).resolve().parent.parent
    return root if (root / "configs" / "base.py").is_file() else None


def put_config_root_on_path(argv: list[str]) -> None:
    """The shipped configs import `configs.base`, which Python finds only from the repository
    root: put that folder on the import path, so a run started elsewhere still loads its config
    (its relative data paths still resolve against the working directory)."""
    root = config_root(argv)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def run_app(main, argv: list[str] | None = None) -> None:
    """`absl.app.run(main, argv)`, with a bad `--config.x=y` override (a misspelt field, a value
    of the wrong type: errors raised while the flags are parsed, before `main` runs) reported
    in one line instead of a traceback. Errors from `main` itself pass through unchanged."""
    from absl import app, flags

    try:
        app.run(main, argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if flags.FLAGS.is_parsed():
            raise
        # ml_collections' KeyError text arrives re-quoted ('\'epoch\'\nDid you mean ...'): unquote it
        text = str(e).replace("\\n", "\n").replace("\\'", "'")
        lines = [line.strip(" '\"") for line in text.splitlines() if line.strip(" '\"")] or [type(e).__name__]
        if isinstance(e, (AttributeError, KeyError)):  # a misspelt or missing field
            lines[0] = f"no config field {lines[0]!r}"
        raise SystemExit(f"error: bad command line: {'; '.join(lines)}") from None


def explain(error: Exception, argv: list[str]) -> str:
    """The error's message; for a missing file, with a hint when the run was started outside the
    repository its config comes from."""
    root = config_root(argv)
    if isinstance(error, FileNotFoundError) and root is not None and root != Path.cwd().resolve():
        return (f"{error} (relative paths in a config are relative to the working directory, {Path.cwd()}; "
                f"run from the repository root, {root}, or give absolute paths)")
    return str(error)
