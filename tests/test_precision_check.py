"""scripts/precision_check.py: reduced-precision training curves against true float32."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import precision_check  # noqa: E402


def test_compare_flags_a_diverging_mode():
    curves = {"highest": [1.0, 0.5, 0.4], "default": [1.0, 0.5, 0.41], "bf16": [1.0, 0.7, 0.5]}
    finals = {"highest": 0.4, "default": 0.405, "bf16": 0.5}
    out = precision_check.compare(curves, finals, rtol=0.05)
    assert out["default"]["passes"] and not out["bf16"]["passes"]
    assert abs(out["bf16"]["max_rel_dev_val_curve"] - 0.4) < 1e-12


def test_bf16_training_follows_float32_on_real_data(tmp_path):
    report = precision_check.main(["--small", "--epochs", "2", "--modes", "highest", "bf16",
                                   "--rtol", "0.15", "--workdir", str(tmp_path), "--out",
                                   str(tmp_path / "report.json")])
    assert len(report["val_mae_curves"]["bf16"]) == 2
    assert report["comparison"]["bf16"]["passes"], report["comparison"]
    assert report["comparison"]["bf16"]["max_rel_dev_val_curve"] > 0  # bf16 really ran


def test_compare_also_reports_against_default():
    curves = {"highest": [1.0, 0.5], "default": [1.0, 0.52], "default+pallas": [1.0, 0.53]}
    finals = {"highest": 0.5, "default": 0.52, "default+pallas": 0.53}
    out = precision_check.compare(curves, finals, rtol=0.05)
    assert abs(out["default+pallas"]["max_rel_dev_val_curve"] - 0.06) < 1e-12
    assert not out["default+pallas"]["passes"] and out["default"]["passes"]
    assert abs(out["default+pallas"]["max_rel_dev_val_curve_vs_default"] - 0.01 / 0.52) < 1e-12
    assert "max_rel_dev_val_curve_vs_default" not in out["default"]
