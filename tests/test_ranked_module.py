import pytest
from helpers.data import write_ranked

from datamodules import RankedPreferenceDataModule


def test_ranked_datamodule_serves_pairs_and_curriculum_stages(world, tiny_llava, tmp_path):
    path = tmp_path / "ranked.jsonl"
    write_ranked(world, path)
    dm = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 32}
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert len(ds.lists) == 6 and len(ds) == 18  # best_vs_rest: 3 pairs per record
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_pairs == 18 and all("#0>" in rid for rid in batch.ids)

    staged = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), curriculum={"stages": 3, "stage": 0}
    )
    staged.setup("fit")
    first = staged.datasets["train"]
    # stage 0 is the easiest pair of every prompt: the best against the worst (gap 3)
    assert len(first) == 6 and {p.rejected_index for p in first.pairs} == {1} and {p.gap for p in first.pairs} == {3.0}
    assert [r.id for r in first.records] == [p.record.id for p in first.pairs]


def test_curriculum_schedule_follows_the_trainers_epoch(world, tiny_llava, tmp_path):
    from types import SimpleNamespace

    path = write_ranked(world, tmp_path / "ranked.jsonl")
    dm = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 4},
        curriculum={"stages": 3, "epochs_per_stage": 2},
    )  # fmt: skip
    dm.setup("fit")
    trainer = SimpleNamespace(current_epoch=0, reload_dataloaders_every_n_epochs=1, world_size=1, global_rank=0)
    dm.trainer = trainer
    served = []
    for epoch in range(7):
        trainer.current_epoch = epoch
        loader = dm.train_dataloader()
        served.append((loader.dataset.current_stage, {p.gap for p in loader.dataset.pairs}))
    # two epochs per stage, easiest (score gap 3) first; past the last stage the hardest one stays
    assert served == [(0, {3.0})] * 2 + [(1, {2.0})] * 2 + [(2, {1.0})] * 3
    assert dm.datasets["train"].current_stage is None and len(dm.datasets["train"]) == 18  # views; all pairs kept

    trainer.reload_dataloaders_every_n_epochs = 0
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="needs curriculum.stages"):
        RankedPreferenceDataModule(str(tiny_llava), train_file=str(path), curriculum={"epochs_per_stage": 1})
    with pytest.raises(ValueError, match="not both"):
        RankedPreferenceDataModule(
            str(tiny_llava),
            train_file=str(path),
            curriculum={"stages": 3, "stage": 0, "epochs_per_stage": 1},
        )
