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
