"""The MIA-DPO demonstration: its configs instantiate, and `mmpo mia-demo` runs end to end at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mia_dpo"


def test_build_config_parses():
    from augment.mia.build import command_line_parser
    from augment.mia.build_config import BuildConfig

    parser = command_line_parser()
    init = parser.instantiate(parser.parse_args(["--config", str(CONFIGS / "build.yaml")]))
    config = BuildConfig(**{k: init[k] for k in ("source", "output", "generation", "formats", "selection")})
    assert config.generation.model.endswith("sft-model")
    assert config.formats.weights["sequence"] > 0


def test_training_configs_instantiate(tiny_llava, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.cli import MMPOCLI
    from mmpo.hallucination import HallucinationEval

    monkeypatch.setattr(
        VisionLanguageBackbone, "load_pretrained", lambda self: AutoModelForImageTextToText.from_pretrained(tiny_llava)
    )
    for name in ("sft.yaml", "dpo.yaml"):
        cli = MMPOCLI(args=["--config", str(CONFIGS / name)], run=False)
        spec = yaml.safe_load((CONFIGS / name).read_text())
        assert type(cli.model.loss).__name__ == spec["model"]["init_args"]["loss"]["class_path"].rsplit(".", 1)[1]
        cli.model.configure_model()
        assert any(p.requires_grad for p in cli.model.parameters())
    assert any(isinstance(c, HallucinationEval) for c in cli.trainer.callbacks)


def test_demo_runs_end_to_end_at_toy_size(tmp_path, capsys, monkeypatch):
    import augment.mia.build as mia_build
    from augment.mia.select import normalise_answer
    from mmpo.recipes.mia_demo import main

    real = mia_build.generate_with_attention

    def never_silent(*args, **kwargs):
        # A one-epoch toy model often answers nothing (or only punctuation): give such answers a
        # wrong caption so that pairs exist.
        results = real(*args, **kwargs)
        for r in results:
            r.answer = r.answer if normalise_answer(r.answer) else "a red circle ."
        return results

    monkeypatch.setattr(mia_build, "generate_with_attention", never_silent)

    workdir = tmp_path / "demo"
    results = main(
        [
            "--workdir", str(workdir),
            "--configs", str(CONFIGS),
            "--n-train", "24",
            "--n-val", "8",
            "--vision-steps", "3",
            "--language-steps", "3",
            "--sft-text-lists", "8",
            "--sft-epochs", "1",
            "--dpo-epochs", "1",
            "--probes", "2",
            # keep every non-empty wrong answer, whatever its attention
            "--build-arg", "selection.min_perplexity=0",
            "--build-arg", 'selection.thresholds={"sequence": {"2": 1.0, "3": 1.0}}',
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "hallucination probes" in out and "MIA-DPO pairs" in out
    for key in ("val/hallucination/single/pope_accuracy", "val/hallucination/sequence3/pope_accuracy"):
        assert key in results["before"] and key in results["after"]
    assert results["build"]["total"] == 24
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["before"] == results["before"]
    assert (workdir / "mia-data" / "train.jsonl").is_file()
    stamp = json.loads((workdir / "tiny-llava" / "mmpo_tiny.json").read_text())
    assert stamp["vision_pretraining"]["steps"] == 3 and stamp["language_pretraining"]["steps"] == 3
    replay = (workdir / "data" / "dpo_replay.jsonl").read_text().splitlines()
    assert len(replay) == 8  # a quarter of the 24 + 8 SFT records: single images and text
    assert all(len(json.loads(line).get("images", [])) <= 1 for line in replay)
    # the preference stage read its reference log-probs from a cache computed before its first step
    assert len(list((workdir / "dpo" / "reference_cache").glob("train-*.safetensors"))) == 1


def test_sft_split_labels_a_share_of_single_image_prompts(tmp_path):
    import re

    from datamodules.worlds.shapes import write_shapes_world
    from mmpo.recipes.mia_demo import write_sft_split

    write_shapes_world(tmp_path, n_train=200, n_val=4, seed=3, max_objects=1)
    out = write_sft_split(tmp_path, seed=3, fraction=0.5, text_lists=30)
    plain = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(sft) == len(plain) + 30
    sft, text = sft[: len(plain)], sft[len(plain) :]
    assert [r["id"] for r in text] == [f"text-{i:06d}" for i in range(30)]
    assert all("images" not in r and r["prompt"].startswith("Image1: a ") for r in text)
    labelled = 0
    for a, b in zip(plain, sft, strict=True):
        assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}
        if b["prompt"] == a["prompt"]:
            continue
        labelled += 1
        m = re.fullmatch(r"Image(\d): <image>\nIn Image(\d), (.*)", b["prompt"])
        assert m and m.group(1) == m.group(2) and 1 <= int(m.group(1)) <= 5 and m.group(3) == a["prompt"]
        assert len(b["images"]) == 1
    assert 60 <= labelled <= 140
    again = write_sft_split(tmp_path, seed=3, fraction=0.5, text_lists=30)
    assert again.read_bytes() == out.read_bytes()  # deterministic

    # the text-only records are read by the datamodule as they are
    from datamodules import load_preference_records

    records, problems = load_preference_records(out)
    assert not problems and len(records) == len(plain) + 30 and records[-1].images == []


def test_replay_split_is_a_seeded_share_of_the_sft_records(tmp_path):
    from datamodules.worlds.shapes import write_shapes_world
    from mmpo.recipes.mia_demo import write_replay_split, write_sft_split

    write_shapes_world(tmp_path, n_train=100, n_val=4, seed=1, max_objects=1)
    sft = write_sft_split(tmp_path, seed=1, text_lists=20).read_text().splitlines()
    out = write_replay_split(tmp_path, seed=1, fraction=0.25)
    replay = out.read_text().splitlines()
    assert len(replay) == 30 and len(set(replay)) == 30 and set(replay) <= set(sft)
    assert [sft.index(line) for line in replay] == sorted(sft.index(line) for line in replay)  # file order kept
    assert all(json.loads(line)["rejected"] != json.loads(line)["chosen"] for line in replay)
    assert write_replay_split(tmp_path, seed=1, fraction=0.25).read_bytes() == out.read_bytes()
    assert write_replay_split(tmp_path, seed=2, fraction=0.25).read_text().splitlines() != replay


def test_ablation_runs_three_preference_stages_from_one_build(tmp_path, capsys, monkeypatch):
    import augment.mia.build as mia_build
    from augment.mia.select import normalise_answer
    from mmpo.recipes.mia_demo import main

    real = mia_build.generate_with_attention

    def never_silent(*args, **kwargs):  # as above: a toy model answers nothing; wrong answers make candidates
        results = real(*args, **kwargs)
        for i, r in enumerate(results):
            r.answer = r.answer if normalise_answer(r.answer) else ("yes ." if i % 3 else "a red circle .")
        return results

    monkeypatch.setattr(mia_build, "generate_with_attention", never_silent)
    workdir = tmp_path / "ablation"
    results = main(
        [
            "--workdir", str(workdir), "--configs", str(CONFIGS),
            "--n-train", "24", "--n-val", "8", "--vision-steps", "2", "--language-steps", "2",
            "--sft-text-lists", "4", "--sft-epochs", "1", "--dpo-epochs", "1", "--probes", "1",
            "--build-arg", "selection.min_perplexity=0",
            "--ablation", "--seeds", "5",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "probe seed 1" in out  # held-out probes by default: not the tuning seed 0 of dpo.yaml
    assert results["modes"] == ["none", "attention", "random_matched"] and results["probe_seed"] == 1
    run = results["runs"][0]
    pairs = run["pairs"]
    candidates = pairs["none"]["candidates"]
    assert candidates > 0 and pairs["none"]["kept"] == candidates
    assert 0 < pairs["attention"]["kept"] < candidates or candidates == 1
    assert pairs["random_matched"]["kept"] == pairs["attention"]["kept"]  # same size, other pairs
    data = workdir / "seed5" / "mia-data"
    for mode in results["modes"]:
        lines = (data / f"train-{mode}.jsonl").read_text().splitlines()
        assert len(lines) == pairs[mode]["kept"]
        assert set(run["after"][mode]) == set(run["before"])
        assert (workdir / "seed5" / f"dpo-{mode}" / "reference_cache").is_dir()  # each stage its own folders
    probes = {k.split("/")[2] for k in run["before"]}
    assert probes == {"single", "sequence2", "sequence3", "grid4", "pic_in_pic"}  # the three formats are measured
    assert "val/hallucination/sequence2/pope_precision" in run["before"]
    summary = json.loads((data / "summary.json").read_text())
    assert set(summary["ratios"]) == set(summary["thresholds"]) and summary["ratios"]
    assert (workdir / "seed5" / "attention_ratios.png").stat().st_size > 1000
    assert (workdir / "attention_ratios.png").is_file()
    saved = json.loads((workdir / "ablation.json").read_text())
    assert saved["summary"]["SFT"] == {k: [v] for k, v in sorted(run["before"].items())}


def test_ablation_table_gives_mean_and_sample_std():
    from mmpo.recipes.mia_ablation import format_table, summarise

    key = "val/hallucination/sequence2/pope_f1"
    runs = [
        {"before": {key: 0.2}, "after": {"none": {key: 0.5}, "attention": {key: 0.4}}},
        {"before": {key: 0.4}, "after": {"none": {key: 0.7}, "attention": {key: 0.8}}},
    ]
    summary = summarise(runs, ["SFT", "none", "attention"])
    assert summary == {"SFT": {key: [0.2, 0.4]}, "none": {key: [0.5, 0.7]}, "attention": {key: [0.4, 0.8]}}
    (header, row) = format_table(summary, ["sequence2"])
    assert header.split() == ["SFT", "none", "attention"]
    # means 0.3, 0.6, 0.6; sample std of two values a, b is |a - b| / sqrt(2)
    assert row.split()[-9:] == ["0.300", "±", "0.141", "0.600", "±", "0.141", "0.600", "±", "0.283"]
    assert row.startswith("sequence2 yes/no: F1")


def test_mode_config_points_each_stage_at_its_own_files(tmp_path):
    import pytest

    from mmpo.recipes.mia_ablation import mode_config

    out = mode_config(CONFIGS / "dpo.yaml", "random_matched", tmp_path / "dpo-random_matched.yaml")
    spec = yaml.safe_load(out.read_text())
    assert spec["data"]["init_args"]["train_file"][0] == "runs/mia_dpo/mia-data/train-random_matched.jsonl"
    assert spec["trainer"]["default_root_dir"] == "runs/mia_dpo/dpo-random_matched"
    assert spec["model"]["init_args"]["save_dir"] == "runs/mia_dpo/dpo-random_matched-adapter"
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        mode_config(broken, "none", tmp_path / "x.yaml")


def test_probe_seed_draws_other_scenes():
    from types import SimpleNamespace

    import pytest

    from mmpo.hallucination import HallucinationEval
    from mmpo.recipes.mia_demo import REPORT_PROBE_SEED, TUNING_PROBE_SEED, probe_callback

    assert REPORT_PROBE_SEED != TUNING_PROBE_SEED
    spec = yaml.safe_load((CONFIGS / "dpo.yaml").read_text())
    (callback_spec,) = spec["trainer"]["callbacks"]
    assert callback_spec["init_args"].get("seed", 0) == TUNING_PROBE_SEED  # dpo.yaml probes the tuning scenes
    assert set(callback_spec["init_args"]["settings"]) >= {"single", "sequence2", "grid4", "pic_in_pic"}
    callback = HallucinationEval(settings=["sequence2"], n_captions=2, n_questions=2, max_objects=1)
    tuning = [p.truth for p in callback.probes()]
    trainer = SimpleNamespace(callbacks=[object(), callback])
    assert probe_callback(trainer, probes=3, seed=REPORT_PROBE_SEED) is callback
    held_out = [p.truth for p in callback.probes()]
    assert len(held_out) == 6 and held_out[:2] != tuning[:2]
    with pytest.raises(ValueError, match="HallucinationEval"):
        probe_callback(SimpleNamespace(callbacks=[]))


def test_report_merges_the_seeds_of_several_ablation_files(tmp_path, capsys):
    import pytest

    from mmpo.recipes.mia_demo import main

    key = "val/hallucination/sequence2/pope_f1"

    def one_seed(seed, sft, none, attention):
        return {
            "seed": seed,
            "before": {key: sft},
            "after": {"none": {key: none}, "attention": {key: attention}},
            "pairs": {"none": {"kept": 10}, "attention": {"kept": 5}},
            "build": {"ratio_auc": {"sequence/2": 0.6}},
            "ratios": {"sequence/2": {"wrong": [0.4, 0.45], "right": [0.5, 0.55]}},
            "thresholds": {},
        }

    files = []
    for seed, values in ((0, (0.2, 0.5, 0.4)), (1, (0.4, 0.7, 0.8))):
        f = tmp_path / f"a{seed}.json"
        f.write_text(json.dumps({"probe_seed": 1, "modes": ["none", "attention"], "runs": [one_seed(seed, *values)]}))
        files.append(str(f))
    merged = main(["--report", *files, "--workdir", str(tmp_path / "all")])
    out = capsys.readouterr().out
    assert merged["seeds"] == [0, 1] and merged["summary"]["attention"][key] == [0.4, 0.8]
    assert "sequence2 yes/no: F1" in out and "0.600 ± 0.283" in out and "attention quantile: 0.5" in out
    assert (tmp_path / "all" / "attention_ratios.png").stat().st_size > 1000
    assert json.loads((tmp_path / "all" / "ablation.json").read_text())["seeds"] == [0, 1]
    with pytest.raises(SystemExit, match="seed appears twice"):
        main(["--report", files[0], files[0], "--workdir", str(tmp_path / "twice")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"probe_seed": 0, "modes": ["none", "attention"], "runs": [one_seed(2, 0, 0, 0)]}))
    with pytest.raises(SystemExit, match="probe_seed"):
        main(["--report", files[0], str(other), "--workdir", str(tmp_path / "differ")])
    with pytest.raises(SystemExit, match="missing.json"):
        main(["--report", str(tmp_path / "missing.json")])


def test_pooled_histograms_draw_shared_thresholds_as_they_are_and_others_as_their_mean():
    from mmpo.recipes.mia_ablation import pooled_thresholds

    runs = [
        {"thresholds": {"sequence/2": {"paper": 0.8, "q=0.5": 0.4}, "grid/4": {"paper": 0.5}}},
        {"thresholds": {"sequence/2": {"paper": 0.8, "q=0.5": 0.6}, "grid/4": {"paper": None}}},
    ]
    assert pooled_thresholds(runs) == {
        "sequence/2": {"paper": 0.8, "q=0.5 (mean of 2 seeds)": pytest.approx(0.5)},
        "grid/4": {"paper": 0.5},
    }
