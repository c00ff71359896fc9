"""Mistakes that need no torch to see are refused before torch is imported: a typo'd loss, a pattern that matches no
file, a teacher id or temperature the cache lacks, a malformed digest. Checked in a fresh interpreter (torch must
not be in sys.modules after the refusal), not by timing; benchmarks/startup_bench.py times them against --help."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pld_pipeline import options
from pld_pipeline.views import RECIPES

HEAVY = ("torch", "torchvision", "timm", "webdataset")

PROBE = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from pld_pipeline_cli.app import app
    runner = CliRunner()
    results = []
    for args in json.loads(sys.argv[1]):
        result = runner.invoke(app, args)
        results.append({"code": result.exit_code, "output": " ".join(result.output.split()),
                        "heavy": [m for m in %r if m in sys.modules]})
    print(json.dumps(results))
""" % (HEAVY,))


def refusals(cases):
    """Each case's exit code, one-line output and the heavy modules imported, from one fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([[str(a) for a in args] for args, _ in cases])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check(cases):
    for (args, message), got in zip(cases, refusals(cases)):
        assert got["code"] == 2, (args, got)
        assert message in got["output"], (args, got["output"])
        assert "Traceback" not in got["output"] and got["output"].count("error:") == 1, (args, got["output"])
        assert not got["heavy"], f"{args[:1]} imported {got['heavy']} before refusing"


def test_distill_mistakes_are_refused_before_torch_is_imported(tiny_data, cache, tmp_path):
    train, val = tiny_data["train"].pattern, tiny_data["val"].pattern
    first = tiny_data["train"].shards[0]
    base = ["distill", "--student", "cifar_resnet8", "--out", tmp_path / "run"]
    bad_map = tmp_path / "map.json"
    bad_map.write_text("[0, 0]")
    folder = os.path.dirname(first)
    _check([
        (base + ["--data", train, "--cache", cache, "--loss", "pdl"], "Unsupported loss 'pdl' (did you mean 'pld'?)"),
        (base + ["--data", train, "--loss", "kd"], "--loss kd needs --cache"),
        (base + ["--data", os.path.join(folder, "nope-{000000..000002}.tar"), "--cache", cache],
         "matches no file"),
        (base + ["--data", os.path.join(folder, "train-{000000..000005}.tar"), "--cache", cache],
         "3 of its 6 shards do not exist"),
        (base + ["--data", train, "--cache", cache, "--val-data", tmp_path / "v.tar"], "--val-data"),
        (base + ["--data", train, "--cache", cache, "--teacher", "r41"],
         "Teacher 'r41' is not in " + cache + " (did you mean 'r14'?)"),
        (base + ["--data", train, "--cache", cache, "--temperature", "4"],
         "Temperature 4 is not in teacher 'r14''s cached grid (1, 2)"),
        (base + ["--data", train, "--cache", cache, "--loss", "kd", "--temperature", "-1"],
         "--temperature must be positive"),
        (base + ["--data", val, "--cache", cache], "is not one the cache " + cache + " covers"),
        (base + ["--data", train, "--cache", cache, "--expect-digest", "sha256:abc"], "is not a cache digest"),
        (base + ["--data", train, "--cache", cache, "--class-map", bad_map], "teacher class 0 is claimed by"),
        (base + ["--data", train, "--cache", cache, "--num-classes", "5"], "differs from the cache's 10 classes"),
        (base + ["--data", train, "--cache", tmp_path / "nocache.zarr"], "No cache at"),
        (["distill", "--student", "no_such_pkg.models:net", "--out", tmp_path / "r", "--data", train, "--loss", "ce"],
         "no module 'no_such_pkg.models'"),
        (["distill", "--student", "resnt18", "--out", tmp_path / "r", "--data", train, "--loss", "ce"],
         "--student 'resnt18' is not a timm model name (did you mean 'resnet18'"),
    ])


def test_cache_teacher_mistakes_are_refused_before_torch_is_imported(tiny_data, tmp_path):
    train = tiny_data["train"].pattern
    base = ["cache-teacher", "--out", tmp_path / "c.zarr", "--teacher", "cifar_resnet8"]
    _check([
        (base + ["--data", train, "--temperatures", "1,0"], "--temperatures must be positive numbers"),
        (base + ["--data", tmp_path / "none-{0..3}.tar"], "matches no file"),
        (base + ["--data", train, "--teacher-checkpoint", tmp_path / "t.pth"], "does not exist"),
        (base + ["--data", train, "--recipe", "cifr"], "Unsupported --recipe 'cifr' (did you mean 'cifar'?)"),
        (base + ["--data", train, "--top-k", "0"], "--top-k must be >= 1"),
        (["cache-teacher", "--out", tmp_path / "c.zarr", "--teacher", "resnet56", "--data", train],
         "--teacher 'resnet56' is not a timm model name (did you mean 'cifar_resnet56'"),
    ])
    assert not (tmp_path / "c.zarr").exists()


def test_a_renamed_copy_of_a_cached_shard_passes_the_early_check(tiny_data, cache, tmp_path):
    """Shards are matched by content: the cheap check must not refuse a copy the library would accept."""
    copy = tmp_path / "renamed.tar"
    shutil.copy(tiny_data["train"].shards[0], copy)
    meta = options.cache_root(cache)
    options.check_shards_cached(meta, cache, [str(copy)])
    (tmp_path / "other.tar").write_bytes(b"x" * 100)
    with pytest.raises(options.OptionError, match="is not one the cache"):
        options.check_shards_cached(meta, cache, [str(tmp_path / "other.tar")])


def test_a_hostile_cache_root_is_left_to_the_library(tmp_path):
    """The root document is a stranger's: anything but the expected shape is not interpreted here."""
    for doc in ['{"attributes": {"pld_cache": {"teachers": []}}}', "[1]", "not json", '{"attributes": 3}']:
        (tmp_path / "zarr.json").write_text(doc)
        assert options.cache_root(str(tmp_path)) is None
    (tmp_path / "zarr.json").write_text(json.dumps({"attributes": {"pld_cache": {
        "teachers": {"t": {"temperatures": ["x", 2]}}, "shards": "not a list"}}}))
    meta = options.cache_root(str(tmp_path))
    with pytest.raises(options.OptionError, match=r"cached grid \(2\)"):
        options.check_cached_teachers(meta, str(tmp_path), "t", 1.0)


