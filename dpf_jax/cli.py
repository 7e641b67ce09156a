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


def enable_compilation_cache(path: str) -> str | None:
    """JAX's persistent compilation cache in `path` (`train.compilation_cache_dir`), so that a
    rerun, a resumed run or the next run of a sweep with the same padded shapes loads its
    compiled steps instead of compiling them again (~10-30 s per shape on a GPU). The
    environment variable JAX_COMPILATION_CACHE_DIR, which JAX reads itself, wins; an empty
    `path` leaves the cache off. Returns the directory in use (logged), or None. Call before the
    first compilation."""
    import logging
    import os

    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not env and not path:
        return None
    if not env:
        import jax

        path = str(Path(path).expanduser())
        jax.config.update("jax_compilation_cache_dir", path)
    logging.getLogger(__name__).info("persistent compilation cache: %s", env or path)
    return env or path


def run_app(main, argv: list[str] | None = None) -> None:
    """`absl.app.run(main, argv)`, with a `--config.x=y` override naming no config field
    reported in one line instead of a traceback. Everything else passes through unchanged: errors
    from `main`, and errors inside a config file (its traceback shows the file and line)."""
    from absl import app, flags

    try:
        app.run(main, argv)
    except (AttributeError, KeyError) as e:
        if flags.FLAGS.is_parsed():
            raise
        # ml_collections' KeyError text arrives re-quoted ('\'epoch\'\nDid you mean ...'): unquote it
        text = str(e).replace("\\n", "\n").replace("\\'", "'")
        lines = [line.strip(" '\"") for line in text.splitlines() if line.strip(" '\"")]
        overrides = [a.split("=")[0] for a in (sys.argv if argv is None else argv) if a.startswith("--config.")]
        culprit = [o for o in overrides if lines and lines[0] in o.split(".")[1:]]
        if not culprit:
            raise
        raise SystemExit(f"error: bad command line: {culprit[0]}: no config field {lines[0]!r}"
                         + "".join(f"; {line}" for line in lines[1:])) from None


def explain(error: Exception, argv: list[str]) -> str:
    """The error's message; for a missing file, with a hint when the run was started outside the
    repository its config comes from."""
    root = config_root(argv)
    if isinstance(error, FileNotFoundError) and root is not None and root != Path.cwd().resolve():
        return (f"{error} (relative paths in a config are relative to the working directory, {Path.cwd()}; "
                f"run from the repository root, {root}, or give absolute paths)")
    return str(error)


def apply_config_override(config, item: str) -> None:
    """`--set train.balance_shares=False` (the benchmark scripts' option): one config field, value
    parsed as a Python literal (else kept as a string); an unknown field is an error, not a silent no-op."""
    import ast

    key, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. optim.flatten=False")
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"--set {item!r}: the config has no field {key!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(node[leaf], str) and not isinstance(value, str):
        value = raw  # a string field takes the text as given (model.fold_edge_weights=False: "False")
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections keeps each field's type
        raise SystemExit(f"--set {item!r}: {e}") from None
