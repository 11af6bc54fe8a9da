"""`linear_allow_neg_eigval` really gives the Gated DeltaNet transition a negative eigenvalue (Grazzi et al. 2025).

The block's state update is S' = exp(g) (I - beta k k^T) S + beta k v^T with unit k, so the transition on the key
side has eigenvalues 1 (k's complement) and 1 - beta. We measure that linear map from the outside: the same token run
from several initial states, the differences of the new states probing one key direction each, with the decay
switched off and beta's logit set through the weights. Then beta must be sigmoid(b) (eigenvalue in (0, 1)) by
default and 2 sigmoid(b) (eigenvalue in (-1, 1), here negative) with the option.
"""

import pytest
import torch

from hybridzoo.modeling import HybridConfig
from hybridzoo.modeling.block_gated_deltanet import HybridGatedDeltaNet

DK = DV = 8


def measured_transition(allow_neg_eigval: bool, beta_logit: float) -> torch.Tensor:
    torch.manual_seed(0)
    config = HybridConfig(hidden_size=16, num_hidden_layers=1, block_pattern="G", num_attention_heads=1,
                          linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=DK,
                          linear_value_head_dim=DV, linear_allow_neg_eigval=allow_neg_eigval)
    block = HybridGatedDeltaNet(config).double()
    x = torch.randn(16, dtype=torch.float64)
    with torch.no_grad():
        block.A_log.fill_(-60.0)  # decay exp(g) = exp(-e^-60 * softplus(.)) = 1 to double precision
        block.b_proj.weight.copy_(beta_logit * x[None] / x.dot(x))  # b = beta_logit for this token
        block.k_proj.weight.mul_(100.0)  # |k|^2 = s / (s + eps) of the L2 norm's eps: make it 1 to 1e-9
    u = torch.linspace(1.0, 2.0, DV, dtype=torch.float64)
    initial = torch.zeros(DK + 1, 1, DK, DV, dtype=torch.float64)  # row 0: zeros; row i: e_i u^T
    for i in range(DK):
        initial[i + 1, 0, i] = u
    with torch.no_grad():
        _, (_, state) = block(x.expand(DK + 1, 1, 16), state=(None, initial))
    differences = state[1:, 0] - state[0, 0]  # [DK, DK, DV]: A e_i u^T
    return (differences @ u / u.dot(u)).T  # column i = A e_i


@pytest.mark.parametrize("beta_logit", [-1.0, 0.5, 3.0])
def test_beta_range_sets_the_transition_eigenvalue(beta_logit):
    sigmoid = torch.sigmoid(torch.tensor(beta_logit, dtype=torch.float64)).item()
    for allow, beta in ((False, sigmoid), (True, 2 * sigmoid)):
        transition = measured_transition(allow, beta_logit)
        assert torch.allclose(transition, transition.T, atol=1e-10)  # I - beta k k^T is symmetric
        eigenvalues = torch.linalg.eigvalsh(transition)
        assert eigenvalues[0].item() == pytest.approx(1 - beta, abs=1e-6)  # beta is computed in float32
        assert torch.allclose(eigenvalues[1:], torch.ones(DK - 1, dtype=torch.float64), atol=1e-9)
        if allow and beta_logit > 0:
            assert eigenvalues[0] < 0  # the sign flip parity needs
        if not allow:
            assert eigenvalues[0] > 0
