"""scripts/bench_train.py: runs end to end on CPU (--small), writes its JSON and .npz dump,
and its FLOP count matches the numbers documented in the script."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from configs import base
from dpf_jax.model import layers as bn_layers


bench = load_script("bench_train")

FIELDS = ("senders", "receivers", "source", "images", "edge_count", "node_count", "positions", "lattice",
          "atomic_numbers", "n_node", "n_edge")


def test_flop_count_of_the_default_model():
    cfg = base.get_config().model
    coef = lambda mode, heads, f: bench.flop_coefficients(bench.matmul_table(cfg, mode, heads, f))  # noqa: E731
    node = coef("finetune", {}, "node")
    assert node["forward"]["edge"] == 4_653_056 and node["forward"]["node"] == 6_717_440
    assert node["train"]["edge"] == 13_926_400 and node["train"]["node"] == 3 * 6_717_440
    edge = coef("finetune", {}, "edge")
    assert edge["forward"]["edge"] == 11_862_016 and edge["forward"]["node"] == 819_200
    assert edge["train"]["edge"] == 35_553_280 and edge["train"]["node"] == 3 * 819_200
    pre = coef("pretrain", {"types": True}, "node")["train"]
    assert pre["node"] == 3 * (6_717_440 + 2 * 128 * 95)
    assert "pool" not in pre and pre["edge"] == node["train"]["edge"]
    # the model's own default formulation is the one counted when the config names none
    assert bench.model_formulation(cfg) in ("edge", "node")


def test_synthetic_crystals_follow_the_distribution():
    crystals = bench.synthetic_crystals(64, seed=3)
    n = np.array([c.num_atoms for c in crystals])
    assert n.min() >= 1 and n.max() <= bench.SYNTH_MAX_ATOMS and 4 <= np.median(n) <= 14
    for c in crystals[:8]:
        assert abs(abs(np.linalg.det(c.lattice)) / c.num_atoms - bench.SYNTH_VOLUME_PER_ATOM) < 1e-6
    k, epa = bench.choose_k(crystals[:24], 36.0)
    assert k > 12 and abs(epa - 36.0) < 3.0


def test_small_benchmark_writes_json_and_batches(tmp_path):
    out, npz = tmp_path / "bench.json", tmp_path / "batches.npz"
    res = bench.main(["--small", "--models", "finetune", "--precision", "default", "--batch-sizes", "8",
                      "--pool", "2", "--steps", "2", "--warmup", "1", "--out", str(out), "--dump-npz", str(npz),
                      "--trace", "3", "--dump-hlo", str(tmp_path / "hlo"),
                      "--set", "optim.flatten=False", "train.balance_shares=False", "model.remat=dots"])
    data = json.loads(out.read_text())
    # the traced program's HLO, named by its configuration
    hlo_file = Path(data["results"][0]["hlo_file"])
    assert hlo_file.parent == tmp_path / "hlo" and hlo_file.name.startswith("real_finetune_B8_default_4dev_")
    assert "ENTRY" in hlo_file.read_text()
    # the kernel trace ran (on a CPU no accelerator kernels: the fields, empty)
    assert "error" not in data["results"][0]["trace"]
    assert {"device_busy_ms_per_step", "top", "kernels_per_step"} <= set(data["results"][0]["trace"])
    assert data["results"][0]["optim_flatten"] is False and data["results"][0]["balance_shares"] is False
    assert data["results"][0]["remat"] == "dots"
    assert data["results"] and data["results"][0] == json.loads(json.dumps(res["results"][0], default=str))
    r = data["results"][0]
    for key in ("crystals_per_s", "crystals_per_s_min", "crystals_per_s_max", "edges_per_s", "step_ms",
                "tflops", "tflops_executed", "node_padding", "edge_padding", "compile_s", "peak_bytes_in_use",
                "xla_step_memory_bytes", "jit_cache_entries"):
        assert key in r, key
    assert r["crystals_per_s"] > 0 and r["tflops"] > 0 and 0 <= r["edge_padding"] < 1
    assert r["merge_edges"] == "atoms" and 0.1 < r["merged_edge_fraction"] < 0.8
    assert r["formulation"] in ("edge", "node")
    assert r["crystals_per_s_min"] <= r["crystals_per_s"] <= r["crystals_per_s_max"]
    assert r["jit_cache_entries"] in (None, len(r["compile_s"]))  # no recompilation while timed
    assert data["device"]["num_devices"] == 4 and data["device"]["jax"]

    z = np.load(npz)
    groups = sorted({k.split("/")[0] for k in z.files})
    assert groups == ["real_finetune_jarvis_bs8"]
    for i in range(2):
        b = {f: z[f"real_finetune_jarvis_bs8/{i}/{f}"] for f in FIELDS}
        n_node, n_edge = b["n_node"], b["n_edge"]
        assert len(n_node) == len(n_edge) == 8 == len(b["lattice"])
        assert n_node.sum() == len(b["positions"]) == len(b["atomic_numbers"])
        assert n_edge.sum() == len(b["senders"]) == len(b["receivers"]) == len(b["images"]) == len(b["edge_count"])
        # fine-tuning merges equal edges and atoms by default: each dumped edge stands for edge_count edges
        # into each atom of its receiver's class (node_count), its vector starting at `source`
        assert (b["edge_count"] >= 1).all() and b["edge_count"].sum() > len(b["senders"])
        assert b["node_count"].sum() == len(b["positions"]) and len(b["source"]) == len(b["senders"])
        assert (b["node_count"][b["receivers"]] > 0).all() and (b["node_count"][b["senders"]] > 0).all()
        assert b["positions"].shape[1] == 3 and b["lattice"].shape[1:] == (3, 3) and b["images"].shape[1] == 3
        assert (b["atomic_numbers"] > 0).all()
        # every edge stays inside its own crystal (device shares concatenated with offsets)
        lo = np.repeat(np.cumsum(n_node) - n_node, n_edge)
        hi = np.repeat(np.cumsum(n_node), n_edge)
        for idx in (b["senders"], b["receivers"], b["source"]):
            assert ((idx >= lo) & (idx < hi)).all()
        budget = z[f"real_finetune_jarvis_bs8/{i}/budget"]
        assert budget[1] * 4 >= n_edge.sum() and budget[2] == 8 // 4 + 1
        # the batch as `bench_edge_kernel.py --graphs-npz` reads it: the real edges, then padding to the budget
        g = load_script("bench_edge_kernel").load_graph(str(npz), f"real_finetune_jarvis_bs8/{i}")
        assert len(g.receivers) == budget[1] * 4 and g.n_node == budget[0] * 4
        assert (np.diff(g.receivers) >= 0).all() and (g.receivers[n_edge.sum():] >= n_node.sum()).all()
        assert (g.weight[:n_edge.sum()] == b["edge_count"]).all() and (g.weight[n_edge.sum():] == 0).all()


def test_small_epoch_check(tmp_path):
    out = tmp_path / "epoch.json"
    res = bench.main(["--small", "--epoch", "--num-devices", "1", "--out", str(out),
                      "--set", "train.budget_search=2", f"train.budget_search_cache={tmp_path / 'counts.json'}"])
    (e,) = json.loads(out.read_text())["epoch"]
    chosen = {row["chosen_n_edge"] for row in e["budget_search"]}
    assert chosen and {int(k.split("x")[1]) for k in e["compile_s"]} <= chosen  # the epoch ran the searched shapes
    assert e == json.loads(json.dumps(res["epoch"][0], default=str))
    assert e["model"] == "pretrain_mask30" and e["steps"] >= 1 and e["crystals"] == 16 * e["steps"]
    for key in ("crystals_per_s_pipeline", "crystals_per_s_pure_step", "pipeline_over_pure",
                "host_crystals_per_s", "within_15_percent"):
        assert key in e, key
    assert e["crystals_per_s_pipeline"] > 0 and e["crystals_per_s_pure_step"] > 0
    # the main thread's time per step by phase: each non-negative, together within the epoch's wall time
    phases = e["pipeline_host_ms_per_step"]
    assert set(phases) == {"next_batch", "dispatch", "wait", "drain"} and min(phases.values()) >= 0
    assert phases["next_batch"] > 0 and phases["dispatch"] > 0
    by_repeat = e["pipeline_host_ms_per_step_by_repeat"]
    assert len(by_repeat) == e["repeats"] == len(e["pipeline_epoch_s"])
    for p, wall in zip(by_repeat, e["pipeline_epoch_s"]):  # each repeat's phases fit in its wall time
        assert set(p) == set(phases) and sum(p.values()) * e["steps"] <= 1e3 * wall
    for sh, wall in zip(e["pipeline_step_shape_by_repeat"], e["pipeline_epoch_s"]):
        assert 0 < sh["step_ms_median"] <= sh["step_ms_max"] <= 1e3 * wall
        assert len(sh["gc_collections"]) == 3 and min(sh["gc_collections"]) >= 0
    assert 0 < e["idle_dispatch_ms_median"] < 1e3 * max(e["pure_epoch_s"])
    for d, wall in zip(e["pure_dispatch_ms_median_by_repeat"], e["pure_epoch_s"]):
        assert 0 < d * e["steps"] <= 1e3 * wall
    assert (e["epoch_batching"], e["prebuilt_batches"]) == ("default", False)
    assert e["compute"].startswith("precision default, edge kernel ")  # what ran, as the run log says


@pytest.mark.parametrize("flags", [["--epoch-batching", "per_share"], ["--epoch-prebuilt"]])
def test_small_epoch_diagnostics(tmp_path, flags):
    """The pipeline epoch with the sessions 17-22 host batching, and with the batches built before
    the epoch: both run the same steps and say which they were."""
    res = bench.main(["--small", "--epoch", "--num-devices", "1", "--epoch-repeats", "1", *flags,
                      "--out", str(tmp_path / "epoch.json")])
    (e,) = res["epoch"]
    assert e["crystals_per_s_pipeline"] > 0 and e["crystals"] == 16 * e["steps"]
    assert (e["epoch_batching"], e["prebuilt_batches"]) == (
        ("per_share", False) if "per_share" in flags else ("default", True))


if __name__ == "__main__":
    pytest.main([__file__, "-v"])


def test_small_benchmark_of_runs_trained_together(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--small", "--models", "finetune", "--precision", "default", "--batch-sizes", "8",
                      "--pool", "4", "--steps", "4", "--warmup", "1", "--runs", "1", "3", "--out", str(out),
                      "--set", "train.budget_search=2", f"train.budget_search_cache={tmp_path / 'counts.json'}"])
    one, three = res["results"]
    for r in (one, three):  # the timed batches use the edge counts the search chose
        assert r["budget_search"] and all(len(row["bytes_accessed"]) == 2 for row in r["budget_search"])
        assert {b[1] for b in r["budgets"]} <= {row["chosen_n_edge"] for row in r["budget_search"]}
    assert (tmp_path / "counts.json").exists()
    assert one["runs"] == 1 and three["runs"] == 3
    # three runs do three times the work per step: crystals and FLOPs per step scale by 3
    assert three["gflop_per_step"] == pytest.approx(3 * one["gflop_per_step"], rel=0.35)
    assert three["crystals_per_s"] == pytest.approx(3 * three["crystals_per_s_per_run"])
    assert three["jit_cache_entries"] in (None, len(three["budgets"]))


def test_scaling_efficiency_pairs_each_configuration_with_its_one_device_run():
    row = dict(data="real", model="pretrain_mask30", precision="default", formulation="node", runs=1)
    results = [dict(row, batch_size=256, num_devices=1, crystals_per_s=12000.0),
               dict(row, batch_size=256, num_devices=4, crystals_per_s=30000.0),
               dict(row, batch_size=1024, num_devices=4, crystals_per_s=40000.0)]  # no 1-device run
    table = bench.scaling_table(results)
    assert len(table) == 1 and table[0]["num_devices"] == 4
    assert abs(table[0]["efficiency"] - 30000.0 / (4 * 12000.0)) < 1e-12


def test_step_op_counter_reads_the_optimised_program():
    module = load_script("count_step_ops")
    import jax
    import jax.numpy as jnp

    x = jnp.ones((8, 8))
    text = jax.jit(lambda a, b: (a @ b, jnp.tanh(a).sum())).lower(x, x).compile().as_text()
    ops = module.entry_op_counts(text)
    assert ops["parameter"] == 2 and sum(ops.values()) >= 4  # two inputs, the matmul, the reduction, a tuple
    # multi-output instructions have tuple types with spaces and /*index=k*/ comments
    hlo = ("HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {\n"
           "  %p = f32[4]{0} parameter(0)\n"
           "  %all-reduce.1 = (f32[4,128]{1,0}, f32[4]{0}, /*index=2*/f32[]) all-reduce(%a, %b, %c), channel_id=1\n"
           "  %gte = f32[4]{0} get-tuple-element(%all-reduce.1), index=1\n"
           "  ROOT %f = f32[4]{0} fusion(%gte), kind=kLoop, calls=%fused\n}\n")
    assert module.entry_op_counts(hlo) == {"parameter": 1, "all-reduce": 1, "get-tuple-element": 1, "fusion": 1}


def test_gathered_batchnorm_halves_the_collectives_of_the_step():
    """The data-parallel training step on four fake devices, 2 layers: "two_pass" BatchNorm
    statistics take two collectives per layer in each direction (4L + 1 with the gradients'),
    "gathered" one (scripts/results/PERFORMANCE_LOG.md, session 12, measures what this saves on GPUs)."""
    module = load_script("count_step_ops")
    collectives = {}
    for stats in ("two_pass", "gathered"):
        compiled, _, _ = module.compile_step(
            "pretrain_mask30", 16, 64, True, 4, overrides=(
                "model.num_layers=2", "model.channels=16", "model.heads=2", "model.rbf_bins=16",
                f"model.batch_norm_stats={stats}"))
        ops = module.entry_op_counts(compiled.as_text())
        collectives[stats] = sum(n for op, n in ops.items() if op.startswith(("all-", "reduce-scatter")))
    layers = 2
    assert collectives["two_pass"] >= 4 * layers + 1
    if not bn_layers._INVARIANT_GATHER:  # this JAX lacks all_gather(to="invarying"): two_pass's psums
        assert collectives["gathered"] == collectives["two_pass"]
        return
    assert collectives["gathered"] <= 2 * layers + 2, collectives  # + the gradients' and the loss terms'
    assert collectives["two_pass"] - collectives["gathered"] >= layers


def test_config_overrides_are_checked():
    from dpf_jax.cli import apply_config_override

    config = base.get_config()
    apply_config_override(config, "model.precision=bf16")  # not a literal: kept as the string
    apply_config_override(config, "train.balance_shares=False")
    assert config.model.precision == "bf16" and config.train.balance_shares is False
    with pytest.raises(SystemExit, match="no field 'train.balance_share'"):
        apply_config_override(config, "train.balance_share=False")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        apply_config_override(config, "optim.flatten")
    # a string field takes a literal's text ("auto" | "True" | "False" for the fold), and the
    # model reads it as the boolean; a value of the wrong type for a typed field is a clear error
    apply_config_override(config, "model.fold_edge_weights=False")
    assert config.model.fold_edge_weights == "False"
    from dpf_jax.model.layers import resolve_fold_edge_weights

    assert resolve_fold_edge_weights(config.model.fold_edge_weights, "node", "xla") is False
    with pytest.raises(SystemExit, match="train.batch_size"):
        apply_config_override(config, "train.batch_size=[1]")


def test_formulation_names_an_edge_kernel(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--small", "--formulation", "node+bogus", "--out", str(tmp_path / "x.json")])
    res = bench.main(["--small", "--models", "finetune", "--precision", "default", "--batch-sizes", "8",
                      "--pool", "2", "--steps", "2", "--warmup", "1", "--formulation", "node+xla_recompute",
                      "--out", str(tmp_path / "b.json")])
    (r,) = res["results"]
    assert r["formulation"] == "node+xla_recompute" and r["crystals_per_s"] > 0


def test_trace_summary_per_device():
    """scripts/profile_step.py: kernels of two steps on two devices -> per step and device the
    time some kernel runs (kernels overlapping on two streams count once), the time in NCCL
    collectives, and kernel times averaged over the devices; host lines and the "XLA Ops" lines
    (which repeat the kernels as spans) are not counted."""
    profile = load_script("profile_step")
    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
            for p, n in ((1, "/device:GPU:0"), (2, "/device:GPU:1"), (3, "/host:CPU"))]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": t, "args": {"name": n}}
             for p in (1, 2) for t, n in ((7, "Stream #13(Compute)"), (9, "Stream #14(Compute)"), (8, "XLA Ops"))]

    def kernel(pid, ts, dur, name, op, tid=7):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": op}}

    events = meta + [kernel(3, 0, 5000, "host work", "", tid=1)]
    for step in range(2):
        t = 1000 * step
        events += [kernel(1, t, 300, "fusion_1", "fusion.1"), kernel(1, t + 300, 100, "ncclDevKernel_AllReduce", "all-reduce.2"),
                   kernel(1, t + 200, 150, "fusion_3", "fusion.3", tid=9),  # overlaps both on another stream
                   kernel(2, t, 500, "fusion_1", "fusion.1"), kernel(2, t + 500, 200, "nccl_gather", "all_gather_invariant.4"),
                   kernel(1, t, 400, "fusion_1", "fusion.1", tid=8)]
    s = profile.summarise_trace(events, '%fusion.1 = f32[] fusion(), metadata={op_name="jit(step)/dense"}', steps=2, top=5)
    assert s["devices"]["/device:GPU:0"] == pytest.approx({"busy_ms_per_step": 0.4, "collective_ms_per_step": 0.1,
                                                           "first_to_last_ms_per_step": 0.7})
    assert s["devices"]["/device:GPU:1"] == pytest.approx({"busy_ms_per_step": 0.7, "collective_ms_per_step": 0.2,
                                                           "first_to_last_ms_per_step": 0.85})
    assert s["device_busy_ms_per_step"] == pytest.approx(0.55) and s["kernels_per_step"] == 2.5
    top = {r["hlo_op"]: r for r in s["top"]}
    assert top["fusion.1"]["ms_per_step"] == pytest.approx(0.4) and top["fusion.1"]["source"] == "jit(step)/dense"
    assert top["all-reduce.2"]["launches_per_step"] == 0.5  # one device of two
    # kernels inside a CUDA graph all carry the command buffer's hlo_op: told apart by their names
    graph = meta + [kernel(1, 10 * i, 10 * (i + 1), n, "command_buffer_1")
                    for i, n in enumerate(["gemm_a", "edge_gate_rows_bwd", "gemm_a"])]
    top = {r["hlo_op"]: r for r in profile.summarise_trace(graph, "", steps=1, top=5)["top"]}
    assert set(top) == {"gemm_a", "edge_gate_rows_bwd"}
    assert top["gemm_a"]["ms_per_step"] == pytest.approx(0.04) and top["gemm_a"]["launches_per_step"] == 2


def test_steps_per_dispatch_times_per_training_step(tmp_path):
    """--steps-per-dispatch 2: two stacked batches per call (lax.scan); the figures are per
    training step (twice the pool's batches are timed per pass), the work per step unchanged."""
    out = tmp_path / "bench.json"
    common = ["--small", "--models", "pretrain_mask30", "--precision", "default", "--batch-sizes", "8",
              "--pool", "2", "--steps", "4", "--warmup", "1"]
    (two,) = bench.main(common + ["--steps-per-dispatch", "2", "--out", str(out)])["results"]
    (one,) = bench.main(common + ["--out", str(tmp_path / "one.json")])["results"]
    assert two["steps_per_dispatch"] == 2 and one["steps_per_dispatch"] == 1
    assert two["timed_steps"] == 2 * two["blocks"] * two["pool"]
    assert two["gflop_per_step"] == pytest.approx(one["gflop_per_step"], rel=0.3)
    # XLA's count of the scan (its body once) scaled to per step like the single-step program's
    assert two["xla_gflop_per_step"] == pytest.approx(one["xla_gflop_per_step"], rel=0.3)
    assert two["step_ms"] == pytest.approx(1e3 * two["crystals_per_s"] ** -1 * 8, rel=0.35)
    with pytest.raises(SystemExit):
        bench.main(["--small", "--epoch", "--steps-per-dispatch", "2", "--out", str(tmp_path / "x.json")])


def test_bench_batching_script(tmp_path):
    """scripts/bench_batching.py on a slice of the shipped corpus: the three batching paths and the
    bundling for transfer timed, and the epoch's padded shapes counted (every step in one budget; full groups of K whole)."""
    bb = load_script("bench_batching")
    out = tmp_path / "batching.json"
    report = bb.main(["--records", "400", "--batch-sizes", "32", "--devices", "1", "2", "--repeats", "1",
                      "--group", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["devices"] for r in report["rows"]] == [1, 2]
    for r in report["rows"]:
        assert min(r["packed_ms_per_batch"], r["per_share_ms_per_batch"], r["concatenating_ms_per_batch"],
                   r["bundle_ms_per_batch"]) > 0
        assert sum(r["budgets"].values()) == r["steps"] > 1
        full = r["steps_in_full_groups_of_3"]
        assert full % 3 == 0 and 0 <= full <= r["steps"] and r["mean_run_of_equal_shapes"] >= 1
    # the timed baselines build the batches the batcher builds (the sessions 17-22 per-share gathers
    # and the per-crystal concatenation), so the times compare like with like
    import importlib

    import jax

    from dpf_jax.train import loop

    config = importlib.import_module("configs.pretrain_mask30").get_config()
    config.data.max_records, config.train.batch_size, config.train.progress_bar = 400, 32, False
    batcher = loop.make_batcher(loop.load_data(config).splits["train"], config, 2)
    ours = next(batcher.iterate(0, 0, shuffle=True))
    for other in (bb.per_share(batcher), bb.concatenating(batcher)):
        theirs = next(other.iterate(0, 0, shuffle=True))
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
