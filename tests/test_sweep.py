"""Student sweeps over one cache: grids, files, skipping finished runs, parallel jobs, reports."""
import csv
from dataclasses import replace
import json
import os

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from pld_pipeline.distill import DistillConfig
from pld_pipeline.halving import HalvingRule
from pld_pipeline.launch import Launch, distill_argv
from pld_pipeline.sweep import (expand, load_sweep_file, parse_grid, pending_commands, plan_sweep, report, run_name,
                                run_sweep)
from pld_pipeline_cli.app import app


def base(tiny_data, cache):
    return {"data": tiny_data["train"].pattern, "val_data": tiny_data["val"].pattern, "cache": cache,
            "student": "cifar_resnet8", "epochs": 1, "batch_size": 8, "workers": 0, "device": "cpu"}


def test_grids_are_typed_like_the_distill_settings():
    grid = parse_grid(["loss=pld,kd lr=1e-3,3e-3", "seed=0,1 temperature=1,2 top-k=none,3"])
    assert grid == {"loss": ["pld", "kd"], "lr": [0.001, 0.003], "seed": [0, 1], "temperature": [1.0, 2.0],
                    "top_k": [None, 3]}
    assert len(expand(grid, [])) == 32
    assert run_name({"seed": 1, "loss": "pld", "lr": 0.001}) == "loss=pld__lr=0.001__seed=1"
    with pytest.raises(ValueError, match="Unknown sweep setting 'lrr'"):
        parse_grid(["lrr=1"])
    with pytest.raises(ValueError, match="seed='x' must be a int"):
        parse_grid(["seed=x"])
    with pytest.raises(ValueError, match="must look like key=v1,v2"):
        parse_grid(["loss"])


def test_sweep_files_in_toml_and_yaml(tmp_path):
    (tmp_path / "s.toml").write_text('[base]\nepochs = 3\n[grid]\nloss = ["pld", "kd"]\n[[runs]]\nstudent = "a"\n'
                                     '[[runs]]\nstudent = "b"\n')
    b, g, r = load_sweep_file(str(tmp_path / "s.toml"))
    assert b == {"epochs": 3} and len(expand(g, r)) == 4
    (tmp_path / "s.yaml").write_text("grid:\n  seed: [0, 1, 2]\n")
    assert load_sweep_file(str(tmp_path / "s.yaml"))[1] == {"seed": [0, 1, 2]}
    (tmp_path / "bad.toml").write_text("[grd]\nseed = [0]\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_sweep_file(str(tmp_path / "bad.toml"))


def test_a_sweep_trains_every_configuration_then_skips_finished_runs(tiny_data, cache, tmp_path):
    events = []
    rows = run_sweep(base(tiny_data, cache), parse_grid(["loss=ce,pld seed=0,1"]), [], str(tmp_path / "sw"),
                     progress=events.append)
    assert len(rows) == 4 and all(r["done"] and r["best_val_top1"] is not None for r in rows)
    assert sum(e["event"] == "run_done" for e in events) == 4
    for name in ("loss=ce__seed=0", "loss=pld__seed=1"):
        assert os.path.isfile(tmp_path / "sw" / name / "best.safetensors")
    again = []
    run_sweep(base(tiny_data, cache), parse_grid(["loss=ce,pld seed=0,1"]), [], str(tmp_path / "sw"),
              progress=again.append)
    assert not any(e["event"] == "run_done" for e in again)
    table = (tmp_path / "sw" / "results.md").read_text()
    assert "loss=pld | 2 |" in table and "±" in table  # seeds grouped into mean ± std
    with open(tmp_path / "sw" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "sw" / "results.png").stat().st_size > 1000


def test_report_re_renders_from_run_directories(tiny_data, cache, tmp_path):
    run_sweep(base(tiny_data, cache), parse_grid(["loss=ce"]), [], str(tmp_path / "sw"))
    os.remove(tmp_path / "sw" / "results.md")
    rows = report(str(tmp_path / "sw"))
    assert rows[0]["done"] and (tmp_path / "sw" / "results.md").is_file()
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        report(str(tmp_path))


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs_as_sequential(tiny_data, cache, tmp_path):
    grid = parse_grid(["loss=kd,pld"])
    run_sweep(base(tiny_data, cache), grid, [], str(tmp_path / "seq"), launch=Launch(jobs=1))
    events = []
    run_sweep(base(tiny_data, cache), grid, [], str(tmp_path / "par"), launch=Launch(jobs=2), progress=events.append)
    # runs in other processes report each finished epoch too (their metrics.jsonl is the channel), once each
    assert sorted((e["name"], e["epoch"], e["epochs"], e["eta_s"]) for e in events if e["event"] == "run_epoch") == [
        ("loss=kd", 1, 1, 0.0), ("loss=pld", 1, 1, 0.0)]
    weights = {}
    for name in ("loss=kd", "loss=pld"):
        a, b = (_metrics(tmp_path / how / name) for how in ("seq", "par"))
        assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-6, abs=0)
        weights[name] = [load_file(str(tmp_path / how / name / "last.safetensors")) for how in ("seq", "par")]
        seq, par = weights[name]
        assert max(float((seq[k].float() - par[k].float()).abs().max()) for k in seq) < 1e-5, name
    # ... while the two configurations, trained differently, differ far beyond that tolerance: a parallel sweep
    # that trained one configuration twice, or wrote one run's weights into the other's folder, fails above.
    kd, pld = weights["loss=kd"][0], weights["loss=pld"][0]
    assert max(float((kd[k].float() - pld[k].float()).abs().max()) for k in kd) > 1e-3
    assert _metrics(tmp_path / "seq" / "loss=kd")[0]["train_loss"] != \
        pytest.approx(_metrics(tmp_path / "seq" / "loss=pld")[0]["train_loss"], rel=1e-3)


