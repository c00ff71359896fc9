"""The `pld` command line: the demo, make-shards from every source, errors in one line, docs in sync."""
import json
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pld_pipeline.data import expand_shards, iter_shard
from pld_pipeline_cli.app import app
from pld_pipeline_cli.reference import render
from conftest import stored_object

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_demo_quick_runs_every_stage_end_to_end(tmp_path):
    result = invoke("demo", "--quick", "--out", tmp_path / "demo", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["run"] for r in results["students"]] == ["student ce", "student kd", "student pld"]
    assert (tmp_path / "demo" / "val_top1.png").stat().st_size > 1000
    assert "pld cache-teacher" in result.output and "pld distill --loss pld" in result.output
    assert "student pld" in result.output
    info = json.loads(invoke("inspect", tmp_path / "demo" / "cache.zarr", "--json").output)
    assert info["shards_done"] == info["shards_total"] and info["teachers"]["cifar_resnet8"]["full"]


def _demo_results(ce, **others):
    """A results.json as the demo writes it, with only what the caption reads: last-epoch top-1 per seed."""
    row = lambda loss, last: {"run": f"student {loss}", "seeds": list(range(len(last))), "last_by_seed": last}  # noqa: E731
    return {"students": [row("ce", ce)] + [row(k, v) for k, v in others.items()], "cache": {}, "online": None}


@pytest.mark.parametrize("kd, pld, verdict", [
    # same-seed gains +0, +1, +2 (mean 1, standard error 0.58: 1.7 SE) and +1, +0.5, +1.5 (mean 1, SE 0.29: 3.5 SE)
    ([90.0, 92.0, 94.0], [90.0, 92.0, 94.0], "Distillation does NOT clearly beat CE here"),
    ([90.0, 92.0, 94.0], [91.0, 91.5, 93.5], "Only some distillation losses beat CE here"),
    ([91.0, 91.5, 93.5], [91.0, 91.5, 93.5], "Distillation from the cache beats CE here"),
], ids=["both within 2 SE", "one beyond", "both beyond"])
def test_the_demo_caption_claims_a_gain_only_beyond_twice_its_standard_error(kd, pld, verdict):
    """docs/results.md, "The demo": arms compared paired by seed, a gain counts only beyond twice the standard error
    of its per-seed differences. Gains between one and two standard errors are no claim."""
    from pld_pipeline.demo import caption
    text = caption(_demo_results([90.0, 91.0, 92.0], kd=kd, pld=pld))
    assert text.startswith(verdict + (" (" if "NOT" in verdict else ":")), text
    assert "mean over 3 seed(s)" in text


def test_the_demo_caption_makes_no_claim_from_one_seed():
    from pld_pipeline.demo import caption
    assert caption(_demo_results([90.0], kd=[99.0], pld=[99.0])).startswith("One seed: no claim either way")


def test_make_shards_from_digits(tmp_path):
    result = invoke("make-shards", "digits", "--out", tmp_path, "--shard-size", 500, "--val-fraction", 0.2)
    assert result.exit_code == 0, result.output
    pattern = re.search(r"train: 1438 samples in 3 shard\(s\): (\S+)", result.output).group(1)
    samples = [s for url in expand_shards(pattern) for s in iter_shard(url)]
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 1438 and not any("." in k for k in keys)
    assert json.loads((tmp_path / "classes.json").read_text())["class_names"][3] == "3"
    assert {int(s["cls"]) for s in samples} == set(range(10))


def test_make_shards_from_cifar_pickles(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(src / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}, f)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    result = invoke("make-shards", "cifar", src, "--out", tmp_path / "out", "--shard-size", 8)
    assert result.exit_code == 0, result.output
    assert "train: 20 samples in 3 shard(s)" in result.output and "val: 4 samples in 1 shard(s)" in result.output
    first = next(iter_shard(str(tmp_path / "out" / "train-000000.tar")))
    assert np.asarray(Image.open(__import__("io").BytesIO(first["png"]))).shape == (32, 32, 3)


