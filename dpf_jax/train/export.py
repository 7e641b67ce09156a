"""Slim checkpoints: a trained model without its optimiser state, to share or to fine-tune from.

    python -m dpf_jax.train.export <workdir> <out_dir> [--which best|latest]

writes `<out_dir>/checkpoints/best/<step>/` holding only `params`, `batch_stats`, `stats` and
`step` (about a third of a full checkpoint: AdamW's two moment trees are dropped) and the same
`meta` (config, metric). `--config.init_checkpoint=<out_dir>` and `dpf_jax.load_model(<out_dir>)`
accept it like the original workdir; resuming training from it is not possible (no optimiser).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from dpf_jax.train.checkpoint import find_checkpoint_dir, load_raw_checkpoint

KEPT = ("step", "params", "batch_stats", "stats")


def export_slim_checkpoint(workdir, out_dir, which: str = "best") -> Path:
    """Copies the model part of `workdir`'s `which` checkpoint to `out_dir`; returns the step folder."""
    src = Path(workdir)
    ckpts = src / "checkpoints"
    if (ckpts / which).is_dir():
        src = ckpts / which
    elif ckpts.is_dir():  # a run's workdir without that checkpoint
        held = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"{workdir} has no {which!r} checkpoint (it holds: {', '.join(held) or 'none'}); a run without a "
            "validation split, or stopped before its first validation, keeps only 'latest': use --which latest")
    directory, step = find_checkpoint_dir(src)
    raw, meta = load_raw_checkpoint(directory, step)
    slim = {k: raw[k] for k in KEPT if k in raw}
    meta = dict(meta, exported_from=str(Path(workdir).absolute()), slim=True)
    dest = Path(out_dir) / "checkpoints" / "best"
    if dest.exists():
        shutil.rmtree(dest)
    with ocp.CheckpointManager(dest.absolute(), options=ocp.CheckpointManagerOptions(create=True)) as m:
        m.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(slim),
                                                  meta=ocp.args.JsonSave(meta)))
        m.wait_until_finished()
    config_json = Path(workdir) / "config.json"
    if config_json.exists():
        shutil.copy(config_json, Path(out_dir) / "config.json")
    return dest / str(step)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("out_dir")
    p.add_argument("--which", choices=["best", "latest"], default="best")
    args = p.parse_args(argv)
    try:
        path = export_slim_checkpoint(args.workdir, args.out_dir, args.which)
    except (FileNotFoundError, ValueError) as e:
        p.exit(1, f"export: error: {e}\n")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