def test_parallel_jobs_fork_from_a_clean_server_and_their_loaders_fork(monkeypatch):
    """Jobs start from a forkserver (not forked from the sweep process and its threads, nor each a spawned
    interpreter importing torch again), and a job's DataLoader workers fork (a job that kept its pool's start
    method started a fresh interpreter for every loader worker of every epoch: 4.2x slower, docs/results.md)."""
    from concurrent.futures import Future

    import forked
    from pld_pipeline import launch
    pool = {}

    class Recorder:  # the pool as _in_pool builds it; its jobs are run below, in a process like theirs
        def __init__(self, max_workers, mp_context, initializer, initargs):
            pool.update(jobs=max_workers, method=mp_context.get_start_method(), init=initializer, initargs=initargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, settings):
            done = Future()
            done.set_result(None)
            return done
    monkeypatch.setattr(launch, "ProcessPoolExecutor", Recorder)
    finished = []
    launch._in_pool({"a": {"device": "cpu"}, "b": {"device": "cpu"}}, 2, finished.append)
    assert pool["method"] == "forkserver" and pool["jobs"] == 2
    assert sorted(e["name"] for e in finished) == ["a", "b"]

    def job():
        import multiprocessing

        import torch
        multiprocessing.set_start_method("forkserver", force=True)  # what a job inherits from its pool
        pool["init"](*pool["initargs"])
        print(multiprocessing.get_start_method(), torch.get_num_threads())
    run = forked.Forked(["job"], target=job, stdout=forked.PIPE, stderr=forked.PIPE)
    out, err = run.communicate(timeout=300)
    assert out.split() == ["fork", str(pool["initargs"][0])], err  # Linux: fork is the platform's default


