"""The fused head + cross-entropy equals the plain one, value and gradient."""
import pytest
import torch

from lorakit.train.loss import linear_cross_entropy_sum


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_plain_cross_entropy(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(101, 16, dtype=dtype)
    targets = torch.randint(0, 101, (37,))
    targets[[0, 5, 36]] = -100
    ours = linear_cross_entropy_sum(hidden, weight, targets, chunk=8)  # several chunks
    (g_ours,) = torch.autograd.grad(ours, hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((h2 @ weight.T).float(), targets, ignore_index=-100, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h2)
    assert torch.allclose(ours, ref, rtol=tol, atol=tol)
    assert torch.allclose(g_ours.float(), g_ref.float(), rtol=tol, atol=tol)
    assert g_ours[0].abs().max() == 0  # ignored rows get no gradient
