import pytest
import torch

from mmpo.module import _grads_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_any_nan_or_inf_in_any_gradient_is_found(bad):
    grads = [torch.randn(4, 3), torch.randn(7, dtype=torch.bfloat16), torch.randn(2, 2)]
    assert _grads_finite(grads)
    grads[1][3] = bad
    assert not _grads_finite(grads)


def test_large_finite_gradients_are_not_mistaken_for_overflow():
    # a 2-norm of these would overflow float32 to inf; their largest magnitude does not
    assert _grads_finite([torch.full((64,), 3e38), torch.tensor([-3e38, 1.0])])
    assert _grads_finite([])
