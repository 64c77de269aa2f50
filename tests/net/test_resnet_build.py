"""featx builds torchvision's ResNets itself (featx.net.backbones.resnet): for all ten the same
modules under the same names, the same parameter shapes and the same seeded random init as
torchvision's own, and the same forward; so state dicts load either way and `--weights random`
gives torchvision's numbers."""

from __future__ import annotations

import pytest
import torch
import torchvision

from featx.net.backbones.resnet import CONFIGS, ResNet
from tests.conftest import assert_the_same_build, seeded


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_same_modules_names_shapes_and_seeded_init_as_torchvision(name):
    ours = seeded(lambda: ResNet(name))
    theirs = seeded(lambda: torchvision.models.get_model(name, weights=None))
    assert_the_same_build(ours, theirs)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_the_same_forward_as_torchvision(name):
    theirs = torchvision.models.get_model(name, weights=None).eval()
    ours = ResNet(name).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 67, 90, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
