import json

from datamodules import RankedPreferenceDataModule


def _write_ranked(world, path):
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:6]]
    out = []
    for i, r in enumerate(rows):
        responses = [r["chosen"], r["rejected"], "diamond diamond .", "square square square ."]
        scores = [4.0, 1.0, 2.0 + (i % 2), 3.0 - (i % 2)]  # best response 0, worst 1
        out.append(
            {"id": f"r{i}", "images": r["images"], "prompt": r["prompt"], "responses": responses, "scores": scores}
        )
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n")


def test_ranked_datamodule_serves_pairs_and_curriculum_stages(world, tiny_llava, tmp_path):
    path = tmp_path / "ranked.jsonl"
    _write_ranked(world, path)
    dm = RankedPreferenceDataModule(str(tiny_llava), train_file=str(path), data_root=str(world), batch_size=32)
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert len(ds.lists) == 6 and len(ds) == 18  # best_vs_rest: 3 pairs per record
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_pairs == 18 and all("#0>" in rid for rid in batch.ids)

    staged = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), curriculum_stages=3, curriculum_stage=0
    )
    staged.setup("fit")
    first = staged.datasets["train"]
    # stage 0 is the easiest pair of every prompt: the best against the worst (gap 3)
    assert len(first) == 6 and {p.rejected_index for p in first.pairs} == {1} and {p.gap for p in first.pairs} == {3.0}
    assert [r.id for r in first.records] == [p.record.id for p in first.pairs]
