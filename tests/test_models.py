"""The reference zoo: torchvision's parameter counts and names, shapes, seeded init, registry errors."""

from __future__ import annotations

import pytest
import torch

from fmcompress.errors import InputError
from fmcompress.models import (
    MODEL_NAMES,
    ZOO,
    default_input_shape,
    get_model,
    mobilenet_v2,
    resnet18,
    vgg16_bn,
)

# torchvision's published numbers (1000 classes) and state_dict sizes (parameters + BN buffers)
TORCHVISION = {
    "resnet18": (resnet18, 11_689_512, 122),
    "vgg16_bn": (vgg16_bn, 138_365_992, 97),
    "mobilenet_v2": (mobilenet_v2, 3_504_872, 314),
}

# a few torchvision state_dict entries and their shapes
TORCHVISION_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.running_var": (64,),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
    },
    "vgg16_bn": {
        "features.0.weight": (64, 3, 3, 3),
        "features.1.running_var": (64,),
        "features.40.weight": (512, 512, 3, 3),
        "classifier.0.weight": (4096, 25088),
        "classifier.6.weight": (1000, 4096),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_mean": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
}


def _on_meta(factory):
    """Build without allocating or initialising weights: counts and shapes only."""
    with torch.device("meta"):
        return factory()


@pytest.mark.parametrize("name", TORCHVISION)
def test_parameter_count_and_state_dict_size_match_torchvision(name):
    factory, params, entries = TORCHVISION[name]
    model = _on_meta(factory)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("name", TORCHVISION_KEYS)
def test_state_dict_names_and_shapes_match_torchvision(name):
    state = _on_meta(TORCHVISION[name][0]).state_dict()
    for key, shape in TORCHVISION_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "mobilenet_v2"])
def test_small_variant_shares_the_parameter_names(name):
    big = _on_meta(lambda: ZOO[name].factory(10)).state_dict()
    small = _on_meta(lambda: ZOO[f"{name}_small"].factory(10)).state_dict()
    assert set(small) == set(big)


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "mobilenet_v2"])
def test_imagenet_models_map_224_to_1000_logits(name):
    model = _on_meta(TORCHVISION[name][0])
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


@pytest.mark.parametrize("name", ["resnet18_small", "vgg16_bn_small", "mobilenet_v2_small"])
def test_small_models_map_32_to_10_logits_in_eval_mode(name):
    model = get_model(name)
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert default_input_shape(name) == (1, 3, 32, 32)


def test_small_stems_keep_resolution():
    resnet, mobilenet = get_model("resnet18_small"), get_model("mobilenet_v2_small")
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert mobilenet.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert resnet.layer1(resnet.conv1(torch.zeros(1, 3, 32, 32))).shape == (1, 64, 32, 32)


def test_resnet18_runs_at_224():
    model = get_model("resnet18")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert default_input_shape("resnet18") == (1, 3, 224, 224)


def test_num_classes_sets_the_classifier_width():
    assert get_model("resnet18_small", num_classes=7).fc.out_features == 7
    assert get_model("mobilenet_v2_small", num_classes=3).classifier[1].out_features == 3


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second = get_model("mobilenet_v2_small", seed=5), get_model("mobilenet_v2_small", seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    other = get_model("mobilenet_v2_small", seed=6)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.features[0][0].weight, other.features[0][0].weight)


def test_batchnorm_calibration_keeps_activations_alive():
    # torchvision's init leaves MobileNetV2's logits around 1e-9; calibrated stats give O(1)
    calibrated = get_model("mobilenet_v2_small")
    raw = get_model("mobilenet_v2_small", calibrate_bn=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert calibrated(x).std() > 1e-2
        assert raw(x).std() < 1e-6
    norm = calibrated.features[0][1]
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    assert norm.momentum == 0.1
    assert torch.equal(calibrated.features[0][0].weight, raw.features[0][0].weight)


def test_registry_lists_every_model():
    from fmcompress.models.catalog import ARCHITECTURES

    assert set(MODEL_NAMES) == {"resnet18", "vgg16_bn", "mobilenet_v2", "resnet18_small", "vgg16_bn_small",
                                "mobilenet_v2_small", "digits_resnet", *ARCHITECTURES}
    assert len(ARCHITECTURES) >= 22  # the compact zoo of models/catalog.py (tests/test_zoo.py)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(InputError, match="unknown model 'resnet999'.*resnet18.*mobilenet_v2_small"):
        get_model("resnet999")
    with pytest.raises(InputError, match="unknown model"):
        default_input_shape("alexnet")


@pytest.mark.parametrize("classes", [0, -1, 2.5, True])
def test_bad_num_classes_is_an_input_error(classes):
    with pytest.raises(InputError, match="num_classes"):
        get_model("resnet18_small", num_classes=classes)
