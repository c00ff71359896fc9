"""CIFAR ResNets match the published design; checkpoints load whatever their wrapper."""
import pytest
import torch

from pld_pipeline.models import load_model, load_state_dict, preprocessing_of


@pytest.mark.parametrize("name, params", [("cifar_resnet20", 269_722), ("cifar_resnet56", 853_018)])
def test_cifar_resnets_have_the_published_parameter_counts(name, params):
    model = load_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_keys_follow_the_published_checkpoints():
    keys = set(load_model("cifar_resnet20").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.2.bn2.weight",
            "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k or "downsample" in k for k in keys)  # option A has no shortcut weights


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "safetensors", "published"])
def test_checkpoints_load_through_wrappers_and_prefixes(tmp_path, wrap):
    """"published": the CIFAR ResNet .th files (saved by torch 0.3, before BatchNorm's num_batches_tracked), which
    the quickstart tells users to load as teachers."""
    torch.manual_seed(0)
    src = load_model("cifar_resnet8", num_classes=7)
    state = src.state_dict()
    if wrap == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "m.safetensors"
        save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "m.th"
        if wrap == "state_dict":
            obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7, "epoch": 3}
        elif wrap == "module_prefix":
            obj = {f"module.{k}": v for k, v in state.items()}
        elif wrap == "published":
            obj = {"state_dict": {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                   "best_prec1": 91.7}
        else:
            obj = state
        torch.save(obj, str(path))
    model = load_model("cifar_resnet8", checkpoint=str(path))  # num_classes read from the checkpoint
    assert model.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    src.eval(), model.eval()
    assert torch.equal(model(x), src(x))


@pytest.mark.parametrize("first", ["state_dict", "state_dict_ema"])
def test_a_checkpoint_with_ema_and_plain_weights_loads_the_ema(tmp_path, first):
    """timm's train script saves both; the EMA weights are the ones to use (the teacher a user means), whatever
    the order of the keys in the file."""
    torch.manual_seed(0)
    plain, ema = load_model("cifar_resnet8", num_classes=7), load_model("cifar_resnet8", num_classes=7)
    wrapped = {"state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}
    if first == "state_dict_ema":
        wrapped = dict(reversed(list(wrapped.items())))
    torch.save({**wrapped, "epoch": 9}, str(tmp_path / "both.pth.tar"))
    loaded = load_state_dict(str(tmp_path / "both.pth.tar"))
    assert all(torch.equal(loaded[k], v) for k, v in ema.state_dict().items())
    model = load_model("cifar_resnet8", checkpoint=str(tmp_path / "both.pth.tar")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ema.eval()(x)) and not torch.equal(model(x), plain.eval()(x))


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(load_model("cifar_resnet8").state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit model 'cifar_resnet20'"):
        load_model("cifar_resnet20", checkpoint=str(path))
    with pytest.raises(FileNotFoundError):
        load_state_dict(str(tmp_path / "missing.pth"))


def test_a_checkpoint_of_another_depth_is_summed_up_in_one_short_line(tmp_path):
    """torch lists every missing key (4.7 KB for resnet8 into resnet56): the user needs the count and one example."""
    path = tmp_path / "r8.pth"
    torch.save(load_model("cifar_resnet8").state_dict(), str(path))
    with pytest.raises(ValueError) as info:
        load_model("cifar_resnet56", checkpoint=str(path))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "weights are not in it (e.g. layer1.1." in msg and "another architecture or depth" in msg


def test_num_classes_against_a_checkpoint_of_other_width_names_both_counts(tmp_path):
    path = tmp_path / "r8.pth"
    torch.save(load_model("cifar_resnet8", num_classes=10).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"classifier \(linear.weight\) has 10 classes, the model was built for 100 "
                                         r"\(--num-classes\); drop --num-classes"):
        load_model("cifar_resnet8", num_classes=100, checkpoint=str(path))


@pytest.mark.parametrize("name, suggestion", [("resnet56", "cifar_resnet56"), ("convnext_tny", "convnext_tiny")])
def test_an_unknown_model_name_suggests_the_closest_ones(name, suggestion):
    with pytest.raises(ValueError, match=f"Unknown model '{name}' \\(did you mean '{suggestion}'"):
        load_model(name)


def test_preprocessing_comes_from_the_pretrained_cfg_with_overrides():
    model = load_model("cifar_resnet8")
    prep = preprocessing_of(model, std=(0.5, 0.5, 0.5))
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.5, 0.5, 0.5] and prep["input_size"] == [3, 32, 32]
    timm_prep = preprocessing_of(load_model("resnet18", num_classes=3))
    assert timm_prep["input_size"] == [3, 224, 224]
