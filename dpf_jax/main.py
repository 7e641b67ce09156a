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

from dpf_jax.cli import enable_compilation_cache, explain, put_config_root_on_path, run_app

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
    return str(Path("runs") / Path(config_path.split(":")[0]).stem)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from dpf_jax.train.loop import Interrupted, TrainingError, train_and_evaluate  # after flags: fast --help

    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    enable_compilation_cache(config.train.get("compilation_cache_dir", ""))
    try:
        train_and_evaluate(config, workdir)
    except (TrainingError, FileNotFoundError, ValueError) as e:
        message = explain(e, sys.argv)
        logging.error("%s", message)
        sys.exit(f"error: {message}")
    except (Interrupted, KeyboardInterrupt) as e:
        sys.exit(f"interrupted ({e or 'Ctrl-C'}); run the same command again to resume from "
                 f"{workdir}/checkpoints/latest")


if __name__ == "__main__":
    put_config_root_on_path(sys.argv)
    run_app(main)
