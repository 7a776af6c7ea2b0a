"""Groups of K responses: the batch contract, the statistics, and the shared prompt pass for K = 2..4."""

import pytest
import torch
from helpers.data import write_mixed
from helpers.equivalence import assert_same_logps_losses_and_gradients, comparison_module

from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
from mmpo.losses import DPOLoss, LossOutput, PairLogps, PlackettLuceLoss, ResponseStats
from mmpo.module import reward_metrics

EXTRA = ["a red circle .", "there is a blue square and a green star .", "no ."]


@pytest.fixture(scope="module")
def mixed_samples(world, tmp_path_factory):
    # single-image, two-image and text-only prompts of different lengths
    path = write_mixed(world, tmp_path_factory.mktemp("groups") / "mixed.jsonl")
    records, _ = load_preference_records(path, data_root=world)
    ds = PreferenceDataset(records)
    return [ds[i] for i in range(len(ds))]


def group_batch(processor, samples, k, **side):
    """A batch of groups of ``k`` responses: chosen, rejected, then extra answers of different lengths."""
    items = []
    for i, s in enumerate(samples):
        responses = [s["record"].chosen, s["record"].rejected, *EXTRA[i % 2 :]][:k]
        items.append({**s, "responses": responses, **{name: v[i] for name, v in side.items()}})
    return VisionPreferenceCollator(processor)(items)


def test_collator_lays_out_k_responses_response_major(processor, mixed_samples):
    scores = [[3.0, 2.0, 1.0]] * 4
    batch = group_batch(processor, mixed_samples, 3, scores=scores, weights=[1.0, 0.5, 2.0, 1.0])
    b = len(mixed_samples)
    assert batch.group_size == 3 and batch.num_groups == b and batch.input_ids.shape[0] == 3 * b
    prompts, responses = batch.host_lengths()
    tok = processor.tokenizer
    for j in range(3):
        for i, s in enumerate(mixed_samples):
            row = j * b + i
            assert prompts[row] == prompts[i]  # every response of a group follows the same prompt
            text = [s["record"].chosen, s["record"].rejected, *EXTRA[i % 2 :]][j]
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            span = batch.input_ids[row, prompts[row] : prompts[row] + responses[row]].tolist()
            assert span == ids
    # media are stored once per group: two images for the second prompt, none for the text-only one
    assert batch.media["pixel_values"].shape[0] == 1 + 2 + 1
    assert batch.row_media()["pixel_values"].shape[0] == 3 * 4
    assert batch.scores.shape == (b, 3) and batch.weights.tolist() == [1.0, 0.5, 2.0, 1.0]
    moved = batch.to("cpu")
    assert moved.group_size == 3 and torch.equal(moved.scores, batch.scores)


def test_collator_refuses_groups_of_different_sizes_and_partial_side_information(processor, mixed_samples):
    items = [
        {**s, "responses": [s["record"].chosen, s["record"].rejected, *EXTRA[: i % 2]]}
        for i, s in enumerate(mixed_samples)
    ]
    with pytest.raises(ValueError, match="groups of one size"):
        VisionPreferenceCollator(processor)(items)
    items = [{**s, **({"weights": 1.0} if i else {})} for i, s in enumerate(mixed_samples)]
    with pytest.raises(ValueError, match="lack 'weights'"):
        VisionPreferenceCollator(processor)(items)


def test_pair_batch_is_unchanged_by_the_group_contract(processor, mixed_samples):
    # K = 2 through "responses" is the same batch as the record's chosen/rejected
    plain = VisionPreferenceCollator(processor)(mixed_samples)
    grouped = group_batch(processor, mixed_samples, 2)
    assert plain.group_size == 2 and plain.num_pairs == 4
    for name in ("input_ids", "attention_mask", "response_mask", "prompt_lengths"):
        assert torch.equal(getattr(plain, name), getattr(grouped, name))
    assert plain.row_lengths == grouped.row_lengths


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_equals_naive_for_groups(tiny_llava, processor, mixed_samples, k, pack, lora):
    batch = group_batch(processor, mixed_samples, k)
    shared, naive = (
        comparison_module(
            tiny_llava, lora, loss=PlackettLuceLoss(beta=0.1), freeze_vision_tower=False, shared_prefix=s,
            pack_responses=pack if s else None,
        )
        for s in (True, False)
    )  # fmt: skip
    assert shared.backbone._naive_reason(shared.backbone.unwrap(shared.policy), batch) is None
    grads = assert_same_logps_losses_and_gradients(shared, naive, batch)
    if not lora:  # gradients flow through the cache into the prompt's vision tower
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "vision_tower" in n)


