"""scripts/step_bytes.py: reads an optimised HLO program's instructions and their bytes right,
and on the project's real compiled training step finds every message-passing layer and agrees
with XLA's own count of bytes accessed."""

import json

import pytest

from conftest import load_script

step_bytes = load_script("step_bytes")

# A hand-written ENTRY of the shape XLA prints: a padded batch of 100 edges, one forward fusion
# of layer 0, one backward library call of layer 1 whose tuple result carries a workspace.
HLO = """HloModule m

%fused (p: f32[100,800]) -> f32[100,800] {
  ROOT %p = f32[100,800]{1,0} parameter(0)
}

ENTRY %main (a: s32[1,100], b: f32[100,800]) -> f32[100,400] {
  %batch_senders.1 = s32[1,100]{1,0} parameter(0), metadata={op_name="batch.senders"}
  %x = f32[100,800]{1,0} parameter(1), metadata={op_name="x"}
  %loop_fusion = f32[100,800]{1,0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/jvp()/encoder/att_layers_0/mul"}
  %custom-call.1 = (f32[100,400]{1,0}, s8[4096]{0}) custom-call(%loop_fusion, %x), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp())/encoder/att_layers_1/dot_general"}
  ROOT %gte = f32[100,400]{1,0} get-tuple-element(%custom-call.1), index=0
}
"""


def test_instructions_bytes_and_kinds_of_a_written_program():
    rows = {r["name"]: r for r in step_bytes.entry_instructions(HLO)}
    assert rows["loop_fusion"]["kind"] == "kLoop"
    assert rows["loop_fusion"]["out_bytes"] == 320_000 and rows["loop_fusion"]["in_bytes"] == 320_000
    call = rows["custom-call.1"]
    assert call["kind"] == "cublas" and call["out_bytes"] == 160_000  # the s8 workspace is not traffic
    assert call["in_bytes"] == 640_000
    assert step_bytes.padded_edges(HLO) == 100
    s = step_bytes.summarise(HLO, list_layer=0)
    assert s["kb_per_edge_layer"] == {0: 6.4, 1: 8.0}
    assert s["kb_per_edge_layer_mean_by_kind"] == {"backward cublas": 4.0, "forward kLoop": 3.2}
    # parameters and get-tuple-element move nothing: (640,000 + 800,000) B / 100 edges
    assert s["kb_per_edge_step"] == 14.4 and s["instructions"] == 2
    (listed,) = s["layer_0_instructions"]
    assert listed["kind"] == "kLoop" and listed["direction"] == "forward" and listed["op"] == "/mul"


def test_the_compiled_training_step_on_real_crystals(tmp_path):
    rows = step_bytes.main(["--batch-sizes", "8", "--records", "60", "--budgets", "256x8192",
                            "--set", "model.edge_kernel=xla_recompute",
                            "--out", str(tmp_path / "b.json"), "--save-hlo", str(tmp_path)])
    (row,) = rows
    assert (row["padded_nodes"], row["padded_edges"]) == (256, 8192)  # the budget asked for
    assert row["set"] == ["model.edge_kernel=xla_recompute"]
    assert sorted(row["kb_per_edge_layer"]) == [0, 1, 2, 3, 4]  # the five MatformerConv layers
    # every layer reads or writes at least one float32 [E, H=4, 3C=384] tensor per direction
    assert min(row["kb_per_edge_layer"].values()) >= 2 * 4 * 384 * 4 / 1e3
    # an upper-bound model of traffic, but of the same size as XLA's own count on this backend
    assert 0.5 <= row["kb_per_edge_step"] / row["xla_bytes_accessed_per_edge_kb"] <= 2.0
    assert (tmp_path / "b.json").exists() and row["hlo"].endswith(".txt.gz")
    again = step_bytes.main(["--hlo", row["hlo"], "--out", str(tmp_path / "c.json")])[0]
    assert again["kb_per_edge_layer"] == row["kb_per_edge_layer"]
    # the override reaches the model: the default gate compiles to another program
    (plain,) = step_bytes.main(["--batch-sizes", "8", "--records", "60", "--budgets", "256x8192",
                                "--out", str(tmp_path / "d.json")])
    assert plain["set"] == [] and plain["kb_per_edge_step"] != row["kb_per_edge_step"]


def test_a_budget_the_batch_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="does not fit the asked budgets"):
        step_bytes.main(["--batch-sizes", "8", "--records", "60", "--budgets", "64x512", "--out", "/dev/null"])


def test_bench_shapes_times_one_batch_at_each_budget(tmp_path):
    bench_shapes = load_script("bench_shapes")
    out = bench_shapes.main(["--batch-size", "8", "--records", "60", "--budgets", "256x8192", "320x9216",
                             "--padding-edges", "spread", "first",
                             "--steps", "1", "--blocks", "2", "--out", str(tmp_path / "s.json")])
    a, first, b, _ = out["rows"]
    assert (a["budget"], first["budget"], b["budget"]) == ([256, 8192], [256, 8192], [320, 9216])
    assert (a["padding_edges"], first["padding_edges"]) == ("spread", "first")
    assert (a["real_nodes"], a["real_edges"]) == (b["real_nodes"], b["real_edges"])  # the same crystals
    assert a["real_edges"] <= 8192 and all(r["ms"] > 0 and r["xla_gb_accessed"] > 0 for r in (a, b))
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == out["rows"]


def test_jraph_padding_layout_for_the_timing_comparison():
    import importlib

    import numpy as np

    from dpf_jax.train import loop

    bench_shapes = load_script("bench_shapes")
    config = importlib.import_module("configs.pretrain_mask30").get_config()
    config.data.max_records, config.data.cache_dir, config.train.batch_size = 40, "", 8
    batch = loop.make_batcher(loop.load_data(config).splits["train"], config, 2).make_batch(list(range(8)))
    old = bench_shapes.loops_on_first_padding_node(batch)
    for d in range(2):  # device shares
        pad = ~batch.edges["mask"][d]
        first = int(batch.nodes["mask"][d].sum())
        assert len(set(batch.receivers[d][pad])) > 1  # the batcher spreads them
        assert set(old.receivers[d][pad]) == set(old.senders[d][pad]) == {first}
        np.testing.assert_array_equal(old.receivers[d][~pad], batch.receivers[d][~pad])
        np.testing.assert_array_equal(old.senders[d][~pad], batch.senders[d][~pad])
