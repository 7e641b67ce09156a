"""scripts/reproduce.py scheduling without training: worker slots and GPUs, --start-deadline,
--order longest-first (run_main is replaced by fakes; fast, CPU only)."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import parity  # noqa: E402
import reproduce  # noqa: E402


class FakeClock:
    """The start deadline's clock; fake jobs advance it by their duration."""

    def __init__(self):
        self.t = 1000.0
        self.lock = threading.Lock()

    def __call__(self):
        return self.t

    def advance(self, dt):
        with self.lock:
            self.t += dt


def write_results(run_dirs):
    """What a finished run leaves: results.json, and for a pre-training run its checkpoint."""
    for w in run_dirs:
        Path(w).mkdir(parents=True, exist_ok=True)
        if Path(w).parent.name == "pretrain":
            (Path(w) / "checkpoints" / "best" / "10").mkdir(parents=True, exist_ok=True)
        (Path(w) / "results.json").write_text(json.dumps(
            {"test_mae_final": 0.5, "test_mae_best_val": 0.4, "units": "eV", "steps": 10}))


def recording_run_main(started: list):
    """A fake `run_main` that skips finished jobs as the real one does, appends the workdir of
    every job it starts to `started` and leaves the files of a finished run."""

    def fake_run_main(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        if reproduce.job_finished((workdir, flags, run_dirs)):
            return {}  # as run_main: a finished job is skipped at once
        started.append(workdir)
        write_results([w for w in (run_dirs or [workdir]) if not (Path(w) / "results.json").exists()])
        return {}

    return fake_run_main


# ------------------------------------------------------------------------------ worker slots

def test_worker_envs_spread_workers_over_gpus(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    envs = reproduce.worker_envs(4, ["0", "1"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in envs] == ["0.450"] * 4  # 2 workers per card
    assert all(str(REPO) in e["PYTHONPATH"] for e in envs)

    envs = reproduce.worker_envs(2, [])  # no GPU list: workers share whatever there is
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in envs] == [reproduce.os.environ.get("CUDA_VISIBLE_DEVICES")] * 2
    assert [e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in envs] == ["0.450"] * 2

    (env,) = reproduce.worker_envs(1, ["0", "1"])  # one worker: every device, the default memory share
    assert env.get("CUDA_VISIBLE_DEVICES") == reproduce.os.environ.get("CUDA_VISIBLE_DEVICES")
    assert env.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == reproduce.os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")


def test_worker_envs_divide_a_given_memory_fraction(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")  # room left for another program
    assert [e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in reproduce.worker_envs(4, ["0", "1"])] == ["0.200"] * 4


def test_worker_envs_without_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in reproduce.worker_envs(2, []))
    assert "CUDA_VISIBLE_DEVICES" not in reproduce.worker_envs(1, ["0", "1"])[0]


def test_run_all_holds_at_most_parallel_jobs_each_in_its_own_slot(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "visible_gpus", lambda: ["0", "1", "2"])
    lock = threading.Lock()
    running = {}  # job -> (slot, gpu)
    peak, clashes, seen_gpus = [0], [], set()

    def fake_run_main(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        with lock:
            slot, gpu = id(env), env["CUDA_VISIBLE_DEVICES"]
            if any(s == slot or g == gpu for s, g in running.values()):
                clashes.append(workdir)
            running[workdir] = (slot, gpu)
            peak[0] = max(peak[0], len(running))
            seen_gpus.add(gpu)
        time.sleep(0.05)
        with lock:
            del running[workdir]
        return {}

    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    jobs = [(str(tmp_path / f"job{i}"), []) for i in range(9)]
    res = reproduce.run_all(jobs, 3, tmp_path / "logs")
    assert res == {"done": [j[0] for j in jobs], "not_started": [], "failed": []}
    assert peak[0] == 3 and not clashes and seen_gpus == {"0", "1", "2"}


def test_run_all_reports_failures_without_raising(monkeypatch, tmp_path):
    def fake_run_main(workdir, *a, **k):
        if workdir.endswith("bad"):
            raise RuntimeError("boom")
        return {}

    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    res = reproduce.run_all([("a", []), ("bad", []), ("c", [])], 1, tmp_path)
    assert res["done"] == ["a", "c"] and res["failed"] == [("bad", "boom")] and res["not_started"] == []


# ---------------------------------------------------------------------------- start deadline

def test_run_all_starts_no_job_after_the_deadline(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(reproduce, "clock", clock)
    started = []

    def fake_run_main(workdir, *a, **k):
        if reproduce.job_finished((workdir, [])):
            return {}  # as run_main: a finished run is skipped at once
        started.append(workdir)
        clock.advance(10)  # each job takes 10 s
        return {}

    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    finished = str(tmp_path / "finished")  # a finished job counts as done even after the deadline
    write_results([finished])
    jobs = [(str(tmp_path / f"job{i}"), []) for i in range(5)] + [(finished, [])]
    res = reproduce.run_all(jobs, 1, tmp_path / "logs", deadline=clock() + 15)
    assert started == [jobs[0][0], jobs[1][0]]  # started at t=0 and t=10; t=20 is past the deadline
    assert res == {"done": [jobs[0][0], jobs[1][0], finished], "not_started": [j[0] for j in jobs[2:5]],
                   "failed": []}


def test_main_with_a_start_deadline_reports_what_finished(monkeypatch, tmp_path, capsys):
    """Pre-training runs first; once the deadline is reached nothing starts, fine-tuning from an
    unfinished encoder never starts; the reports are written and main returns normally."""
    clock = FakeClock()
    monkeypatch.setattr(reproduce, "clock", clock)
    started = []

    def fake_run_main(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        if reproduce.job_finished((workdir, flags, run_dirs)):
            return {}  # as run_main: a finished run is skipped at once
        started.append(workdir)
        clock.advance(100)
        write_results(run_dirs or [workdir])
        return {}

    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--methods", "scratch", "pretrain_mask30", "pretrain_pos10", "--tasks", "jarvis:ehull",
            "--seeds", "0", "1", "--runs", str(runs), "--out", str(out), "--start-deadline", "150"]
    summary = reproduce.main(argv)
    ft = runs / "finetune" / "jarvis_ehull"
    # t=0: pretrain_mask30, t=100: pretrain_pos10; t=200: past the deadline, nothing else starts
    assert started == [str(runs / "pretrain" / "pretrain_mask30"), str(runs / "pretrain" / "pretrain_pos10")]
    assert summary["not_started"] == {"start deadline": [str(ft / m / f"seed{s}") for m in (
        "scratch", "pretrain_mask30", "pretrain_pos10") for s in (0, 1)]}
    assert "not started (start deadline): " + str(ft / "scratch" / "seed0") in capsys.readouterr().out
    assert "Not started (start deadline): 6 job(s)" in (out / "reproduce.md").read_text()
    assert json.loads((out / "reproduce.json").read_text())["tasks"]["jarvis:ehull"]["scratch"]["n_seeds_done"] == 0

    # next call, no deadline, pretrain_pos10 fails (as if its first run had not finished)
    (runs / "pretrain" / "pretrain_pos10" / "results.json").unlink()
    started.clear()

    def failing_pretrain(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        if workdir.endswith("pretrain_pos10"):
            raise RuntimeError("pre-training diverged")
        return fake_run_main(workdir, flags, env, log_dir, module, run_dirs)

    monkeypatch.setattr(reproduce, "run_main", failing_pretrain)
    with pytest.raises(reproduce.RunsFailed) as exc:
        reproduce.main(argv[:-2])
    assert "pretrain_pos10" in str(exc.value)
    # fine-tuning from pos10 never started, the rest ran; the report was written all the same
    assert sorted(started) == sorted(str(ft / m / f"seed{s}") for m in ("scratch", "pretrain_mask30") for s in (0, 1))
    summary = exc.value.summary
    assert summary["not_started"] == {"pre-training not finished: pretrain_pos10": [
        str(ft / "pretrain_pos10" / f"seed{s}") for s in (0, 1)]}
    assert summary["tasks"]["jarvis:ehull"]["pretrain_mask30"]["n_seeds_done"] == 2
    assert "Failed: 1 job(s)" in (out / "reproduce.md").read_text()


def test_parity_forwards_the_start_deadline_and_order(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(reproduce, "clock", clock)
    started = []

    def fake_run_main(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        started.append((workdir, module))
        clock.advance(100)
        write_results(run_dirs or [workdir])
        return {}

    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    runs, out = tmp_path / "runs", tmp_path / "out"
    parity.main(["--tasks", "jarvis:mbj_bandgap", "mp:band_gap", "mp:G_VRH", "--seeds", "0", "--runs", str(runs),
                 "--out", str(out), "--start-deadline", "150", "--order", "longest-first", "--together", "3"])
    base = runs / "finetune_reference"
    # longest first: MP band gap (4537 records × 100 epochs) and G_VRH (899 × 500) start, then the deadline
    assert started == [(str(base / "mp_band_gap" / "scratch"), "dpf_jax.train.multirun"),
                       (str(base / "mp_G_VRH" / "scratch"), "dpf_jax.train.multirun")]
    text = (out / "parity.md").read_text()
    assert "| mp:band_gap |" in text and "| jarvis:mbj_bandgap |" in text
    assert "Not started (start deadline): 1 job(s)" in text
    assert "Not started (start deadline): 1 job(s): " + str(base / "jarvis_mbj_bandgap" / "scratch") in (
        out / "parity_runs.md").read_text()


# ------------------------------------------------------------------------------ job ordering

def test_split_sizes_are_the_official_training_splits():
    jarvis = reproduce.split_sizes(reproduce.DATA_FILES["jarvis"])
    mp = reproduce.split_sizes(reproduce.DATA_FILES["mp"])
    # the train column of results/reference_matformer.md
    assert jarvis["formation_energy_peratom"] == 739 and jarvis["ehull"] == 752 and jarvis["mbj_bandgap"] == 452
    assert mp["band_gap"] == 4537 and mp["G_VRH"] == 899
    assert reproduce.split_sizes("data/no_such_file.jsonl.gz") == {}


def test_longest_first_sorts_by_epochs_times_records_times_runs():
    args = reproduce.parse_args(["--recipe", "reference", "--methods", "scratch", "--seeds", "0"])
    tasks = ["jarvis:mbj_bandgap", "jarvis:formation_energy_peratom", "mp:G_VRH", "mp:band_gap"]
    jobs = [(t, reproduce.finetune_run(t, "scratch", 0, args)) for t in tasks]
    costs = {t: reproduce.job_cost(t, job) for t, job in jobs}
    assert costs == {"jarvis:mbj_bandgap": 500 * 452, "jarvis:formation_energy_peratom": 500 * 739,
                     "mp:G_VRH": 500 * 899, "mp:band_gap": 100 * 4537}
    assert [t for t, _ in reproduce.order_jobs(jobs, "given")] == tasks
    assert [t for t, _ in reproduce.order_jobs(jobs, "longest-first")] == [
        "mp:band_gap", "mp:G_VRH", "jarvis:formation_energy_peratom", "jarvis:mbj_bandgap"]

    # a group counts its runs; --finetune-epochs and --quick's max_records are honoured; an
    # unknown task costs 0 and goes last
    group = ("jarvis:mbj_bandgap", reproduce.finetune_group("jarvis:mbj_bandgap", ["scratch"], [0, 1, 2], args))
    assert reproduce.job_cost(*group) == 3 * 500 * 452
    unknown = ("jarvis:no_such_task", reproduce.finetune_run("jarvis:no_such_task", "scratch", 0, args))
    assert reproduce.job_cost(*unknown) == 0
    ordered = reproduce.order_jobs([unknown] + jobs + [group], "longest-first")
    assert ordered[0] == group and ordered[-1] == unknown
    quick = reproduce.parse_args(["--quick", "--finetune-epochs", "7"])
    assert reproduce.job_cost("mp:band_gap", reproduce.finetune_run("mp:band_gap", "scratch", 0, quick)) == 7 * 160


def test_finished_encoders_are_not_pretrained_again_inside_together_groups(monkeypatch, tmp_path):
    """A continued sweep on a fresh machine: mask50's fine-tuning runs are all committed but its
    pre-training run is gone; it shares a --together group with an unfinished '+rebuild' method.
    Only the encoder that still has runs to do is pre-trained, and the group is not blocked."""
    started = []
    fake_run_main = recording_run_main(started)
    monkeypatch.setattr(reproduce, "run_main", fake_run_main)
    runs, out = tmp_path / "runs", tmp_path / "out"
    ft = runs / "finetune" / "jarvis_ehull"
    write_results([ft / "pretrain_mask50" / f"seed{s}" for s in (0, 1)])
    stamps = {p: p.stat().st_mtime_ns for p in ft.rglob("results.json")}
    argv = ["--methods", "pretrain_mask50", "pretrain_pos10+rebuild", "scratch", "--tasks", "jarvis:ehull",
            "--seeds", "0", "1", "--together", "4", "--runs", str(runs), "--out", str(out)]
    summary = reproduce.main(argv)
    group = f"{ft}/pretrain_mask50+pretrain_pos10+rebuild"  # 2 methods x 2 seeds per program
    assert started == [str(runs / "pretrain" / "pretrain_pos10+rebuild"), group, f"{ft}/scratch"]
    assert "not_started" not in summary
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # the committed runs are untouched
    assert all(summary["tasks"]["jarvis:ehull"][m]["n_seeds_done"] == 2 for m in reproduce.parse_args(argv).methods)
    report = (out / "reproduce.md").read_text()
    assert "* pretrain_mask50: run files not here" in report and "* pretrain_pos10+rebuild: " in report

    # were mask50's pre-training still needed (a run missing) and failing, only its group would wait
    (ft / "pretrain_mask50" / "seed1" / "results.json").unlink()
    started.clear()

    def failing_mask50(workdir, flags, env, log_dir, module="dpf_jax.main", run_dirs=None):
        if workdir.endswith("pretrain_mask50"):
            started.append(workdir)
            raise RuntimeError("pre-training diverged")
        return fake_run_main(workdir, flags, env, log_dir, module, run_dirs)

    monkeypatch.setattr(reproduce, "run_main", failing_mask50)
    with pytest.raises(reproduce.RunsFailed) as exc:
        reproduce.main(argv)
    assert started == [str(runs / "pretrain" / "pretrain_mask50")]
    assert exc.value.summary["not_started"] == {"pre-training not finished: pretrain_mask50": [group]}


def test_encoder_without_checkpoint_is_pretrained_again(monkeypatch, tmp_path, capsys):
    """A committed sweep continued on a fresh machine: pos30's pre-training results.json is
    committed, its checkpoint is not. Fine-tuning from it would fail, so it is pre-trained again;
    mask30, whose checkpoint is here, is not."""
    started = []
    monkeypatch.setattr(reproduce, "run_main", recording_run_main(started))
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_results([runs / "pretrain" / "pretrain_pos30", runs / "pretrain" / "pretrain_mask30"])
    shutil.rmtree(runs / "pretrain" / "pretrain_pos30" / "checkpoints")  # results.json alone
    assert not reproduce.has_checkpoint(runs / "pretrain" / "pretrain_pos30")
    assert reproduce.has_checkpoint(runs / "pretrain" / "pretrain_mask30")
    reproduce.main(["--methods", "pretrain_mask30", "pretrain_pos30", "--tasks", "jarvis:ehull", "--seeds", "0",
                    "--runs", str(runs), "--out", str(out)])
    ft = runs / "finetune" / "jarvis_ehull"
    assert started == [str(runs / "pretrain" / "pretrain_pos30"),
                       str(ft / "pretrain_mask30" / "seed0"), str(ft / "pretrain_pos30" / "seed0")]
    assert "pre-training again pretrain_pos30: finished before, but the checkpoint is not here" in capsys.readouterr().out