def test_response_stats_from_rows_keep_the_pair_columns(tiny_llava):
    torch.manual_seed(0)
    rows = torch.randn(6, 5)  # K = 3 responses of B = 2 groups, response-major rows
    mask = torch.rand(6, 5) > 0.3
    stats = ResponseStats.from_rows(rows * mask, mask, 3)
    assert stats.logps.shape == (2, 3) and stats.token_logps.shape == (2, 3, 5)
    for j in range(3):
        assert torch.equal(stats.logps[:, j], (rows * mask)[2 * j : 2 * j + 2].sum(-1))
        assert torch.equal(stats.tokens[:, j], mask[2 * j : 2 * j + 2].sum(-1).float())
        assert stats.token_logps[:, j].is_contiguous()  # a pair loss reads a column as one block


def test_pair_logps_constructor_equals_stacked_statistics():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    n = torch.tensor([2.0, 4.0])
    pair = DPOLoss(beta=0.1)(PairLogps(c, r, n, n), PairLogps(rc, rr, n, n))
    stacked = DPOLoss(beta=0.1)(
        ResponseStats(torch.stack([c, r], 1), torch.stack([n, n], 1)),
        ResponseStats(torch.stack([rc, rr], 1), torch.stack([n, n], 1)),
    )
    assert torch.equal(pair.losses, stacked.losses) and torch.equal(pair.rewards, stacked.rewards)
    assert pair.rewards.shape == (2, 2) and torch.equal(pair.chosen_rewards, 0.1 * (c - rc))


def test_plackett_luce_is_dpo_for_pairs_and_hand_computed_for_triples():
    torch.manual_seed(0)
    p, r = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    n = torch.ones(5, 2, dtype=torch.float64)
    pl = PlackettLuceLoss(beta=0.3)(ResponseStats(p, n), ResponseStats(r, n)).losses
    dpo = DPOLoss(beta=0.3)(ResponseStats(p, n), ResponseStats(r, n)).losses
    torch.testing.assert_close(pl, dpo)
    # one triple with log-ratios (1, 0, -1) and beta 1: -log(e^1 / (e^1 + e^0 + e^-1)) - log(e^0 / (e^0 + e^-1))
    lr = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    got = PlackettLuceLoss(beta=1.0)(
        ResponseStats(lr, torch.ones(1, 3)), ResponseStats(torch.zeros(1, 3), torch.ones(1, 3))
    )
    e = torch.tensor(1.0, dtype=torch.float64).exp()
    want = -torch.log(e / (e + 1 + 1 / e)) - torch.log(1 / (1 + 1 / e))
    torch.testing.assert_close(got.losses[0], want)
    with pytest.raises(ValueError, match="groups hold 3"):
        DPOLoss()(ResponseStats(lr, torch.ones(1, 3)), ResponseStats(torch.zeros(1, 3), torch.ones(1, 3)))


def test_reward_metrics_for_pairs_and_lists():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])
    out = LossOutput.pair(torch.zeros(2), torch.tensor([0.2, -0.1]), torch.tensor([0.1, 0.3]))
    m = reward_metrics(out, ResponseStats(logps, torch.ones(2, 2)))
    assert m["rewards/accuracies"].item() == 0.5 and m["rewards/margins"].item() == pytest.approx(-0.15)
    assert m["logps/accuracies"].item() == 0.5 and "rewards/ranking_accuracy" not in m
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]])  # group 0: best first but 1, 2 swapped
    m = reward_metrics(LossOutput(torch.zeros(2), rewards), ResponseStats(-rewards, torch.ones(2, 3)))
    assert m["rewards/chosen"].item() == 1.5 and m["rewards/rejected"].item() == 1.5
    assert m["rewards/accuracies"].item() == 0.5  # only group 0's response 0 beats both others
    assert m["rewards/ranking_accuracy"].item() == pytest.approx(3 / 6)  # 0>1, 0>2 in group 0; 1>2 in group 1
    assert m["rewards/margins"].item() == pytest.approx(((3 - 1.5) + (0 - 1.5)) / 2)
