"""Initialisation: the short convolutions start as PyTorch initialises `nn.Conv1d`, not as normal(0, 0.02)."""

import math

import pytest
import torch

from hybridzoo import HybridForCausalLM
from tiny_models import tiny_config


@pytest.mark.parametrize("pattern", ["G", "R", "X", "U", "P"])
def test_short_convs_start_with_pytorch_default_scale(pattern):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(pattern * 2, slstm_conv_kernel_dim=4))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert convs, "the block has a short conv"
    for conv in convs:
        reference = torch.nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups)
        bound = 1 / math.sqrt(conv.kernel_size[0])  # depthwise: fan_in = kernel size
        assert conv.weight.abs().max() <= bound
        # uniform(-b, b) has std b / sqrt(3); normal(0, 0.02) would be ~0.02
        assert abs(conv.weight.std().item() - reference.weight.std().item()) < 0.2 * bound / math.sqrt(3)
