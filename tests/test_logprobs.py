import pytest
import torch

from mmpo.logprobs import (
    gather_logprobs,
    response_logprobs,
    response_logprobs_from_hidden,
    sequence_stats,
    span_coordinates,
)


def _naive(logits, input_ids, mask):
    # float64 reference: full log-softmax, shift, gather, mask.
    lp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    tok = lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float64)
    out[:, 1:] = tok * mask[:, 1:]
    return out


def _case(seed=0, n=4, t=11, v=37):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g) * 5
    ids = torch.randint(0, v, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i, (a, b) in enumerate([(3, 9), (5, 11), (1, 2), (10, 11)]):
        mask[i, a:b] = True
    return logits, ids, mask


def test_response_logprobs_match_float64_reference():
    logits, ids, mask = _case()
    for chunk in (1, 3, 1024):
        got = response_logprobs(logits, ids, mask, chunk_size=chunk)
        torch.testing.assert_close(got.double(), _naive(logits, ids, mask), atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_bfloat16_logits_are_reduced_in_float32():
    logits, ids, mask = _case(seed=1)
    got = response_logprobs(logits.bfloat16(), ids, mask)
    want = _naive(logits.bfloat16().float(), ids, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_hidden_path_equals_logits_path_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 29, bias=False)
    hidden = torch.randn(4, 11, 16, requires_grad=True)
    _, ids, mask = _case(v=29)
    a = response_logprobs_from_hidden(hidden, head, ids, mask, chunk_size=2)
    b = response_logprobs(head(hidden), ids, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (ga,) = torch.autograd.grad(a.sum(), hidden)
    (gb,) = torch.autograd.grad(b.sum(), hidden)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
    # prompt positions that predict no response token get no gradient
    assert ga[1, :4].abs().sum() == 0


def test_gather_logprobs_values():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    got = gather_logprobs(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor([-0.693147, -0.126928]), atol=1e-5, rtol=0)


def test_sequence_stats_sum_mean_count_and_empty_rows():
    tok = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    summed, mean, counts = sequence_stats(tok, mask)
    assert summed.tolist() == [-3.0, 0.0]
    assert mean.tolist() == [-1.5, 0.0]
    assert counts.tolist() == [2.0, 0.0]


def test_host_lengths_path_equals_mask_path_with_gradients():
    # rows of _case: response spans (3, 9), (5, 11), (1, 2), (10, 11); one row with no response
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 29, bias=False)
    hidden = torch.randn(5, 11, 16, requires_grad=True)
    _, ids, mask = _case(n=5, v=29)
    lengths = ((3, 5, 1, 10, 4), (6, 6, 1, 1, 0))
    a = response_logprobs_from_hidden(hidden, head, ids, mask, chunk_size=4, host_lengths=lengths)
    b = response_logprobs_from_hidden(hidden, head, ids, mask, chunk_size=4)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    (ga,) = torch.autograd.grad(a.sum(), hidden)
    (gb,) = torch.autograd.grad(b.sum(), hidden)
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def test_host_lengths_refuse_a_response_at_the_first_position():
    head = torch.nn.Linear(8, 11, bias=False)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="first position"):
        response_logprobs_from_hidden(torch.randn(1, 5, 8), head, torch.zeros(1, 5, dtype=torch.long), mask,
                                      host_lengths=((0,), (3,)))  # fmt: skip


def test_span_coordinates_match_a_boolean_mask():
    counts = torch.tensor([3, 0, 1, 4])
    rows, cols = span_coordinates(counts, int(counts.sum()))
    mask = torch.arange(5)[None] < counts[:, None]
    want_rows, want_cols = mask.nonzero(as_tuple=True)
    assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()
