"""Prediction from a fine-tuned workdir: the command line on a folder of files (bad files
reported, the rest predicted), the Python API (same numbers, order and supercell invariance,
pymatgen / ASE / Crystal / path inputs), re-scoring a split to the run's own test MAE, and
clear errors for a pre-training workdir or an empty folder."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, REPO, tiny
from configs import finetune_jarvis
from dpf_jax import predict as predict_lib
from dpf_jax.data.graphs import CrystalGraph, build_crystal_graph
from dpf_jax.data.readers import iter_jsonl
from dpf_jax.data.records import Crystal

pymatgen = pytest.importorskip("pymatgen.core")
from pymatgen.core import Lattice, Structure  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "structures"


def _structure(c: Crystal) -> Structure:
    return Structure(Lattice(c.lattice), [int(z) for z in c.numbers], c.frac_coords)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny fine-tuning run (the real training code path) and its results.json."""
    from dpf_jax.train.loop import train_and_evaluate

    c = tiny(finetune_jarvis.get_config(), records=48, epochs=2, batch=16, layers=1, channels=8, heads=1)
    workdir = tmp_path_factory.mktemp("finetune")
    results = train_and_evaluate(c, str(workdir))
    return workdir, results


@pytest.fixture(scope="module")
def model(run):
    return predict_lib.load_model(run[0])


@pytest.fixture(scope="module")
def jarvis_structures():
    out = []
    for c in iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"):
        out.append((c.id, _structure(c)))
        if len(out) == 6:
            break
    return out


def _overlapping(structure: Structure) -> Structure:
    s = structure.copy()
    s.append(s[0].specie, s[0].coords + np.array([0.2, 0.0, 0.0]), coords_are_cartesian=True)
    return s


@pytest.fixture(scope="module")
def cif_folder(tmp_path_factory, jarvis_structures):
    folder = tmp_path_factory.mktemp("cifs")
    for rid, s in jarvis_structures:
        s.to(filename=str(folder / f"{rid}.cif"))
    shutil.copy(FIXTURES / "broken.cif", folder / "broken.cif")
    # parses, but two atoms 0.2 Å apart: the graph builder refuses it
    _overlapping(jarvis_structures[0][1]).to(filename=str(folder / "overlap.cif"))
    (folder / "notes.txt").write_text("not a structure")
    return folder