def test_the_torch_free_model_names_are_timms_registry():
    """The names read from the sources are exactly what timm (with this project's models) registers, deprecated
    aliases included, so a name timm accepts is never refused early."""
    import timm

    from pld_pipeline import models  # noqa: F401  registers the CIFAR ResNets
    registry = set(timm.list_models()) | set(timm.models.get_deprecated_models())
    assert options.registered_model_names() == registry
    for name in ("resnet50.a1_in1k", "cifar_resnet56", "convnext_tiny_in22ft1k"):
        options.check_model_name(name, "--teacher")


def test_the_torch_free_recipe_names_are_the_view_recipes():
    assert options.RECIPES == RECIPES


def test_a_missing_shard_given_to_the_library_is_a_one_line_data_error(cache, tmp_path):
    """StudentData (the library, past the command line's checks) said a bare `[Errno 2] No such file`."""
    from pld_pipeline.data import DataError
    from pld_pipeline.student_data import StudentData
    with pytest.raises(DataError, match=r"Shard .*missing-0\.tar does not exist; check the --data pattern"):
        StudentData(str(tmp_path / "missing-{0..1}.tar"), cache=cache, batch_size=4, workers=0)


def test_an_unquoted_brace_pattern_expanded_by_the_shell_says_quote_it(tmp_path):
    run = subprocess.run([sys.executable, "-c", "import sys; from pld_pipeline_cli.app import main; main()",
                          "distill", "--student", "cifar_resnet8", "--out", str(tmp_path / "r"), "--data",
                          "s/train-0.tar", "s/train-1.tar", "s/train-2.tar", "--loss", "ce"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    text = " ".join(run.stderr.split())
    assert run.returncode == 2 and "the shell expanded an unquoted brace pattern into 3 words" in text, text
    assert "Quote the pattern" in text and "unexpected extra argument" not in text


def test_a_positional_argument_after_a_pattern_is_not_taken_for_an_expanded_one():
    from pld_pipeline_cli.app import shell_expanded_pattern
    assert shell_expanded_pattern(["sweep", "--data", "s/train-0.tar", "sweep.toml"]) is None
    assert shell_expanded_pattern(["verify", "--data", "a/x-0.tar", "c.zarr", "--audit", "4"]) is None
    assert shell_expanded_pattern(["distill", "--data", "a/x-{0..3}.tar", "--loss", "ce"]) is None