def test_sweep_command_line(tiny_data, cache, tmp_path):
    result = CliRunner().invoke(app, [
        "sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--student", "cifar_resnet8",
        "--set", "epochs=1", "--set", "batch_size=8", "--set", "workers=0", "--set", "device=cpu",
        "--grid", "loss=ce,kd", "--out", str(tmp_path / "sw"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert " kd " in result.output and " ce " in result.output  # the printed table has one row per run
    assert (tmp_path / "sw" / "loss=kd" / "summary.json").is_file()
    again = CliRunner().invoke(app, ["report", str(tmp_path / "sw")])
    assert again.exit_code == 0 and "results.md" in again.output
    bad = CliRunner().invoke(app, ["sweep", "--grid", "loss=pld", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "needs data, student" in " ".join(bad.output.split())


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_halving_stops_runs_outside_the_top_fraction_at_each_rung(tiny_data, cache, tmp_path):
    """Asynchronous successive halving (Optuna's pruner), checked against its rule from the runs' own metrics:
    at a rung (grace * rf^i epochs) a run stops iff its top-1 is below the rf-th share of the runs there so far."""
    settings = {**base(tiny_data, cache), "epochs": 4, "warmup_epochs": 0}
    grid = parse_grid(["lr=1e-5,3e-3,1e-2,3e-4,1e-3,1e-4"])
    rule = HalvingRule(grace_epochs=1, reduction_factor=2)
    rows = run_sweep(settings, grid, [], str(tmp_path / "sw"), halving=rule)
    by_name = {r["run"]: r for r in rows}
    assert all(r["done"] for r in rows)
    stopped = [r for r in rows if r["stopped_after_epochs"]]
    assert stopped and len(stopped) < len(rows), "halving stopped nothing, or everything"
    seen_at: dict[int, list[float]] = {}  # top-1 of the runs that reached each rung, in the (sequential) run order
    for name in json.load(open(tmp_path / "sw" / "sweep.json"))["names"]:
        metrics, row = _metrics(tmp_path / "sw" / name), by_name[name]
        for rung in (1, 2, 4):
            if rung > len(metrics) or rung == 4:
                break
            value = metrics[rung - 1]["val_top1"]
            competing = sorted(seen_at.setdefault(rung, []) + [value], reverse=True)
            cutoff = competing[max(len(competing) // rule.reduction_factor - 1, 0)]
            seen_at[rung].append(value)
            if value < cutoff:
                assert row["stopped_after_epochs"] == rung and len(metrics) == rung, (name, rung, value, competing)
                assert f"after {rung} epoch(s)" in row["stop_reason"] and "top 1/2" in row["stop_reason"]
                break
        else:
            assert not row["stopped_after_epochs"] and len(metrics) == 4, name
    with open(tmp_path / "sw" / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["run"] for r in csv_rows if r["stop_reason"]} == {r["run"] for r in stopped}
    assert "stopped after" in (tmp_path / "sw" / "results.md").read_text()
    again = []
    run_sweep(settings, grid, [], str(tmp_path / "sw"), halving=rule, progress=again.append)
    assert not any(e["event"] == "run_done" for e in again)  # a stopped run is finished, not pending


@pytest.mark.slow
def test_an_interrupted_halving_run_resumes_its_own_trial(tiny_data, cache, tmp_path):
    import optuna

    from pld_pipeline.distill import distill
    from pld_pipeline.halving import TRIAL_FILE, open_study
    settings, rule, out = {**base(tiny_data, cache), "epochs": 3}, HalvingRule(1, 2), str(tmp_path / "sw")
    todo = plan_sweep(settings, parse_grid(["loss=ce,kd"]), [], out, rule)

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 1:
            raise KeyboardInterrupt  # the run dies after its second epoch (state saved)
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(**todo["loss=ce"]), progress=crash)
    trial_id = json.load(open(os.path.join(out, "loss=ce", TRIAL_FILE)))["trial_id"]
    rows = run_sweep(settings, parse_grid(["loss=ce,kd"]), [], out, halving=rule)
    assert json.load(open(os.path.join(out, "loss=ce", TRIAL_FILE)))["trial_id"] == trial_id
    summary = json.load(open(os.path.join(out, "loss=ce", "summary.json")))
    assert summary["resumed_from_epoch"] == 2 and len(_metrics(os.path.join(out, "loss=ce"))) == 3
    trials = open_study(out, rule).get_trials()
    assert len(trials) == 2 and sorted(trials[0].intermediate_values) == [1, 2, 3]  # one trial per run, no orphan
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and all(r["done"] for r in rows)


def test_printed_commands_are_the_sweep_runs(tiny_data, cache, tmp_path, monkeypatch):
    """Each printed `pld distill` line, parsed by the real command line, makes exactly the run the sweep would."""
    import shlex

    import pld_pipeline.distill
    settings = {**base(tiny_data, cache), "teacher": "r14", "amp": False, "recipe": {"name": "cifar", "size": 16},
                "clip_grad": 1.0, "pretrained": False, "deterministic": True, "log": "tensorboard"}
    out = str(tmp_path / "sw")
    lines = pending_commands(settings, parse_grid(["loss=pld,kd lr=1e-3"]), [], out, HalvingRule(1, 3))
    expected = plan_sweep(settings, parse_grid(["loss=pld,kd lr=1e-3"]), [], out)
    assert len(lines) == 2 and all(line.startswith("pld distill ") and "--sweep " in line for line in lines)
    seen = []
    monkeypatch.setattr(pld_pipeline.distill, "distill", lambda cfg, progress=None: seen.append(cfg) or {
        "best_val_top1": None, "loss": cfg.loss, "student": cfg.student, "train_seconds": 0, "seconds": 0, "out": cfg.out})
    for line in lines:
        result = CliRunner().invoke(app, shlex.split(line)[1:] + ["--quiet"])
        assert result.exit_code == 0, result.output
    from pld_pipeline.distill import recipe_of
    assert [recipe_of(c.recipe) for c in seen] == [recipe_of(s["recipe"]) for s in expected.values()]
    assert [replace(c, recipe={}) for c in seen] == [DistillConfig(**{**s, "recipe": {}}) for s in expected.values()]
    with pytest.raises(ValueError, match="no `pld distill` option"):
        distill_argv({"data": "d", "out": "o", "student": "s", "recipe": {"name": "imagenet", "scale": [0.5, 1]}})


def test_a_started_runs_printed_command_resumes_it(tiny_data, cache, tmp_path):
    """After a preempted task (a run folder with a saved state), the reprinted line carries --resume, and running
    it continues the run instead of failing "already holds a run"; a run not started yet prints without it."""
    import shlex

    from pld_pipeline.distill import distill
    settings = {**base(tiny_data, cache), "data": tiny_data["train"].shards[-1], "epochs": 2}
    out = str(tmp_path / "sw")
    todo = plan_sweep(settings, parse_grid(["loss=ce,kd"]), [], out)

    def preempted(event):
        if event["event"] == "epoch_end" and event["epoch"] == 0:
            raise KeyboardInterrupt  # after the first epoch's state is saved
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(**todo["loss=ce"]), progress=preempted)
    lines = dict(zip(todo, pending_commands(settings, parse_grid(["loss=ce,kd"]), [], out)))
    assert "--resume" in shlex.split(lines["loss=ce"]) and "--resume" not in shlex.split(lines["loss=kd"])
    ran = CliRunner().invoke(app, shlex.split(lines["loss=ce"])[1:] + ["--quiet"])
    assert ran.exit_code == 0, ran.output
    summary = json.load(open(os.path.join(out, "loss=ce", "summary.json")))
    assert summary["resumed_from_epoch"] == 1 and len(_metrics(os.path.join(out, "loss=ce"))) == 2


@pytest.mark.slow
def test_a_printed_command_run_elsewhere_is_gathered_by_report(tiny_data, cache, tmp_path):
    import shlex
    out = str(tmp_path / "sw")
    result = CliRunner().invoke(app, ["sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--student",
                                      "cifar_resnet8", "--val-data", tiny_data["val"].pattern, "--set", "epochs=1",
                                      "--set", "batch_size=8", "--set", "workers=0", "--set", "device=cpu",
                                      "--grid", "loss=ce,kd", "--out", out, "--print-commands"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    ran = CliRunner().invoke(app, shlex.split(lines[0])[1:] + ["--quiet"])  # what a SLURM array task would run
    assert ran.exit_code == 0, ran.output
    rows = report(out)
    assert [r["done"] for r in rows] == [True, False]
    again = CliRunner().invoke(app, ["sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--student",
                                     "cifar_resnet8", "--val-data", tiny_data["val"].pattern, "--set", "epochs=1",
                                     "--set", "batch_size=8", "--set", "workers=0", "--set", "device=cpu",
                                     "--grid", "loss=ce,kd", "--out", out, "--print-commands"])
    assert again.output.strip().splitlines() == lines[1:]  # only the pending run is printed again


def test_a_run_of_several_processes_is_its_own_distill_line_under_torchrun(tiny_data, cache, tmp_path, monkeypatch):
    """What a Ray task does with --procs-per-run 2: the run's own `pld distill` line under torchrun, its CPUs split
    between the processes, a failure named in one line. (That line's DDP run is tested by
    test_class_map_subset's torchrun test.)"""
    import subprocess

    from pld_pipeline import launch
    settings = {**base(tiny_data, cache), "epochs": 2, "batch_size": 4, "out": str(tmp_path / "ddp")}
    calls, exit_codes = [], [0, 1]

    def fake_run(cmd, env, **kwargs):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, exit_codes[len(calls) - 1], "", "boom: out of memory\n")

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.run_task(settings, procs=2, cpus=4) == settings["out"]
    cmd, env = calls[0]
    torchrun = cmd.index("torch.distributed.run")
    assert cmd[torchrun - 1:torchrun + 3] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[torchrun + 3:torchrun + 6] == ["-m", "pld_pipeline", "distill"] and cmd[-1] == "--quiet"
    assert cmd[torchrun + 6:-1] == launch.distill_argv({**settings, "resume": False})
    assert env["OMP_NUM_THREADS"] == "2"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "last_state.pt").write_bytes(b"")  # a killed attempt's state: the retry resumes
    with pytest.raises(RuntimeError, match=r"torchrun run .*ddp failed \(exit 1\): boom: out of memory"):
        launch.run_task(settings, procs=2, cpus=4)
    assert "--resume" in calls[1][0]


@pytest.mark.parametrize("option, package, extra", [
    (["--scheduler", "halving", "--set", "val_data=VAL"], "optuna", "halving"),
    (["--launcher", "ray"], "ray", "ray"),
    (["--log", "mlflow"], "mlflow", "track"),
])
def test_a_missing_optional_package_is_named_with_its_extra_before_anything_is_written(
        tiny_data, cache, tmp_path, monkeypatch, option, package, extra):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == package else real(name, *a))
    option = [o.replace("VAL", tiny_data["val"].pattern) for o in option]
    result = CliRunner().invoke(app, [
        "sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--student", "cifar_resnet8",
        "--set", "epochs=1", "--set", "workers=0", "--grid", "seed=0,1", "--out", str(tmp_path / "sw"),
        "--quiet", *option])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f'needs the optional package {package}' in text, text
    assert f'pip install "pld-pipeline[{extra}]"' in text and "internal error" not in text
    assert not (tmp_path / "sw").exists()


def _finished_sweep(tmp_path, runs):
    """A sweep folder as `pld sweep` leaves it: name -> (overrides, summary)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"names": {n: o for n, (o, _) in runs.items()}}))
    for name, (_, summary) in runs.items():
        (sweep / name).mkdir()
        (sweep / name / "summary.json").write_text(json.dumps(summary))
        (sweep / name / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return sweep


def test_the_report_table_reads_right(tmp_path):
    """No Python None for a setting a run leaves unset, no halving columns without halving, a best-run line."""
    sweep = _finished_sweep(tmp_path, {
        "loss=ce": ({"loss": "ce"}, {"best_val_top1": 61.5, "last_val_top1": 60.25, "train_seconds": 3.0}),
        "loss=kd,alpha=0.5": ({"loss": "kd", "alpha": 0.5},
                              {"best_val_top1": 64.0, "last_val_top1": 63.0, "train_seconds": 3.0}),
        "loss=kd,alpha=0.9": ({"loss": "kd", "alpha": 0.9},
                              {"best_val_top1": 70.0, "last_val_top1": 20.0, "train_seconds": 1.0,
                               "stopped_after_epochs": 1, "stop_reason": "halving: ..."})})
    result = CliRunner().invoke(app, ["report", str(sweep)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "None" not in result.output and "stop_reason" not in result.output
    assert "stopped after 1 epochs (halving)" in result.output
    # the stopped run scored higher after one epoch, but did not train to the end: not the best
    assert "best run: loss=kd,alpha=0.5, best val top-1 64.00%" in result.output
    assert "best run: loss=kd,alpha=0.5" in (sweep / "results.md").read_text()


def test_the_sweep_plot_starts_at_zero_and_marks_runs_stopped_by_halving(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    _finished_sweep(tmp_path, {
        "lr=1": ({"lr": 1}, {"best_val_top1": 19.0, "last_val_top1": 19.0, "train_seconds": 1.0}),
        "lr=2": ({"lr": 2}, {"best_val_top1": 17.0, "last_val_top1": 17.0, "train_seconds": 1.0,
                             "stopped_after_epochs": 1, "stop_reason": "halving"})})
    report(str(tmp_path / "sweep"))
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] == 0 and "best val top-1" in ax.get_title() and "stopped early" in ax.get_title()
    finished, stopped = ax.patches[:2]
    assert stopped.get_hatch() == "//" and not finished.get_hatch()
    assert not ax.containers[1:]  # one seed each: no error bars


def test_a_sweep_reports_every_epoch_of_every_run_off_a_terminal(tiny_data, cache, tmp_path):
    """Off a terminal: one line per finished epoch of each run (epoch, loss, val top-1, ETA), not silence until
    each run ends. (Runs in parallel processes and on Ray report the same way: test_parallel_jobs_... and
    test_ray check their epochs are reported.)"""
    result = CliRunner().invoke(app, [
        "sweep", "--data", tiny_data["train"].pattern, "--cache", cache,
        "--val-data", tiny_data["val"].pattern,
        "--student", "cifar_resnet8", "--set", "epochs=2", "--set", "batch_size=8", "--set", "workers=0",
        "--set", "device=cpu", "--grid", "loss=ce,kd", "--out", str(tmp_path / "sw")])
    assert result.exit_code == 0, result.output
    for run in ("loss=ce", "loss=kd"):
        lines = [line for line in result.output.splitlines() if line.startswith(f"{run}: epoch ")]
        assert [line.split()[2] for line in lines] == ["1/2", "2/2"], result.output
        assert "loss " in lines[0] and "val top-1 " in lines[0] and "ETA 0:00:" in lines[0]
        assert lines[1].endswith("ETA 0:00:00")


def test_the_sweep_watch_reports_only_what_resumed_runs_add_and_skips_broken_files(tmp_path):
    from pld_pipeline.sweep_watch import SweepWatch
    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 2.0, "val_top1": 10.0, "epoch_seconds": 4}\n')
    events = []
    watch = SweepWatch(str(tmp_path), {"a": {"epochs": 3, "out": str(run)}}, events.append)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 2.0, "val_top1": 10.0, "epoch_seconds": 4}\n'
                                       '{"epoch": 1, "train_loss": 1.0, "val_top1": 20.0, "epoch_seconds": 2}\n')
    watch.poll()
    watch.poll()
    assert [(e["epoch"], e["val_top1"], e["eta_s"]) for e in events] == [(2, 20.0, 3.0)]
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_lo')  # half-written by a stranger: nothing, no error
    watch.poll()
    assert len(events) == 1


def test_a_sweep_in_a_terminal_shows_a_live_line_per_run(tiny_data, cache, tmp_path):
    from test_progress import run_in_terminal
    text, code = run_in_terminal([
        "sweep", "--data",
        tiny_data["train"].pattern, "--cache", cache, "--val-data", tiny_data["val"].pattern, "--student",
        "cifar_resnet8", "--set", "epochs=2", "--set", "batch_size=8", "--set", "workers=0", "--set", "device=cpu",
        "--grid", "loss=ce,kd", "--out", str(tmp_path / "sw")], columns=120, timeout=300)
    assert code == 0, text
    for run in ("loss=ce", "loss=kd"):
        assert any(line.startswith(run) and "epoch 2/2" in line and "val top-1" in line
                   for line in text.splitlines()), text


def test_a_mistyped_loss_in_a_sweep_grid_is_refused_before_the_sweep_folder_is_written(tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--data", tiny_data["train"].pattern, "--student", "cifar_resnet8",
                                      "--grid", "loss=ce,pdl", "--out", str(tmp_path / "sw"), "--quiet"])
    assert result.exit_code == 2 and "Unsupported loss 'pdl' (did you mean 'pld'?)" in " ".join(result.output.split())
    assert not (tmp_path / "sw").exists()
