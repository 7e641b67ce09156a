"""scripts/precision_check.py: reduced-precision training curves against true float32, over seeds."""

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import precision_check  # noqa: E402

# "highest" over two seeds, five epochs; best-so-far: seed 0 [1, .6, .5, .5, .4],
# seed 1 [1, .6, .6, .45, .45] -> seed mean [1, .6, .55, .475, .425]
HIGHEST = {0: [1.0, 0.6, 0.5, 0.55, 0.4], 1: [1.0, 0.6, 0.7, 0.45, 0.5]}
HIGHEST_FINALS = {0: 0.40, 1: 0.42}


def test_window_start_leaves_out_the_first_share_of_epochs():
    assert precision_check.window_start(60, 0.2) == 12
    assert precision_check.window_start(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert precision_check.window_start(5, 0.0) == 0
    assert precision_check.window_start(5, 1.0) == 4  # the last epoch is always tested
    assert precision_check.window_start(1, 0.2) == 0


def test_a_pointwise_noisy_mode_passes_when_its_best_so_far_mean_agrees():
    # seed 0 spikes to 2.0 at epoch 3 (raw deviation 2.0 / 0.55 - 1 = 264%), which checkpoint
    # selection never sees: the best-so-far curves are those of "highest"
    noisy = {0: [1.0, 0.6, 0.5, 2.0, 0.4], 1: [1.0, 0.6, 0.7, 0.45, 0.5]}
    out = precision_check.compare({"highest": HIGHEST, "bf16": noisy},
                                  {"highest": HIGHEST_FINALS, "bf16": {0: 0.41, 1: 0.42}}, rtol=0.05)
    row = out["bf16"]
    assert row["passes"], row
    assert row["raw_max_rel_dev_per_seed"] == {0: pytest.approx(2.0 / 0.55 - 1), 1: 0.0}
    assert row["max_rel_dev_best_so_far"] == 0.0
    assert row["rel_dev_final_mean"] == pytest.approx(0.005 / 0.41)


def test_a_mode_whose_final_mean_is_off_fails():
    finals = {0: 0.44, 1: 0.46}  # mean 0.45 vs 0.41: +9.76%, though each curve equals highest's
    out = precision_check.compare({"highest": HIGHEST, "bf16": HIGHEST},
                                  {"highest": HIGHEST_FINALS, "bf16": finals}, rtol=0.05)
    assert out["bf16"]["rel_dev_final_mean"] == pytest.approx(0.04 / 0.41)
    assert out["bf16"]["max_rel_dev_best_so_far"] == 0.0
    assert not out["bf16"]["passes"]


def test_a_mode_off_inside_the_window_fails():
    # seed 1 bottoms out at 0.53 instead of 0.45: best-so-far mean (0.5 + 0.53) / 2 at epoch 3
    # (+8.42% on 0.475) and (0.4 + 0.53) / 2 at epoch 4 (+9.41% on 0.425); finals agree
    late = {0: HIGHEST[0], 1: [1.0, 0.6, 0.7, 0.53, 0.55]}
    out = precision_check.compare({"highest": HIGHEST, "default": late},
                                  {"highest": HIGHEST_FINALS, "default": HIGHEST_FINALS}, rtol=0.05)
    row = out["default"]
    assert row["max_rel_dev_best_so_far"] == pytest.approx(0.04 / 0.425)
    assert row["worst_epoch_best_so_far"] == 4
    assert not row["passes"]


def test_deviations_before_the_window_do_not_decide():
    # epoch 0 off by 50% in both seeds; from epoch 1 on (ceil(0.2 * 5)) the best-so-far curves agree
    early = {s: [1.5] + c[1:] for s, c in HIGHEST.items()}
    curves = {"highest": HIGHEST, "bf16": early}
    finals = {"highest": HIGHEST_FINALS, "bf16": HIGHEST_FINALS}
    row = precision_check.compare(curves, finals, rtol=0.05, skip=0.2)["bf16"]
    assert row["passes"] and row["max_rel_dev_best_so_far"] == 0.0
    assert row["max_rel_dev_best_so_far_before_window"] == pytest.approx(0.5)  # still reported
    assert not precision_check.compare(curves, finals, rtol=0.05, skip=0.0)["bf16"]["passes"]


def test_other_modes_are_also_compared_with_default():
    curves = {"highest": {0: [1.0, 0.5]}, "default": {0: [1.0, 0.52]}, "default+pallas": {0: [1.0, 0.53]}}
    finals = {"highest": {0: 0.5}, "default": {0: 0.52}, "default+pallas": {0: 0.53}}
    out = precision_check.compare(curves, finals, rtol=0.05, skip=0.5)
    assert out["default"]["passes"] and not out["default+pallas"]["passes"]
    assert out["default+pallas"]["max_rel_dev_best_so_far"] == pytest.approx(0.06)
    assert out["default+pallas"]["max_rel_dev_best_so_far_vs_default"] == pytest.approx(0.01 / 0.52)
    assert out["default+pallas"]["passes_vs_default"]
    assert "max_rel_dev_best_so_far_vs_default" not in out["default"]


def test_seed_noise_of_highest():
    # best-so-far: seed 0 [1, .8, .8, .6], seed 1 [3, .6, .6, .5], seed 2 [.9, .9, .6, .6];
    # mean [4.9/3, 2.3/3, 2/3, 1.7/3]. Window from epoch 1 (ceil(0.25 * 4)); the largest
    # deviation there is seed 1 at epoch 1: |0.6 - 2.3/3| / (2.3/3) = 5/23. Epoch 0 (seed 1:
    # 1.3667 / 1.6333 = 0.84) is outside the window.
    curves = {0: [1.0, 0.8, 0.9, 0.6], 1: [3.0, 0.6, 0.7, 0.5], 2: [0.9, 0.9, 0.6, 0.7]}
    finals = {0: 0.4, 1: 0.5, 2: 0.6}  # mean 0.5, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    noise = precision_check.seed_noise(curves, finals, skip=0.25)
    assert noise["final_rel_std"] == pytest.approx(0.2)
    assert noise["max_rel_dev_best_so_far_single_seed"] == pytest.approx(5 / 23)
    assert noise["max_rel_dev_best_so_far_per_seed"][0] == pytest.approx(0.2)  # epoch 2: |.8 - 2/3| / (2/3)
    assert precision_check.seed_noise({0: curves[0]}, {0: 0.4}, skip=0.25) is None


def test_bf16_training_follows_float32_on_real_data(tmp_path):
    out = tmp_path / "report.json"
    report = precision_check.main(["--small", "--epochs", "2", "--seeds", "0", "1", "--modes", "highest", "bf16",
                                   "--rtol", "0.15", "--workdir", str(tmp_path), "--out", str(out)])
    assert report["metric"] == "val_mae" and report["final_metric"] == "test_mae_final"
    assert report["task"] == "formation_energy_peratom" and report["seeds"] == [0, 1]
    for mode in ("highest", "bf16"):
        assert sorted(report["val_curves"][mode]) == [0, 1]
        assert all(len(c) == 2 for c in report["val_curves"][mode].values())
        assert all(math.isfinite(x) for x in report["final"][mode].values())
        assert (tmp_path / f"{mode}_seed1" / "metrics.csv").exists()  # one workdir per (mode, seed)
    highest = report["val_curves"]["highest"]
    assert highest[0] != highest[1]  # the seed reached the initial parameters / data order
    row = report["comparison"]["bf16"]
    assert row["passes"], row
    assert max(row["raw_max_rel_dev_per_seed"].values()) > 0  # bf16 really ran
    assert report["highest_seed_noise"]["final_rel_std"] > 0
    on_disk = json.loads(out.read_text())  # JSON turns the seed keys into strings
    assert on_disk["val_curves"]["bf16"]["1"] == report["val_curves"]["bf16"][1]
    assert on_disk["comparison"]["bf16"]["passes"] is True


def test_pretraining_config_compares_validation_loss(tmp_path):
    report = precision_check.main(["--small", "--config", "pretrain_mask30", "--epochs", "1", "--seeds", "0", "1",
                                   "--modes", "highest", "bf16", "--workdir", str(tmp_path),
                                   "--out", str(tmp_path / "report.json")])
    assert report["metric"] == "val_loss" and report["final_metric"] == "last_epoch_val"
    assert report["task"] is None
    for mode in ("highest", "bf16"):
        for seed in (0, 1):
            curve = report["val_curves"][mode][seed]
            assert len(curve) == 1 and report["final"][mode][seed] == curve[-1] > 0
    row = report["comparison"]["bf16"]
    assert row["final_mean_base"] == pytest.approx(sum(report["final"]["highest"].values()) / 2)
    assert row["rel_dev_final_mean"] > 0  # bf16 really ran: its loss differs from float32's
    assert report["highest_seed_noise"]["final_rel_std"] > 0


def test_modes_are_compared_on_the_same_seeds_only():
    curves = {"highest": {0: [1.0], 1: [1.0]}, "bf16": {0: [1.0]}}
    finals = {"highest": {0: 1.0, 1: 1.0}, "bf16": {0: 1.0}}
    with pytest.raises(ValueError, match="seeds differ"):
        precision_check.compare(curves, finals, rtol=0.05)


def test_a_stopped_run_fails_its_mode_and_the_report_keeps_the_rest(tmp_path, monkeypatch):
    """A diverging mode is a verdict: the check goes on, writes every finished run, fails that
    mode; against a stopped "highest" nothing passes. (train_and_evaluate is replaced by a fake
    that writes the files a run writes, so no training here.)"""
    from dpf_jax.train import loop

    def fake_train(config, workdir):
        mode = config.model.precision
        if (mode, config.seed) in stop:
            raise loop.TrainingError("non-finite loss or gradient at step 3")
        Path(workdir).mkdir(parents=True)
        (Path(workdir) / "metrics.csv").write_text("epoch,val_mae\n0,0.5\n1,0.4\n")
        return {"test_mae_final": 0.41}

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    argv = ["--seeds", "0", "1", "--epochs", "2", "--modes", "highest", "default", "bf16",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]
    stop = {("bf16", 1)}
    report = precision_check.main(argv)
    assert report["comparison"]["default"]["passes"] is True  # identical fake curves
    assert report["comparison"]["bf16"] == {"passes": False, "failed_runs": {"bf16": {1: "non-finite loss or "
                                                                                        "gradient at step 3"}}}
    assert sorted(report["val_curves"]["bf16"]) == [0]  # the finished seed is kept
    assert json.loads((tmp_path / "r.json").read_text())["failed_runs"]["bf16"] == {"1": "non-finite loss or "
                                                                                        "gradient at step 3"}
    stop = {("highest", 0)}
    report = precision_check.main(argv[:-4] + ["--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "r2.json")])
    assert all(not row["passes"] and "highest" in row["failed_runs"] for row in report["comparison"].values())
    assert report["highest_seed_noise"] is None


def test_reports_run_seed_by_seed_merge_into_the_report_of_one_run(tmp_path, monkeypatch):
    """--merge (one seed per GPU at once, then one verdict) gives the verdict a single run over
    all seeds gives; overlapping or mismatched reports are refused. (Fake training as above.)"""
    from dpf_jax.train import loop

    def fake_train(config, workdir):
        mode, seed = config.model.precision, config.seed
        Path(workdir).mkdir(parents=True)
        off = {"highest": 0.0, "default": 0.01, "bf16": 0.08}[mode]  # bf16 8% off: fails
        curve = [(1.0 + off) / (1 + seed), (0.5 + off / 2) / (1 + seed)]
        (Path(workdir) / "metrics.csv").write_text(f"epoch,val_mae\n0,{curve[0]}\n1,{curve[1]}\n")
        return {"test_mae_final": curve[1]}

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)

    def run(seeds, name, epochs="2"):
        return precision_check.main(["--seeds", *seeds, "--epochs", epochs, "--modes", "default", "bf16",
                                     "--workdir", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json")])

    whole = run(["0", "1", "2"], "whole")
    for s in "012":
        run([s], f"p{s}")
    parts = [str(tmp_path / f"p{s}.json") for s in "201"]  # any order
    merged = precision_check.main(["--merge", *parts, "--out", str(tmp_path / "merged.json")])
    assert merged["comparison"] == whole["comparison"]
    assert merged["comparison"]["default"]["passes"] and not merged["comparison"]["bf16"]["passes"]
    assert merged["highest_seed_noise"] == whole["highest_seed_noise"] is not None
    assert merged["seeds"] == [0, 1, 2] and merged["metric"] == "val_mae"
    assert json.loads((tmp_path / "merged.json").read_text())["comparison"] == json.loads(
        (tmp_path / "whole.json").read_text())["comparison"]
    with pytest.raises(ValueError, match="whole.json: highest seed 2 also in .*p2.json"):
        precision_check.main(["--merge", parts[0], str(tmp_path / "whole.json"), "--out", str(tmp_path / "x.json")])
    run(["3"], "p3")  # a killed run's partial report: bf16 seed 3 never finished
    bad = json.loads((tmp_path / "p3.json").read_text())
    del bad["val_curves"]["bf16"]["3"], bad["final"]["bf16"]["3"]
    (tmp_path / "p3.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"runs missing .*\('bf16', 3\)"):
        precision_check.main(["--merge", *parts, str(tmp_path / "p3.json"), "--out", str(tmp_path / "x.json")])
    # a mode added later (--part: no "highest" rerun) joins the others' runs
    precision_check.main(["--part", "--seeds", "0", "1", "2", "--epochs", "2", "--modes", "highest+xla",
                          "--workdir", str(tmp_path / "xla"), "--out", str(tmp_path / "xla.json")])
    assert list(json.loads((tmp_path / "xla.json").read_text())["val_curves"]) == ["highest+xla"]
    more = precision_check.main(["--merge", *parts, str(tmp_path / "xla.json"), "--out", str(tmp_path / "y.json")])
    assert more["comparison"]["highest+xla"]["passes"]  # the fake ignores the kernel: same curves
    assert more["comparison"]["bf16"] == whole["comparison"]["bf16"]
    run(["4"], "p4", epochs="3")
    with pytest.raises(ValueError, match="epochs=3 differ"):
        precision_check.main(["--merge", *parts, str(tmp_path / "p4.json"), "--out", str(tmp_path / "x.json")])
    # each report says which modes it meant to run and which kernel each ran ("auto" resolved)
    assert whole["modes"] == ["highest", "default", "bf16"] and merged["modes"] == whole["modes"]
    assert merged["edge_kernels"] == whole["edge_kernels"] == {m: "xla" for m in whole["modes"]}  # CPU


def test_merging_refuses_what_would_silently_shrink_the_check(tmp_path, monkeypatch):
    """A mode that never finished anywhere, a seed a report declared but did not finish, a
    curve without its final value, another device: errors, not a smaller verdict."""
    from dpf_jax.train import loop

    def fake_train(config, workdir):
        Path(workdir).mkdir(parents=True)
        (Path(workdir) / "metrics.csv").write_text("epoch,val_mae\n0,0.5\n1,0.4\n")
        return {"test_mae_final": 0.4}

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    parts = []
    for s in "01":
        out = tmp_path / f"p{s}.json"
        precision_check.main(["--seeds", s, "--epochs", "2", "--modes", "bf16", "--workdir", str(tmp_path / s),
                              "--out", str(out)])
        parts.append(out)
    merge = lambda *paths, seeds=(): precision_check.main(  # noqa: E731
        ["--merge", *map(str, paths), *(["--seeds", *seeds] if seeds else []), "--out", str(tmp_path / "m.json")])
    assert merge(*parts)["comparison"]["bf16"]["passes"]

    def edited(path, name, change):
        report = json.loads(path.read_text())
        change(report)
        (tmp_path / name).write_text(json.dumps(report))
        return tmp_path / name

    # seed 1 killed before bf16 finished (its report was last written after "highest")
    killed = edited(parts[1], "killed.json", lambda r: (r["val_curves"].pop("bf16"), r["final"].pop("bf16")))
    with pytest.raises(ValueError, match=r"runs missing .*\('bf16', 1\)"):
        merge(parts[0], killed)
    assert merge(parts[0], killed, seeds=["0"])["seeds"] == [0]  # judging fewer seeds is explicit
    with pytest.raises(ValueError, match="has a curve but no final value"):
        merge(parts[0], edited(parts[1], "nofinal.json", lambda r: r["final"]["bf16"].pop("1")))
    with pytest.raises(ValueError, match="device='other GPU' differ"):
        merge(parts[0], edited(parts[1], "device.json", lambda r: r.update(device="other GPU")))
    with pytest.raises(ValueError, match="bf16 ran edge kernel 'pallas_gate_rows-16x8'"):
        merge(parts[0], edited(parts[1], "kernel.json",
                               lambda r: r["edge_kernels"].update(bf16="pallas_gate_rows-16x8")))
