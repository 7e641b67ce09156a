"""How many operations the compiled training step runs, by kind (any backend; no timing).

    python scripts/count_step_ops.py                                  # pretrain_mask30, B=32, flatten off/on
    python scripts/count_step_ops.py --config finetune_jarvis --batch-size 64 --records 400

At small per-device batches the step time is set by how many kernels run, not by how much
data they touch (PERF_NOTES.md, session 5: ~7 ms of a 21 ms B=256 pre-training step on an H200
does not scale with the batch). This compiles the project's own `make_train_step` for a real
batch and counts the top-level instructions of the optimised program by opcode (`fusion`,
`copy`, `dot`, `all-reduce`, ... ; on a GPU each fusion / copy / dot / custom-call is at least
one kernel launch), once per `--variants` setting of `optim.flatten`, and writes a JSON file.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# "%name = TYPE opcode(...": TYPE is one token, or a parenthesised tuple type (with spaces,
# commas and /*index=k*/ comments) for multi-output ops such as combined all-reduces
ENTRY_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([a-z][\w-]*)\((.*)$")


def entry_instructions(hlo_text: str):
    """(line, (name, type, opcode, rest of the line)) of each instruction of the ENTRY computation
    of an optimised HLO module's text."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    body = entry[:entry.index("\n}")]
    for line in body.splitlines()[1:]:
        m = ENTRY_INSTRUCTION.match(line)
        if m:
            yield line, m.groups()


def entry_op_counts(hlo_text: str) -> collections.Counter:
    """Opcode -> count over the ENTRY computation of an optimised HLO module's text."""
    return collections.Counter(opcode for _, (_, _, opcode, _) in entry_instructions(hlo_text))


_DATA: dict = {}  # prepared data per (config, records, overrides): loaded once per process


def compile_step(config_name: str, batch_size: int, records: int, flatten: bool = True, num_devices: int = 1,
                 budgets=None, overrides=(), shuffle: bool = False):
    """The project's own jitted training step, compiled for the first batch of a real dataset
    (in file order, or of the seed-0 shuffled first epoch with `shuffle`), padded to the
    batcher's own budgets or to `budgets` (a list of batching.Budget; a batch that fits none of
    them is an error, not a silently different shape), with `overrides`
    ("model.edge_kernel=xla_recompute", ... as bench_train.py's --set) applied:
    (compiled executable, that host batch, the initial train state on the devices)."""
    import jax

    from dpf_jax.train import loop
    from dpf_jax.train.optim import make_optimizer
    from dpf_jax.train.parallel import make_mesh, put_batch, put_replicated, step_compiler_options
    from dpf_jax.train.step import create_state, make_train_step

    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.data.max_records = records
    config.train.batch_size = batch_size
    config.train.progress_bar = False
    config.optim.flatten = flatten
    if overrides:
        from dpf_jax.cli import apply_config_override

        for item in overrides:
            apply_config_override(config, item)
    key = (config_name, records, tuple(overrides))
    if key not in _DATA:
        _DATA[key] = loop.load_data(config)
    data = _DATA[key]
    stats = loop.data_stats(config, data)
    batcher = loop.make_batcher(data.splits["train"], config, num_devices, budgets=budgets)
    batch = next(batcher.iterate(seed=0, epoch=0, shuffle=shuffle))
    shape = (batch.nodes["mask"].shape[-1], batch.edges["mask"].shape[-1])
    if budgets and shape not in {(b.n_node, b.n_edge) for b in budgets}:  # the batcher added one
        real = (int(batch.nodes["mask"].sum()), int(batch.edges["mask"].sum()))
        raise ValueError(f"the first batch ({real[0]} nodes / {real[1]} edges over {num_devices} device(s)) "
                         f"does not fit the asked budgets {[(b.n_node, b.n_edge) for b in budgets]}")
    objective = loop.make_objective(config)
    model = objective.make_model()
    tx = make_optimizer(config.optim, 1000)
    mesh = make_mesh(num_devices)
    state = put_replicated(create_state(model, tx, jax.tree_util.tree_map(lambda x: x[0], batch), 0, stats), mesh)
    options = step_compiler_options(config.train.get("cuda_graphs", "auto"), mesh, config.train.batch_size)
    step = make_train_step(objective, model, tx, mesh, compiler_options=options,
                           flat_update=loop.flat_update_enabled(config))
    compiled = step.lower(state, put_batch(batch, mesh)).compile()
    return compiled, batch, state


def count(config_name: str, batch_size: int, records: int, flatten: bool, num_devices: int = 1) -> dict:
    import jax

    compiled, _, state = compile_step(config_name, batch_size, records, flatten, num_devices)
    ops = entry_op_counts(compiled.as_text())
    return {"config": config_name, "batch_size": batch_size, "flatten": flatten, "num_devices": num_devices,
            "backend": jax.default_backend(),
            "parameter_leaves": len(jax.tree_util.tree_leaves(state.params)),
            "entry_instructions": sum(ops.values()), "ops": dict(ops.most_common())}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--records", type=int, default=300, help="dataset records to load (a batch needs few)")
    p.add_argument("--variants", nargs="+", default=["tree", "flat"], choices=["tree", "flat"],
                   help="optim.flatten off (tree: one update per parameter leaf) / on (flat)")
    p.add_argument("--num-devices", type=int, default=1,
                   help="data-parallel devices of the step (its collectives: all-reduce counts)")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "step_op_counts.json"))
    args = p.parse_args(argv)
    rows = [count(args.config, args.batch_size, args.records, v == "flat", args.num_devices) for v in args.variants]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["ops"].items())[:6])
        print(f"{r['config']} B={r['batch_size']} optim.flatten={r['flatten']} devices={r['num_devices']} "
              f"({r['backend']}): all-reduce {r['ops'].get('all-reduce', 0)}, "
              f"{r['entry_instructions']} instructions ({top})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
