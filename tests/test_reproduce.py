"""scripts/reproduce.py --quick and scripts/parity.py end to end (tiny models, real data)."""

import json
import shutil
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import parity  # noqa: E402
import reproduce  # noqa: E402


def test_quick_sweep_writes_tables_plots_json_and_resumes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    argv = ["--quick", "--methods", "scratch", "pretrain_mask30", "--tasks", "jarvis:formation_energy_peratom",
            "--seeds", "0", "1", "--runs", str(runs), "--out", str(out)]
    summary = reproduce.main(argv)
    per = summary["tasks"]["jarvis:formation_energy_peratom"]
    assert per["scratch"]["n_seeds_done"] == 2 and per["pretrain_mask30"]["n_seeds_done"] == 2
    mean, std = per["pretrain_mask30"]["test_mae_final"]
    assert mean > 0 and std >= 0
    table = (out / "reproduce_quick.md").read_text()
    assert "pretrain_mask30" in table and "%" in table  # relative change vs scratch
    data = json.loads((out / "reproduce_quick.json").read_text())
    assert len(data["tasks"]["jarvis:formation_energy_peratom"]["scratch"]["runs"][0]["val_mae_curve"]) == 2
    assert (out / "reproduce_quick_curves_jarvis.png").stat().st_size > 1000  # never the sweep's plot
    assert not (out / "curves_jarvis.png").exists() and not (out / "reproduce_quick_curves_mp.png").exists()
    # fine-tuning really started from the pre-trained encoder
    res = json.loads((runs / "finetune" / "jarvis_formation_energy_peratom" / "pretrain_mask30" / "seed0"
                      / "results.json").read_text())
    assert res["init_checkpoint"].endswith("pretrain/pretrain_mask30")
    # a second call redoes nothing: every results.json is kept as it was
    stamp = {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    reproduce.main(argv)
    assert stamp == {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    # an encoder whose fine-tuning runs are all finished is not pre-trained again when its run is
    # gone (a fresh GPU machine): the sweep's results stand on the committed fine-tuning files
    shutil.rmtree(runs / "pretrain" / "pretrain_mask30")
    del stamp[runs / "pretrain" / "pretrain_mask30" / "results.json"]
    summary = reproduce.main(argv)
    assert not (runs / "pretrain" / "pretrain_mask30").exists()
    assert stamp == {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    assert summary["tasks"]["jarvis:formation_energy_peratom"]["pretrain_mask30"]["n_seeds_done"] == 2


def test_parity_table_against_the_reference(tmp_path):
    ref = parity.reference_numbers()
    assert len(ref) == 9 and ref["jarvis:formation_energy_peratom"]["final"] == 0.202
    summary = {"methods": ["scratch"], "tasks": {"jarvis:formation_energy_peratom": {
        "scratch": {"test_mae_final": (0.2121, 0.01), "test_mae_best_val": (0.2, 0.01)}}}}
    table = parity.parity_table(summary, ref)
    assert "| 1.05 |" in table and "| 0.98 |" in table  # 0.2121 / 0.202, 0.2 / 0.204


def test_worst_test_structures_from_prediction_files(tmp_path):
    """Seed-mean absolute error per structure, the worst first, its share of the MAE and the MAE
    without it, from the runs' predictions_test.csv (checked by hand on 3 structures, 2 seeds)."""
    base = tmp_path / "finetune_reference" / "jarvis_mbj_bandgap" / "scratch"
    rows = {0: [("a", 0.0, 0.1), ("b", 8.0, 4.0), ("c", 1.0, 1.0)],
            1: [("a", 0.0, -0.3), ("b", 8.0, 6.0), ("c", 1.0, 0.5)]}
    for seed, rs in rows.items():
        (base / f"seed{seed}").mkdir(parents=True)
        (base / f"seed{seed}" / "predictions_test.csv").write_text(
            "id,target,prediction\n" + "".join(f"{i},{t},{y}\n" for i, t, y in rs))
    w = parity.worst_test_structures(str(tmp_path), ["jarvis:mbj_bandgap", "mp:band_gap"], ["scratch"], [0, 1])
    assert list(w) == ["jarvis:mbj_bandgap"]  # no files, no entry
    r = w["jarvis:mbj_bandgap"]["scratch"]
    errors = {"a": 0.2, "b": 3.0, "c": 0.25}  # mean |error| over the two seeds
    assert r["n_test"] == 3 and abs(r["mae"] - sum(errors.values()) / 3) < 1e-12
    assert [x["id"] for x in r["worst"]] == ["b", "c", "a"]
    assert abs(r["worst"][0]["prediction"] - 5.0) < 1e-12 and abs(r["mae_without_worst"] - 0.225) < 1e-12
    assert abs(r["worst"][0]["mae_share"] - 3.0 / 3.45) < 1e-12
    assert "b (8.00 → 5.00, 87%)" in parity.worst_table(w)


def test_quick_sweep_with_runs_trained_together(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    argv = ["--quick", "--methods", "scratch", "pretrain_mask30", "--tasks", "mp:band_gap", "--seeds", "0", "1",
            "--runs", str(runs), "--out", str(out), "--together", "4", "--recipe", "reference"]
    summary = reproduce.main(argv)
    per = summary["tasks"]["mp:band_gap"]
    assert per["scratch"]["n_seeds_done"] == 2 and per["pretrain_mask30"]["n_seeds_done"] == 2
    base = runs / "finetune_reference" / "mp_band_gap"  # the recipe is part of the path
    res = json.loads((base / "pretrain_mask30" / "seed1" / "results.json").read_text())
    assert res["init_checkpoint"].endswith("pretrain/pretrain_mask30") and res["units"] == "eV"
    assert sorted(res["trained_together_with"]) == sorted(
        str(base / m / f"seed{s}") for m in ("scratch", "pretrain_mask30") for s in (0, 1))
    assert json.loads((base / "scratch" / "seed0" / "config.json").read_text())["seed"] == 0
