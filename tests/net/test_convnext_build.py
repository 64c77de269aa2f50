"""featx builds torchvision's ConvNeXts itself (featx.net.backbones.convnext): for all four the
same modules under the same names and class names, the same attributes (each module's repr:
shapes, eps, stochastic depth's p and mode), the same seeded random init as torchvision's own,
and the same forward; so state dicts load either way and `--weights random` gives torchvision's
numbers."""

from __future__ import annotations

import pytest
import torch
import torchvision

from featx.net.backbones.convnext import CONFIGS, ConvNeXt
from tests.conftest import assert_the_same_build, seeded


# convnext_large: 198M parameters drawn twice (default init, then torchvision's) in each of two
# nets, 3.4 s on a quiet 2-core machine.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "convnext_large" else n for n in CONFIGS]
)
def test_the_same_modules_names_shapes_and_seeded_init_as_torchvision(name):
    ours = seeded(lambda: ConvNeXt(name))
    theirs = seeded(lambda: torchvision.models.get_model(name, weights=None))
    assert_the_same_build(ours, theirs)


def test_stochastic_depth_rises_linearly_to_torchvisions_last_value_and_is_the_identity_in_eval():
    net = ConvNeXt("convnext_tiny")
    drops = [m.stochastic_depth for stage in (1, 3, 5, 7) for m in net.features[stage]]
    assert [d.p for d in drops] == [0.1 * k / 17 for k in range(18)]
    assert {d.mode for d in drops} == {"row"}
    x = torch.randn(4, 8, 3, 3)
    assert drops[-1].eval()(x) is x


def test_the_same_forward_as_torchvision():
    theirs = torchvision.models.get_model("convnext_tiny", weights=None).eval()
    ours = ConvNeXt("convnext_tiny").eval()
    # A random init's 1e-6 layer scale makes every block nearly the identity: give them weight.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in theirs.modules():
            if type(block).__name__ == "CNBlock":
                block.layer_scale.uniform_(0.5, 1.5, generator=g)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 67, 90, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
