"""The training loader starts its workers at the first batch, after the epoch is set."""

import torch
from torch.utils.data import Dataset

from datamodules.core.loaders import FirstBatchStatefulDataLoader
from datamodules.core.samplers import EpochShuffleSampler, ShardedEpochShuffleSampler


class _EpochEcho(Dataset):
    """Items ``(epoch the dataset copy had, index)``: what a worker's copy of the dataset saw."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.epoch, i


def _order(epoch: int) -> list[int]:
    return torch.randperm(8, generator=torch.Generator().manual_seed(epoch)).tolist()  # EpochShuffleSampler, seed 0


def test_iterator_made_before_set_epoch_serves_the_new_epoch_in_workers():
    dataset = _EpochEcho()
    sampler = EpochShuffleSampler(dataset, seed=0)
    loader = FirstBatchStatefulDataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2, collate_fn=list)
    it = iter(loader)  # Lightning makes the iterator when it sets up the data...
    sampler.set_epoch(3)  # ...and, resuming after an epoch's last batch, advances the epoch only then
    items = [item for batch in it for item in batch]
    assert {epoch for epoch, _ in items} == {3}  # the workers' dataset copies were made after set_epoch
    assert [i for _, i in items] == _order(3)
    # the next epoch, with the same (persistent or not) workers, follows set_epoch as well
    sampler.set_epoch(4)
    assert [i for batch in loader for _, i in batch] == _order(4)


def test_shards_cover_the_single_process_order_and_pad_with_its_first_records():
    # 7 records on 3 ranks: each rank takes 3, so the first 2 of the epoch's order are served twice
    single = list(EpochShuffleSampler(range(7), seed=5))
    shards = [list(ShardedEpochShuffleSampler(range(7), num_replicas=3, rank=r, seed=5)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    padded = single + single[:2]
    assert shards == [padded[r::3] for r in range(3)]
    served = sorted(i for s in shards for i in s)
    assert served == sorted(single + single[:2])  # every record once, the first two twice
