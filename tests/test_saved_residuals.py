"""scripts/saved_residuals.py: per-edge residual bytes of one layer, by precision and remat."""

import importlib.util
import json

from conftest import REPO


def test_remat_and_bf16_shrink_what_the_forward_keeps(tmp_path):
    spec = importlib.util.spec_from_file_location("saved_residuals", REPO / "scripts" / "saved_residuals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    rows = module.main(["--precision", "default", "bf16", "--remat", "none", "dots", "--out", str(out)])
    got = {(r["precision"], r["remat"]): r for r in rows}
    assert json.loads(out.read_text()) == rows
    none32, dots32 = got["default", "none"]["bytes_per_edge"], got["default", "dots"]["bytes_per_edge"]
    # without remat the layer keeps several [H, 3C] float32 tensors per edge (H = 4, C = 128)
    assert got["default", "none"]["per_edge_residuals"]["[4, 384] float32"] >= 3
    assert none32 > 3 * dots32 > 0
    assert got["bf16", "none"]["bytes_per_edge"] < none32  # some residuals are bfloat16 there
    # every floating residual is bfloat16 there; only the edge indices / mask keep their size
    assert got["bf16", "dots"]["bytes_per_edge"] <= dots32 / 2 + 16
