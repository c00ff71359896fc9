"""Hub teachers and students through timm's own `pretrained=True` path, offline: each test builds a Hugging Face
cache directory in the layout the hub client uses (blobs, snapshot links, refs) and runs `pld` with HF_HOME
pointing at it and HF_HUB_OFFLINE=1, in a process of its own (forked: tests/forked.py has the hub client read
its environment again, as it does at import)."""
import hashlib
import json
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pld_pipeline.cache import Cache
from pld_pipeline.data import iter_shard
from pld_pipeline.losses import TeacherTargets
from pld_pipeline.views import ViewRecipe, decode_image, normalize, replay_view

import forked

pytestmark = pytest.mark.slow
REPO, TAG, REV = "timm/test_resnet.r160_in1k", "r160_in1k", "4c6b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"


def hf_cache(root, with_config=False):
    """HF_HOME with the weights of timm's tiny test_resnet (seeded random init) as the hub client stores them."""
    torch.manual_seed(7)
    state = timm.create_model("test_resnet", num_classes=1000).state_dict()
    repo_dir = root / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REV)
    (repo_dir / "blobs").mkdir()
    (repo_dir / "snapshots" / REV).mkdir(parents=True)
    tmp = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    files = {"model.safetensors": tmp.read_bytes()}
    if with_config:  # what an hf-hub: name needs besides the weights
        cfg = timm.create_model("test_resnet.r160_in1k").pretrained_cfg
        files["config.json"] = json.dumps({"architecture": "test_resnet", "num_classes": 1000,
                                           "pretrained_cfg": {k: v for k, v in cfg.items() if k != "hf_hub_id"}}).encode()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), repo_dir / "snapshots" / REV / name)
    return str(repo_dir / "snapshots" / REV / "model.safetensors"), hashlib.sha256(files["model.safetensors"]).hexdigest()


def pld(*args, hf_home):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return forked.run(*args, env=env, timeout=300)


@pytest.mark.slow
def test_pretrained_hub_teachers_are_cached_offline_with_their_identity(tiny_data, tmp_path):
    """A timm pretrained tag and an hf-hub: name of the same weights, as two teachers of one pass."""
    weights, sha = hf_cache(tmp_path / "hf", with_config=True)
    out = tmp_path / "c.zarr"
    names = {"tag": "test_resnet.r160_in1k", "hub": "hf-hub:timm/test_resnet.r160_in1k"}
    teachers = [arg for tid, name in names.items() for arg in ("--teacher", name, "--teacher-name", tid)]
    run = pld("cache-teacher", "--data", tiny_data["train"].pattern, *teachers,
              "--pretrained", "--views", "1", "--recipe", "imagenet", "--size", "48", "--top-k", "5", "--workers", "0",
              "--device", "cpu", "--quiet", "--out", str(out), hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.stderr
    reader = Cache(str(out))
    # the cached targets are those of a model loaded from the same file directly
    model = timm.create_model("test_resnet", num_classes=1000)
    model.load_state_dict(load_file(weights))
    model.eval()
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    samples = list(iter_shard(tiny_data["train"].shards[0]))
    assert reader.meta.num_classes == 1000
    for tid in names:
        rec = reader.teacher(tid)
        assert rec.pretrained == {"hub_id": REPO, "tag": TAG, "revision": REV, "file": "model.safetensors",
                                  "sha256": sha}, tid
        assert rec.checkpoint_sha256 == sha
        assert rec.preprocessing["mean"] == [0.5, 0.5, 0.5]  # from the model's pretrained_cfg
        block = reader.read(0, tid)
        x = torch.stack([replay_view(decode_image(s["png"]), block.params[i, 0], recipe) for i, s in enumerate(samples)])
        assert x.shape[-1] == 48
        with torch.no_grad():
            logits = model(normalize(x, rec.preprocessing["mean"], rec.preprocessing["std"]))
        want = TeacherTargets.from_logits(logits, torch.as_tensor(block.labels).long(), k=5)
        np.testing.assert_array_equal(block.topk_idx[:, 0], want.topk_idx.numpy())
        np.testing.assert_allclose(block.topk_logp[:, 0], want.topk_logp.numpy(), atol=2e-3)


def test_missing_hub_weights_are_one_line_naming_where_it_looked_and_the_fix(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    run = pld("cache-teacher", "--data", tiny_data["train"].pattern, "--teacher", "test_resnet.r160_in1k",
              "--pretrained", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "c.zarr"),
              hf_home=tmp_path / "empty")
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "Cannot load pretrained weights for 'test_resnet.r160_in1k'" in lines[0]
    assert str(tmp_path / "empty" / "hub") in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "huggingface-cli download timm/test_resnet.r160_in1k" in lines[0] and "--teacher-checkpoint" in lines[0]


def test_a_student_starts_from_its_hub_weights_with_a_new_head(tmp_path):
    weights, _ = hf_cache(tmp_path / "hf")

    def student():
        from pld_pipeline.models import load_model
        m = load_model("test_resnet.r160_in1k", num_classes=10, pretrained=True)
        print(torch.equal(m.state_dict()["conv1.0.weight"], load_file(weights)["conv1.0.weight"]), m.num_classes)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = forked.Forked(["load_model"], env=env, target=student, stdout=forked.PIPE, stderr=forked.PIPE)
    out, err = run.communicate(timeout=120)
    assert out.split() == ["True", "10"], err


def test_an_unreachable_hub_without_hf_hub_offline_fails_fast_naming_the_switch(tiny_data, tmp_path):
    """Without HF_HUB_OFFLINE the hub client retries an unreachable hub before failing (about 90 s seen on a real
    offline machine); a short probe refuses at once and says to set HF_HUB_OFFLINE=1."""
    from conftest import free_port
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "empty"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # nothing listens
    run = forked.run("cache-teacher", "--data", tiny_data["train"].pattern, "--teacher", "test_resnet.r160_in1k",
                     "--pretrained", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "c.zarr"),
                     env=env, timeout=300)
    line = " ".join(run.stderr.split())
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "cannot be reached (ConnectionRefusedError within 3 s)" in line and "set HF_HUB_OFFLINE=1" in line, line
    assert not (tmp_path / "c.zarr").exists()
