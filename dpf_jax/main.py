"""Command line: `python -m dpf_jax.main --config configs/<name>.py [--workdir DIR] [--config.x=y]`.

`--workdir` defaults to `runs/<config file name>`, so the README's two commands chain:
pre-training writes runs/pretrain_mask30, which fine-tuning picks up by default.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
    return str(Path("runs") / Path(config_path.split(":")[0]).stem)


def config_root(argv: list[str]) -> Path | None:
    """The repository holding the `--config` file (the folder above its `configs/`), or None.

    The shipped configs import `configs.base`, which Python finds only from the repository
    root; `__main__` puts this folder on the import path so a run started elsewhere still
    loads its config (its relative data paths still resolve against the working directory)."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return None
    root = Path(path.split(":")[0]).resolve().parent.parent
    return root if (root / "configs" / "base.py").is_file() else None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from dpf_jax.train.loop import Interrupted, TrainingError, train_and_evaluate  # after flags: fast --help

    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    try:
        train_and_evaluate(config, workdir)
    except (TrainingError, FileNotFoundError, ValueError) as e:
        root = config_root(sys.argv)
        if isinstance(e, FileNotFoundError) and root is not None and root != Path.cwd().resolve():
            e = f"{e} (relative paths in a config are relative to the working directory, {Path.cwd()}; " \
                f"run from the repository root, {root}, or give absolute paths)"
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    except (Interrupted, KeyboardInterrupt) as e:
        sys.exit(f"interrupted ({e or 'Ctrl-C'}); run the same command again to resume from "
                 f"{workdir}/checkpoints/latest")


if __name__ == "__main__":
    _root = config_root(sys.argv)
    if _root is not None and str(_root) not in sys.path:
        sys.path.insert(0, str(_root))
    app.run(main)
