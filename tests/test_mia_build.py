"""The MIA-DPO builder: output the datamodule reads, summary, bad records, resumption after interruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import augment.mia.build as mia_build
from augment.mia.build import build_negatives, main
from augment.mia.build_config import (
    BuildConfig,
    FormatOptions,
    GenerationSettings,
    GridOptions,
    SelectionSettings,
    SequenceOptions,
    SourceSettings,
)

N_SOURCE = 12


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("mia-build") / "tiny-llava", vocabulary(), image_size=32)


@pytest.fixture(scope="module")
def loaded(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_path, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(tiny_path)


def make_config(world: Path, tiny_path: Path, out: Path, **overrides) -> BuildConfig:
    settings = {
        "source": SourceSettings(str(world / "train.jsonl"), limit=N_SOURCE),
        "output": str(out),
        "generation": GenerationSettings(str(tiny_path), batch_size=3, max_new_tokens=6),
        "formats": FormatOptions(
            weights={"sequence": 1.0, "grid": 1.0, "pic_in_pic": 1.0},
            sequence=SequenceOptions(num_images=[2, 3]),
            grid=GridOptions(num_tiles=[2, 4], tile_size=32, margin=4, noise_std=0.3),
        ),
        # Every non-empty answer that differs from the truth is kept: the random model's answers are noise.
        "selection": SelectionSettings(
            thresholds={"sequence": {2: 1.0, 3: 1.0}, "grid": {2: 1.0, 4: 1.0}, "pic_in_pic": {1: 1.0}},
            min_perplexity=0.0,
        ),
        "chunk_size": 4,
    }
    return BuildConfig(**{**settings, **overrides})


def files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.jsonl", "decisions.jsonl")}


def test_build_writes_a_dataset_the_datamodule_reads(world, tiny_path, loaded, tmp_path):
    from datamodules.core.records import load_preference_records

    model, processor = loaded
    result = build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    summary = result.summary
    decisions = [json.loads(line) for line in (tmp_path / "out" / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == summary["total"] == N_SOURCE
    assert summary["kept"] == sum(d["kept"] for d in decisions) > 0
    assert set(summary["per_format"]) == {d["format"] for d in decisions}
    for d in decisions:
        assert d["kept"] or d["reason"]
    records, problems = load_preference_records(tmp_path / "out" / "train.jsonl")
    assert not problems and len(records) == summary["kept"]
    source = {json.loads(line)["id"]: json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()}
    raw = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    for rec, r in zip(records, raw, strict=True):
        assert rec.chosen == source[r["source_id"]]["chosen"]  # chosen = ground truth
        assert rec.rejected != rec.chosen and rec.rejected.strip()
        assert (
            len(rec.images)
            == r["prompt"].count("<image>")
            == (r["mia"]["n_images"] if r["mia"]["format"] == "sequence" else 1)
        )
        assert all(Path(p).is_file() for p in rec.images)
    # A complete build is not redone.
    again = build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    assert again.already_complete and again.summary["kept"] == summary["kept"]


def test_training_images_are_clean_unless_asked(world, tiny_path, loaded, tmp_path):
    from PIL import Image, ImageChops

    model, processor = loaded
    config = make_config(
        world,
        tiny_path,
        tmp_path / "clean",
        formats=FormatOptions(
            weights={"grid": 1.0}, grid=GridOptions(num_tiles=[2], tile_size=32, margin=4, noise_std=0.5)
        ),
    )
    build_negatives(config, model=model, processor=processor)
    noisy = make_config(world, tiny_path, tmp_path / "noisy", formats=config.formats, train_on_corrupted=True)
    build_negatives(noisy, model=model, processor=processor)
    clean_recs = [json.loads(x) for x in (tmp_path / "clean" / "train.jsonl").read_text().splitlines()]
    assert clean_recs
    rec = clean_recs[0]
    clean = Image.open(tmp_path / "clean" / rec["images"][0]).convert("RGB")
    corrupted = Image.open(tmp_path / "noisy" / rec["images"][0]).convert("RGB")
    # Same layout, but only the corrupted one has noise: white margins stay white only in the clean collage.
    assert clean.size == corrupted.size and ImageChops.difference(clean, corrupted).getbbox() is not None
    assert clean.getpixel((0, 0)) == (255, 255, 255)


def test_interrupted_build_resumes_to_identical_files(world, tiny_path, loaded, tmp_path, monkeypatch):
    model, processor = loaded
    reference = make_config(world, tiny_path, tmp_path / "full")
    build_negatives(reference, model=model, processor=processor, progress=False)

    real = mia_build.generate_with_attention
    calls = {"n": 0}

    def dies_in_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(mia_build, "generate_with_attention", dies_in_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_negatives(make_config(world, tiny_path, out), model=model, processor=processor, progress=False)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["next_index"] == 8 and not progress["complete"]
    # A kill in the middle of appending leaves a partial line behind: resumption cuts it off.
    with (out / "train.jsonl").open("a") as f:
        f.write('{"id": "half-written')
    with (out / "decisions.jsonl").open("a") as f:
        f.write('{"id": "x", "format": "grid", "kept": true, "reason": ""}\n')
    monkeypatch.setattr(mia_build, "generate_with_attention", real)
    resumed = build_negatives(make_config(world, tiny_path, out), model=model, processor=processor, progress=False)
    assert files(out) == files(tmp_path / "full")
    assert resumed.summary["total"] == N_SOURCE
    assert resumed.summary["per_format"] == json.loads((tmp_path / "full" / "summary.json").read_text())["per_format"]


def test_other_settings_refuse_the_existing_output(world, tiny_path, loaded, tmp_path):
    model, processor = loaded
    build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    with pytest.raises(FileExistsError, match="other settings"):
        build_negatives(make_config(world, tiny_path, tmp_path / "out", seed=1), model=model, processor=processor)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_negatives(make_config(world, tiny_path, tmp_path / "stranger"), model=model, processor=processor)


def test_bad_source_records_error_or_are_counted(world, tiny_path, loaded, tmp_path):
    model, processor = loaded
    data = tmp_path / "data"
    shutil.copytree(world / "images", data / "images")
    lines = (world / "train.jsonl").read_text().splitlines()[:6]
    bad = [
        '{"id": "broken", "prompt": ',
        json.dumps({"id": "two-images", "images": ["images/a.png", "images/b.png"], "prompt": "q", "chosen": "a"}),
        json.dumps({"id": "missing", "images": ["images/nope.png"], "prompt": "q", "chosen": "a"}),
        json.dumps({"id": "no-answer", "images": [json.loads(lines[0])["images"][0]], "prompt": "q"}),
    ]
    (data / "train.jsonl").write_text("\n".join(lines[:3] + bad + lines[3:]) + "\n")
    config = make_config(world, tiny_path, tmp_path / "out", source=SourceSettings(str(data / "train.jsonl")))
    with pytest.raises(ValueError, match=r"train\.jsonl:4: malformed JSON"):
        build_negatives(config, model=model, processor=processor)
    config.source.on_bad_record = "skip"
    summary = build_negatives(config, model=model, processor=processor, progress=False).summary
    assert summary["skipped_source_records"] == {"bad_record": 4}
    assert summary["total"] == 6 and summary["source_records"] == 10
    assert any("needs exactly one image" in m for m in summary["skip_messages"])
    assert any("nope.png" in m for m in summary["skip_messages"])


def test_command_line_reads_yaml_and_names_unknown_keys(world, tiny_path, tmp_path, capsys):
    config = {
        "source": {"path": str(world / "train.jsonl"), "limit": 6},
        "output": str(tmp_path / "out"),
        "generation": {"model": str(tiny_path), "batch_size": 3, "max_new_tokens": 4},
        "formats": {"weights": {"sequence": 1.0, "grid": 0.0, "pic_in_pic": 1.0}, "sequence": {"num_images": [2]}},
        "chunk_size": 3,
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    result = main(["--config", str(path), "--selection.min_perplexity", "0.5"])
    assert result.summary["config"]["selection"]["min_perplexity"] == 0.5
    assert result.summary["total"] == 6
    assert "MIA-DPO build done" in capsys.readouterr().out
    config["formats"]["sequence"]["num_imgs"] = [2]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["--config", str(path)])
    assert "num_imgs" in capsys.readouterr().err


def test_bad_format_weights_are_refused(world, tiny_path, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        make_config(world, tiny_path, tmp_path, formats=FormatOptions(weights={"collage": 1.0}))
    with pytest.raises(ValueError, match="positive sum"):
        make_config(world, tiny_path, tmp_path, formats=FormatOptions(weights={"grid": 0.0}))
