"""Users' own networks (tests/user_nets.py) with layers no torchvision classifier has: each wraps
with most of its channels prunable and shrinks exactly under random hard gates."""
import pytest
import torch

import vpsurgery
from conftest import assert_invariant, random_hard_gates, realistic_stats, rel_err
from user_nets import USER_NETS

# the least each must reach (measured: docs/coverage.md, "user" rows)
MIN_SHARE = {"TextTransformer": 0.95, "TiedLM": 0.7, "CRNN": 0.75, "SubPixelSR": 0.75,
             "WeightNormAudio": 0.95, "SNDiscriminator": 0.95, "UNet": 0.95}


@pytest.mark.parametrize("name", sorted(USER_NETS))
@torch.no_grad()
def test_user_network_prunes_exactly(name):
    make, example = USER_NETS[name]
    torch.manual_seed(0)
    model = realistic_stats(make()).eval()
    x = example(torch.Generator().manual_seed(1))
    gated = vpsurgery.wrap(model, (x,))
    assert rel_err(gated.eval()(x), model(x)) <= 1e-6
    assert vpsurgery.plan(gated).prunable_share >= MIN_SHARE[name], vpsurgery.report(gated)
    for seed in range(2):
        random_hard_gates(gated, p=0.4, seed=seed)
        assert_invariant(gated, x, smaller=True)
