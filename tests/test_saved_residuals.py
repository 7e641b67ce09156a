"""scripts/saved_residuals.py: per-edge residual bytes of one layer, by precision and remat."""

import json

from conftest import load_script


def test_remat_and_bf16_shrink_what_the_forward_keeps(tmp_path):
    module = load_script("saved_residuals")
    out = tmp_path / "r.json"
    rows = module.main(["--precision", "default", "bf16", "--remat", "none", "dots", "--edge-kernels", "xla",
                        "--out", str(out)])
    got = {(r["precision"], r["remat"]): r for r in rows}
    assert json.loads(out.read_text()) == rows
    none32, dots32 = got["default", "none"]["bytes_per_edge"], got["default", "dots"]["bytes_per_edge"]
    # without remat the layer keeps several [H, 3C] float32 tensors per edge (H = 4, C = 128)
    assert got["default", "none"]["per_edge_residuals"]["[4, 384] float32"] >= 3
    assert none32 > 3 * dots32 > 0
    assert got["bf16", "none"]["bytes_per_edge"] < none32  # some residuals are bfloat16 there
    # every floating residual is bfloat16 there; only the edge indices / mask keep their size
    assert got["bf16", "dots"]["bytes_per_edge"] <= dots32 / 2 + 16


def test_recomputing_gate_keeps_only_its_inputs(tmp_path):
    module = load_script("saved_residuals")
    rows = module.main(["--precision", "default", "--remat", "none", "--out", str(tmp_path / "r.json")])
    got = {r["edge_kernel"]: r for r in rows}
    # autodiff keeps alpha, its normalisation, the gate, ...; the written backward only e @ W3 (an
    # input) and the gated message (msg_layer_0's input, for its weight gradient)
    assert got["xla_recompute"]["per_edge_residuals"]["[4, 384] float32"] == 2
    assert got["xla"]["per_edge_residuals"]["[4, 384] float32"] >= 5
    assert got["xla_recompute"]["bytes_per_edge"] < 0.5 * got["xla"]["bytes_per_edge"]


def test_named_remat_policies_keep_what_they_name(tmp_path):
    """The policies between "none" and "dots" keep the matmul outputs plus the tensors
    MatformerConv names: [H, 3C] upd, alpha and gate ("gate"), only the gate ("gate_lean"),
    none of them ("stats"); each keeps the LayerNorm statistics ([H, 1]) and q_i, k_j."""
    module = load_script("saved_residuals")
    rows = module.main(["--precision", "default", "--remat", "none", "gate", "gate_lean", "stats", "dots",
                        "--edge-kernels", "xla", "--out", str(tmp_path / "r.json")])
    got = {r["remat"]: r for r in rows}
    wide = {k: r["per_edge_residuals"].get("[4, 384] float32", 0) for k, r in got.items()}
    # stats and dots keep e @ W3 (a matmul output) and no named [H, 3C] tensor
    assert wide == {"none": 6, "gate": 3, "gate_lean": 2, "stats": 1, "dots": 1}
    for name in ("gate", "gate_lean", "stats"):
        assert got[name]["per_edge_residuals"]["[4, 1] float32"] == 4  # two LayerNorms' mean and 1/std
    assert "[4, 1] float32" not in got["dots"]["per_edge_residuals"]
    sizes = [got[k]["bytes_per_edge"] for k in ("none", "gate", "gate_lean", "stats", "dots")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