def test_make_shards_from_an_image_folder(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"im.{i}.jpg")
    result = invoke("make-shards", "folder", tmp_path / "imgs", "--out", tmp_path / "out", "--val-fraction", 0.34)
    assert result.exit_code == 0, result.output
    samples = [s for split in ("train", "val") for s in iter_shard(str(tmp_path / "out" / f"{split}-000000.tar"))]
    assert len(samples) == 6 and all("jpg" in s for s in samples)
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/cache.zarr"], "error: No cache at /nonexistent/cache.zarr"),
    (["make-shards", "imagenet"], "Unsupported source 'imagenet'"),
    (["make-shards", "cifar", "/nonexistent"], "needs PATH, an existing directory"),
    (["cache-teacher", "--data", "x.tar", "--out", "c", "--teacher", "a", "--teacher", "b",
      "--teacher-checkpoint", "k.pth"], "Got 2 --teacher but 1 --teacher-checkpoint"),
    (["cache-teacher", "--data", "x.tar", "--out", "c", "--teacher", "a", "--temperatures", "1,x"],
     "--temperatures must be comma-separated numbers"),
    (["distill", "--data", "x.tar", "--out", "r", "--student", "cifar_resnet8", "--loss", "kd"],
     "--loss kd needs --cache"),
])
def test_bad_input_ends_in_one_line_naming_the_fix(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert message in text and "Traceback" not in result.output


def test_verify_exits_non_zero_and_lists_bad_units(tmp_path):
    assert invoke("demo", "--quick", "--out", tmp_path / "d", "--device", "cpu", "--quiet").exit_code == 0
    cache = tmp_path / "d" / "cache.zarr"
    ok = invoke("verify", cache)
    assert ok.exit_code == 0 and "unit(s) verified" in ok.output
    os.remove(stored_object(str(cache), "teachers/cifar_resnet8/topk_idx", 0))
    bad = runner.invoke(app, ["verify", str(cache), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert not report["ok"] and any("s000000.teacher.cifar_resnet8" in p for p in report["problems"])


def test_docs_cli_reference_is_in_sync_with_help():
    assert (ROOT / "docs" / "cli.md").read_text().strip() == render().strip(), \
        "docs/cli.md is stale: run `python -m pld_pipeline_cli.reference > docs/cli.md`"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    main_cmd, test_cmd = (line.split("#")[0].strip() for line in block)
    assert "pld_pipeline demo" in main_cmd and "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_every_command_has_help():
    for name in ("cache-teacher", "distill", "inspect", "verify", "demo", "make-shards"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_tables_print_in_full_outside_a_terminal(monkeypatch):
    """CI logs, `| tee`, notebooks: rich would squeeze a table into 80 columns and cut model names short."""
    import io

    from rich.console import Console
    from rich.table import Table

    import pld_pipeline_cli.app as cli
    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, soft_wrap=True))  # a file, not a terminal: 80 columns
    name = "hf-hub:timm/convnext_tiny.in12k_ft_in1k_384"
    t = Table(title="demo")
    for col in ("run", "model", "params", "best val top-1", "last val top-1", "train time per run"):
        t.add_column(col)
    t.add_row("student pld, online teacher", name, "28,589,128", "97.21 ± 0.40%", "96.66 ± 0.52%", "12.3s")
    cli._print_table(t)
    assert name in buf.getvalue() and "student pld, online teacher" in buf.getvalue()


def test_flags_show_no_type_in_help():
    """A flag takes no value: typer printed `<bool>` beside each, as if one were expected."""
    for name in ("cache-teacher", "distill", "inspect", "verify", "demo", "make-shards", "sweep", "report"):
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--help" in result.output and "<bool>" not in result.output, name
    assert "<bool>" not in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "<int>" in runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output  # values keep theirs


def test_command_help_reflows_its_paragraphs_to_the_terminal():
    """typer kept the docstring's own line breaks: at 80 columns sentences broke twice, mid-line."""
    result = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"})
    assert "config.json to --out. Under `torchrun" in result.output


def test_the_demo_plot_zooms_on_the_last_epochs_where_the_losses_differ(tmp_path, monkeypatch):
    """On the full 0-100 scale CE, KD and PLD ending 2 points apart look like one line."""
    import matplotlib.pyplot as plt

    from pld_pipeline.demo import plot_curves
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    curves = {loss: [[(e, 10.0 + 8 * e + bonus) for e in range(1, 10)]] for loss, bonus in
              (("ce", 0.0), ("kd", 1.0), ("pld", 2.0))}
    plot_curves(curves, str(tmp_path / "p.png"), "t")
    full, zoom = figures[0].axes
    low, high = zoom.get_ylim()
    assert 60 < low < 66 and 84 < high < 90 and full.get_ylim()[0] < 20  # the last epochs (66..84) only
    assert [line.get_xdata()[0] for line in zoom.get_lines()] == [7, 7, 7] and (tmp_path / "p.png").stat().st_size
