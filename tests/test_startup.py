"""The light commands (`pld --help`, `inspect`, `verify`, `report`) need zarr and numpy only: they must never
import torch (about 830 MB of RSS and seconds per start). Checked in a fresh interpreter, not by timing."""
import json
import subprocess
import sys
import textwrap

from pld_pipeline.loss_names import BUILTIN_LOSSES
from pld_pipeline.losses import LOSSES

HEAVY = ("torch", "torchvision", "timm", "webdataset")

PROBE = textwrap.dedent("""
    import sys
    from typer.testing import CliRunner
    from pld_pipeline_cli.app import app
    runner = CliRunner()
    for args in {commands!r}:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        heavy = [m for m in {heavy!r} if m in sys.modules]
        assert not heavy, f"pld {{' '.join(args[:1])}} imported {{heavy}}"
    print("light")
""")


def _sweep_folder(tmp_path):
    """A finished one-run sweep folder, as `pld sweep` leaves it (what `pld report` reads)."""
    sweep = tmp_path / "sweep"
    (sweep / "loss=ce").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"names": {"loss=ce": {"loss": "ce"}}}))
    (sweep / "loss=ce" / "summary.json").write_text(json.dumps({"best_val_top1": 61.5, "last_val_top1": 60.25,
                                                                "train_seconds": 3.0}))
    (sweep / "loss=ce" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return sweep


def test_light_commands_do_not_import_torch(cache, tmp_path):
    commands = [["--help"], ["inspect", cache], ["inspect", cache, "--json"], ["verify", cache],
                ["report", str(_sweep_folder(tmp_path))]]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(commands=commands, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("light"), proc.stderr[-3000:]


def test_torch_free_loss_descriptions_match_the_registered_losses():
    """The help text is built from loss_names.BUILTIN_LOSSES: every registered built-in must be there, alike."""
    assert list(BUILTIN_LOSSES) == [n for n, e in LOSSES.items() if e.fn.__module__ == "pld_pipeline.losses"]
    for name, info in BUILTIN_LOSSES.items():
        e = LOSSES[name]
        assert (info.needs_teacher, info.temperature, info.params) == (e.needs_teacher, e.temperature, e.params)
