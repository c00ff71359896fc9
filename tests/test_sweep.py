"""Student sweeps over one cache: grids, files, skipping finished runs, parallel jobs, reports."""
import csv
import json
import os

import pytest
from typer.testing import CliRunner

from pld_pipeline.sweep import expand, load_sweep_file, parse_grid, report, run_name, run_sweep
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
    run_sweep(base(tiny_data, cache), grid, [], str(tmp_path / "seq"), jobs=1)
    run_sweep(base(tiny_data, cache), grid, [], str(tmp_path / "par"), jobs=2)
    for name in ("loss=kd", "loss=pld"):
        a = json.load(open(tmp_path / "seq" / name / "summary.json"))
        b = json.load(open(tmp_path / "par" / name / "summary.json"))
        assert a["last_val_top1"] == b["last_val_top1"]


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