def _cli(*args, timeout=300, env=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "dpf_jax.predict", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_cli_predicts_a_folder_and_reports_bad_files(run, model, cif_folder, jarvis_structures, tmp_path):
    workdir, _ = run
    out = tmp_path / "preds.csv"
    res = _cli("--checkpoint", str(workdir), str(cif_folder), "--output", str(out), "--batch-size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _read_csv(out.read_text())
    ids = [rid for rid, _ in jarvis_structures]
    assert [r["id"] for r in rows] == sorted(ids)  # one row per good file, folder order
    assert list(rows[0]) == ["id", "formula", "prediction", "units"]
    assert {r["units"] for r in rows} == {"eV/atom"}
    formulas = {rid: s.composition.reduced_formula for rid, s in jarvis_structures}
    assert all(r["formula"] == formulas[r["id"]] for r in rows)
    assert "broken.cif" in res.stderr and "could not parse CIF" in res.stderr
    assert f"{cif_folder / 'overlap.cif'}: atoms 0 and" in res.stderr and "overlap" in res.stderr
    assert "2 skipped" in res.stderr
    # the folder's other file is left out with a count, not read as a failure
    assert f"ignored 1 file(s) in the folder(s) given whose names are not structure-file names (first: " \
           f"{cif_folder / 'notes.txt'})" in res.stderr
    # the same files named one by one, on ONE device (the run saved its checkpoint from 4),
    # CSV on stdout: the same table
    res2 = _cli("-c", str(workdir), *sorted(str(p) for p in cif_folder.glob("JVASP-*.cif")),
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert "4 cpu device(s)" in res.stderr and "1 cpu device(s)" in res2.stderr
    rows2 = _read_csv(res2.stdout)
    assert [(r["id"], r["formula"]) for r in rows2] == [(r["id"], r["formula"]) for r in rows]
    np.testing.assert_allclose([float(r["prediction"]) for r in rows2], [float(r["prediction"]) for r in rows],
                               rtol=1e-5, atol=1e-6)  # another batch size: float rounding only

    # the Python API on pymatgen Structures gives the CLI's numbers, in input order
    by_id = {r["id"]: float(r["prediction"]) for r in rows}
    structures = [s for _, s in jarvis_structures]
    api = model.predict(structures)
    assert api.shape == (len(ids),) and api.dtype == np.float64
    np.testing.assert_allclose(api, [by_id[i] for i in ids], rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(0).permutation(len(structures))
    np.testing.assert_allclose(model.predict([structures[k] for k in perm]), api[perm], rtol=1e-5, atol=1e-6)
    # a structure alone is predicted as in a batch (eval mode: no batch statistics)
    np.testing.assert_allclose(model.predict(structures[2]), api[2:3], rtol=1e-5, atol=1e-6)


def test_api_accepts_ase_crystals_paths_and_reports_failures(model, cif_folder, jarvis_structures):
    from pymatgen.io.ase import AseAtomsAdaptor

    rid, s = jarvis_structures[1]
    ref = model.predict([s])[0]
    crystal = next(c for c in iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz") if c.id == rid)
    inputs = [AseAtomsAdaptor.get_atoms(s), crystal, str(cif_folder / f"{rid}.cif"), cif_folder / f"{rid}.cif"]
    np.testing.assert_allclose(model.predict(inputs), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(predict_lib.PredictionError, match="broken.cif"):
        model.predict([s, str(cif_folder / "broken.cif")])
    with pytest.raises(predict_lib.PredictionError, match=r"input 1 \(.*\): atoms 0 and \d+ overlap"):
        model.predict([s, _overlapping(jarvis_structures[0][1])])
    mixed = model.predict([s, str(cif_folder / "overlap.cif")], on_error="nan")
    assert mixed[0] == pytest.approx(ref, rel=1e-5) and np.isnan(mixed[1])
    rows, failures = model.predict_records([cif_folder], return_failures=True)
    assert len(rows) == len(jarvis_structures) and len(failures) == 2
    with pytest.warns(UserWarning, match=r"2 input\(s\) could not be predicted .*return_failures=True"):
        assert model.predict_records([cif_folder]) == rows
    assert set(rows[0]) == {"id", "formula", "prediction", "units"}
    assert model.task == "formation_energy_peratom" and model.units == "eV/atom" and model.transform == ""


def _unfold_2x1x1(g: CrystalGraph) -> CrystalGraph:
    """The 2x1x1 supercell graph whose every atom has exactly the edges of its original."""
    c, n = g.crystal, g.num_nodes
    lattice = c.lattice.copy()
    lattice[0] *= 2
    frac = np.concatenate([c.frac_coords * [0.5, 1, 1], (c.frac_coords + [1, 0, 0]) * [0.5, 1, 1]])
    senders, receivers, images = [], [], []
    for cr in (0, 1):  # receiver copy; the sender copy and image follow from the edge vector
        cs = (cr - g.images[:, 0]) % 2
        img = g.images.copy()
        img[:, 0] = (g.images[:, 0] - cr + cs) // 2
        senders.append(cs * n + g.senders)
        receivers.append(cr * n + g.receivers)
        images.append(img)
    s, r, im = np.concatenate(senders), np.concatenate(receivers), np.concatenate(images)
    order = np.lexsort((im[:, 2], im[:, 1], im[:, 0], s, r))
    crystal = Crystal("unfolded", lattice, np.concatenate([c.numbers, c.numbers]), frac)
    out = CrystalGraph(crystal, s[order].astype(np.int32), r[order].astype(np.int32), im[order].astype(np.int32))
    # same edge vectors, atom by atom
    np.testing.assert_allclose(np.sort(np.linalg.norm(out.edge_vectors(), axis=1)),
                               np.sort(np.tile(np.linalg.norm(g.edge_vectors(), axis=1), 2)), atol=1e-9)
    return out


def test_supercell_invariance(model, jarvis_structures):
    # the model itself: the same atom environments twice give the same mean readout
    from dpf_jax.data.readers import crystal_from_pymatgen

    g = build_crystal_graph(crystal_from_pymatgen(jarvis_structures[0][1]))
    preds, _ = model.predict_graphs([g, _unfold_2x1x1(g)])
    np.testing.assert_allclose(preds[1], preds[0], rtol=1e-5, atol=1e-6)
    # end to end, on a cell large enough that the reference graph of the supercell is two
    # copies of the cell's (lattice self-loops > 13 Å, no self-image neighbours, no shell ties)
    c = next(c for c in iter_jsonl(DATA / "mp_megnet.jsonl.gz") if c.id == "mp-572674")
    s = _structure(c)
    y = model.predict([s, s * (2, 1, 1)])
    np.testing.assert_allclose(y[1], y[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which,key", [("best", "test_mae_best_val"), ("latest", "test_mae_final")])
def test_split_reproduces_the_run_test_mae(run, which, key, tmp_path, capsys):
    workdir, results = run
    out = tmp_path / f"test_{which}.csv"
    rc = predict_lib.main(["-c", str(workdir), "--split", "test", "--which", which, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    printed = float(err.split("test MAE:")[1].split()[0])
    assert printed == pytest.approx(results[key], abs=1e-5)
    rows = _read_csv(out.read_text())
    assert list(rows[0]) == ["id", "formula", "target", "prediction", "units"]
    mae = np.mean([abs(float(r["target"]) - float(r["prediction"])) for r in rows])
    assert mae == pytest.approx(results[key], abs=1e-5)
    # the run's own per-crystal test predictions (of the final model); a step folder works too
    if which == "latest":
        step_dir = max((workdir / "checkpoints" / "latest").iterdir(), key=lambda p: int(p.name))
        assert predict_lib.main(["-c", str(step_dir), "--split", "test", "-o", str(out)]) == 0
        assert float(capsys.readouterr().err.split("test MAE:")[1].split()[0]) == pytest.approx(results[key], abs=1e-5)
        with open(workdir / "predictions_test.csv") as f:
            ref = {r["id"]: float(r["prediction"]) for r in csv.DictReader(f)}
        np.testing.assert_allclose([float(r["prediction"]) for r in rows], [ref[r["id"]] for r in rows],
                                   rtol=1e-4, atol=1e-5)


def test_log10_targets_get_a_linear_column(model):
    from types import SimpleNamespace

    fake = SimpleNamespace(units="log10(GPa)", transform="log10", task="K_VRH")
    c = next(iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"))
    res = predict_lib.Prediction([c], np.array([2.0]), [], np.array([1.5]))
    rows = predict_lib.Predictor.rows(fake, res, with_targets=True)
    assert rows[0]["prediction"] == 2.0 and rows[0]["prediction_GPa"] == pytest.approx(100.0)
    assert rows[0]["target_GPa"] == pytest.approx(10 ** 1.5) and rows[0]["units"] == "log10(GPa)"


def test_clear_errors(run, tmp_path, capsys):
    workdir, _ = run
    pre = tmp_path / "pretrain_run"
    shutil.copytree(workdir, pre)
    cfg = json.loads((pre / "config.json").read_text())
    cfg["mode"] = "pretrain"
    (pre / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(predict_lib.PredictionError, match="pre-training"):
        predict_lib.load_model(pre)
    assert predict_lib.main(["-c", str(pre), str(FIXTURES / "JVASP-10.cif")]) == 1
    assert "pre-training" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_lib.main(["-c", str(workdir), str(empty)]) == 2
    assert "no structure files" in capsys.readouterr().err
    assert predict_lib.main(["-c", str(workdir), str(FIXTURES / "broken.cif")]) == 2
    err = capsys.readouterr().err
    assert "broken.cif" in err and "nothing could be predicted" in err
    assert predict_lib.main(["-c", str(tmp_path / "nowhere"), str(FIXTURES / "JVASP-10.cif")]) == 1
    assert "does not exist" in capsys.readouterr().err

    # structure files only in a sub-folder: the error says -r finds them
    (empty / "sub").mkdir()
    shutil.copy(FIXTURES / "JVASP-10.cif", empty / "sub" / "JVASP-10.cif")
    assert predict_lib.main(["-c", str(workdir), str(empty)]) == 2
    assert "there are some in sub-folders: add -r" in capsys.readouterr().err
    # a CIF under another name: refused by name, read with --format
    odd = tmp_path / "structure.txt"
    shutil.copy(FIXTURES / "JVASP-10.cif", odd)
    assert predict_lib.main(["-c", str(workdir), str(odd)]) == 2
    assert "--format" in capsys.readouterr().err
    assert predict_lib.main(["-c", str(workdir), str(odd), "--format", "cif"]) == 0
    out = capsys.readouterr()
    assert _read_csv(out.out)[0]["id"] == "structure" and "1 structure(s); 0 skipped" in out.err


def test_import_dpf_jax_stays_light():
    code = "import sys, dpf_jax; assert 'jax' not in sys.modules, 'jax imported'; print(dpf_jax.__version__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and callable(__import__("dpf_jax").load_model)


def test_slim_export_predicts_like_the_run(run, model, jarvis_structures, tmp_path):
    from dpf_jax.train.export import export_slim_checkpoint

    export_slim_checkpoint(run[0], tmp_path / "slim")
    slim = predict_lib.load_model(tmp_path / "slim")
    structures = [s for _, s in jarvis_structures]
    np.testing.assert_allclose(slim.predict(structures), model.predict(structures), rtol=1e-6, atol=1e-7)


def test_export_names_the_missing_checkpoint(tmp_path, capsys):
    """A run that kept only 'latest' (no validation split): export's default 'best' fails with a
    one-line error that says what the run holds and what to pass, not a traceback."""
    from dpf_jax.train import export

    (tmp_path / "run" / "checkpoints" / "latest").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "run"), str(tmp_path / "slim")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "has no 'best' checkpoint (it holds: latest)" in err and "--which latest" in err
    assert not (tmp_path / "slim").exists()
