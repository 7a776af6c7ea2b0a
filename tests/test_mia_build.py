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


def grid_tile_box(n_tiles: int, index: int, tile: int = 32, margin: int = 4) -> tuple[tuple[int, int, int, int], int]:
    """Tile ``index`` of a square-padded collage, from the layout documented in augment.mia.formats, and its side."""
    rows, cols = {2: (1, 2), 4: (2, 2)}[n_tiles]
    width, height = cols * tile + (cols - 1) * margin, rows * (tile + margin)
    side = max(width, height)
    r, c = divmod(index, cols)
    x, y = c * (tile + margin) + (side - width) // 2, r * (tile + margin) + margin + (side - height) // 2
    return (x, y, x + tile, y + tile), side


def rgb(image):
    """(H, W, 3) uint8 pixels of an image file or a PIL image."""
    import numpy as np
    from PIL import Image

    return np.asarray((image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB"))


def assert_shows_source(images: list[str], mia: dict, source_image: Path, world_images: set[bytes]) -> None:
    """A training record's images show its source image where its prompt points, resized as documented.

    ``world_images``: the RGB bytes of every image of the source dataset.
    """
    from PIL import Image

    source = rgb(source_image)  # one of the world's 64 px scenes
    if mia["format"] == "sequence":  # the source image where the prompt points, other source images elsewhere
        shown = [rgb(p) for p in images]
        assert [(x.shape == source.shape and (x == source).all()) for x in shown] == [
            i == mia["target_index"] for i in range(len(shown))
        ]
        assert all(x.tobytes() in world_images for x in shown)
        return
    (image,) = (rgb(p) for p in images)
    if mia["format"] == "grid":
        box, side = grid_tile_box(mia["n_images"], mia["target_index"])
        assert image.shape == (side, side, 3)
    else:  # pic-in-pic: the source fitted into 0.7 x 64 = 45 px, centred on a 64 px companion
        box = (9, 9, 54, 54)
        assert image.shape == (64, 64, 3)
    x0, y0, x1, y1 = box
    expected = Image.fromarray(source).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)
    assert (image[y0:y1, x0:x1] == rgb(expected)).all()


def test_build_writes_a_dataset_the_datamodule_reads(world, tiny_path, loaded, tmp_path):
    from augment.mia.select import normalise_answer
    from datamodules.core.records import load_preference_records

    model, processor = loaded
    result = build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    summary = result.summary
    decisions = [json.loads(line) for line in (tmp_path / "out" / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == summary["total"] == N_SOURCE
    assert summary["kept"] == sum(d["kept"] for d in decisions)
    assert set(summary["per_format"]) == {d["format"] for d in decisions}
    # With thresholds of 1 and no minimum perplexity, exactly the non-empty answers that differ from the truth are kept.
    for d in decisions:
        answer, truth = normalise_answer(d["answer"]), normalise_answer(d["ground_truth"])
        reason = "empty_response" if not answer else "matches_ground_truth" if answer == truth else ""
        reason = reason or ("attention_above_threshold" if d["ratio"] is None else "")
        assert (d["kept"], d["reason"]) == (not reason, reason), d
    assert 0 < summary["kept"]
    records, problems = load_preference_records(tmp_path / "out" / "train.jsonl")
    assert not problems and [r.id for r in records] == [d["id"] for d in decisions if d["kept"]]
    source = {json.loads(line)["id"]: json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()}
    world_images = {rgb(world / r["images"][0]).tobytes() for r in source.values()}
    raw = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    answers = {d["id"]: d["answer"] for d in decisions}
    for rec, r in zip(records, raw, strict=True):
        mia, origin = r["mia"], source[r["source_id"]]
        assert rec.chosen == origin["chosen"] and rec.rejected == answers[rec.id]  # truth vs the model's answer
        n = mia["n_images"] if mia["format"] == "sequence" else 1
        assert len(rec.images) == r["prompt"].count("<image>") == n
        if mia["format"] != "pic_in_pic":
            assert f"In Image{mia['target_index'] + 1}," in r["prompt"]
        assert_shows_source(rec.images, mia, world / origin["images"][0], world_images)
    # A complete build is not redone.
    again = build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    assert again.already_complete and again.summary["kept"] == summary["kept"]


# Per format and image count, thresholds unlike the paper's defaults: the build must use the configured ones.
THRESHOLDS = {"sequence": {2: 0.3, 3: 0.4}, "grid": {2: 0.45, 4: 0.25}, "pic_in_pic": {1: 0.6}}
MIN_PERPLEXITY = 1.5


def scripted_answer(i: int, threshold: float, truth: str) -> tuple[str, float, float, str]:
    """The scripted answer, ratio and perplexity for source record i, and the reason selection gives ("" = kept)."""
    return [
        ("a purple diamond .", threshold, 2.0, ""),  # at the threshold: kept
        ("a purple diamond .", threshold + 0.01, 2.0, "attention_above_threshold"),
        ("a purple diamond .", 0.0, MIN_PERPLEXITY, "low_perplexity"),  # not above the minimum
        (truth.upper().rstrip(" .") + "!", 0.0, 2.0, "matches_ground_truth"),
        ("  . ", 0.0, 2.0, "empty_response"),
        ("a purple diamond .", float("nan"), 2.0, "attention_above_threshold"),
        ("no no no .", 0.0, MIN_PERPLEXITY + 0.01, ""),
    ][i % 7]


def test_kept_records_are_exactly_those_the_selection_rule_keeps(world, tiny_path, loaded, tmp_path, monkeypatch):
    from augment.mia.generate import GenerationResult

    model, processor = loaded
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:N_SOURCE]]
    index = {str(world / r["images"][0]): i for i, r in enumerate(rows)}

    def scripted(model, processor, samples, **kwargs):
        out = []
        for s in samples:
            threshold = THRESHOLDS[s.format][s.n_images]
            answer, ratio, ppl, _ = scripted_answer(index[s.target_key], threshold, s.answer)
            out.append(GenerationResult(s, answer, ratio, ppl, n_generated=3, layer=2))
        return out

    monkeypatch.setattr(mia_build, "generate_with_attention", scripted)
    selection = SelectionSettings(thresholds=THRESHOLDS, min_perplexity=MIN_PERPLEXITY)
    result = build_negatives(
        make_config(world, tiny_path, tmp_path / "out", selection=selection), model=model, processor=processor
    )
    decisions = [json.loads(line) for line in (tmp_path / "out" / "decisions.jsonl").read_text().splitlines()]
    assert [d["source_id"] for d in decisions] == [r["id"] for r in rows]
    expected = []
    for i, d in enumerate(decisions):
        threshold = THRESHOLDS[d["format"]][d["n_images"]]
        answer, _, _, reason = scripted_answer(i, threshold, rows[i]["chosen"])
        assert (d["kept"], d["reason"], d["threshold"], d["answer"]) == (not reason, reason, threshold, answer)
        expected.append(reason)
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    kept = [d for d, reason in zip(decisions, expected, strict=True) if not reason]
    assert [r["id"] for r in train] == [d["id"] for d in kept] and len(kept) == 3
    assert [(r["chosen"], r["rejected"]) for r in train] == [(d["ground_truth"], d["answer"]) for d in kept]
    assert result.summary["by_reason"] == {
        "unknown_format_or_count": 0,
        "empty_response": 2,
        "empty_ground_truth": 0,
        "matches_ground_truth": 2,
        "low_perplexity": 2,
        "attention_above_threshold": 3,
    }


def test_every_format_shows_the_source_image_where_the_prompt_points(world, tiny_path, loaded, tmp_path, monkeypatch):
    from augment.mia.generate import GenerationResult

    model, processor = loaded

    def always_kept(model, processor, samples, **kwargs):  # a hallucination the model never looked away from
        return [GenerationResult(s, "a purple diamond .", 0.0, 2.0, n_generated=4, layer=2) for s in samples]

    monkeypatch.setattr(mia_build, "generate_with_attention", always_kept)
    build_negatives(make_config(world, tiny_path, tmp_path / "out"), model=model, processor=processor)
    source = {json.loads(line)["id"]: json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()}
    world_images = {rgb(world / r["images"][0]).tobytes() for r in source.values()}
    raw = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(raw) == N_SOURCE and {r["mia"]["format"] for r in raw} == {"sequence", "grid", "pic_in_pic"}
    for r in raw:
        images = [str(tmp_path / "out" / p) for p in r["images"]]
        assert_shows_source(images, r["mia"], world / source[r["source_id"]]["images"][0], world_images)


def test_training_images_are_clean_unless_asked(world, tiny_path, loaded, tmp_path):
    import numpy as np
    from PIL import Image

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
    noisy_recs = [json.loads(x) for x in (tmp_path / "noisy" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in clean_recs] == [r["id"] for r in noisy_recs] and clean_recs
    source = {json.loads(x)["id"]: json.loads(x) for x in (world / "train.jsonl").read_text().splitlines()}
    for rec in clean_recs:
        clean = np.asarray(Image.open(tmp_path / "clean" / rec["images"][0]).convert("RGB"), dtype=np.int16)
        corrupted = np.asarray(Image.open(tmp_path / "noisy" / rec["images"][0]).convert("RGB"), dtype=np.int16)
        (x0, y0, x1, y1), side = grid_tile_box(2, rec["mia"]["target_index"])
        assert clean.shape == corrupted.shape == (side, side, 3)
        # the clean target tile is the source image resized; the corrupted one is that plus noise (std 0.5 · 255)
        target = Image.open(world / source[rec["source_id"]]["images"][0]).convert("RGB")
        expected = np.asarray(target.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.int16)
        assert (clean[y0:y1, x0:x1] == expected).all()
        assert np.abs(corrupted[y0:y1, x0:x1] - expected).mean() > 40
        # everything else (the companion tile, margins, labels) is the same in both
        clean[y0:y1, x0:x1] = corrupted[y0:y1, x0:x1] = 0
        assert (clean == corrupted).all()


def dying_in_third_chunk(real):
    """``real`` (the generation function), raising KeyboardInterrupt on its third call: a kill mid-build."""
    calls = {"n": 0}

    def generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return generate


def test_interrupted_build_resumes_to_identical_files(world, tiny_path, loaded, tmp_path, monkeypatch):
    model, processor = loaded
    reference = make_config(world, tiny_path, tmp_path / "full")
    build_negatives(reference, model=model, processor=processor, progress=False)

    real = mia_build.generate_with_attention
    out = tmp_path / "resumed"
    monkeypatch.setattr(mia_build, "generate_with_attention", dying_in_third_chunk(real))
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


def whole_build_config(world, tiny_path, out, **selection):
    """make_config's keep-everything thresholds with a selection that needs the whole build."""
    settings = SelectionSettings(
        thresholds={"sequence": {2: 1.0, 3: 1.0}, "grid": {2: 1.0, 4: 1.0}, "pic_in_pic": {1: 1.0}},
        min_perplexity=0.0,
        **selection,
    )
    return make_config(world, tiny_path, out, selection=settings)


def test_whole_build_selection_writes_the_ablation_sets_from_one_build(world, tiny_path, loaded, tmp_path):
    from augment.mia.candidates import write_selection
    from augment.mia.select import SelectionConfig

    model, processor = loaded
    per_answer = build_negatives(make_config(world, tiny_path, tmp_path / "rule"), model=model, processor=processor)
    out = tmp_path / "all"
    result = build_negatives(whole_build_config(world, tiny_path, out, filter="none"), model=model, processor=processor)
    # thresholds of 1: the per-answer rule already keeps every candidate, so "none" writes the same pairs
    assert (out / "train.jsonl").read_bytes() == (tmp_path / "rule" / "train.jsonl").read_bytes()
    assert (out / "candidates.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert result.summary["kept"] == per_answer.summary["kept"] > 2
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == N_SOURCE and sum(d["kept"] for d in decisions) == result.summary["kept"]
    # every answer's ratio is in the summary, wrong and right apart, by format and count
    ratios = result.summary["ratios"]
    wrong = [d for d in decisions if d["status"] == "wrong" and d["ratio"] is not None]
    assert sum(len(r["wrong"]) for r in ratios.values()) == len(wrong) == result.summary["kept"]
    assert sorted(ratios) == sorted({f"{d['format']}/{d['n_images']}" for d in wrong})
    assert set(result.summary["ratio_auc"]) == set(ratios)

    attention = write_selection(out, SelectionConfig(attention_quantile=0.5), seed=0, name="train-attention.jsonl")
    matched = write_selection(
        out, SelectionConfig(attention_quantile=0.5, filter="random_matched"), seed=0, name="train-random.jsonl"
    )
    assert attention["candidates"] == matched["candidates"] == result.summary["kept"]
    assert matched["kept"] == attention["kept"] < attention["candidates"]
    records = {json.loads(line)["id"]: json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()}
    kept_by_attention = [json.loads(line) for line in (out / "train-attention.jsonl").read_text().splitlines()]
    for r in kept_by_attention:
        key = f"{r['mia']['format']}/{r['mia']['n_images']}"
        assert r["mia"]["ratio"] <= attention["thresholds"][key]
    dropped = [r for i, r in records.items() if not attention["decisions"][i][0]]
    assert all(r["mia"]["ratio"] > attention["thresholds"][f"{r['mia']['format']}/{r['mia']['n_images']}"]
               for r in dropped)  # fmt: skip
    # the random subset has the same size per format and count
    for name in ("train-attention.jsonl", "train-random.jsonl"):
        sizes = {}
        for line in (out / name).read_text().splitlines():
            mia = json.loads(line)["mia"]
            sizes[(mia["format"], mia["n_images"])] = sizes.get((mia["format"], mia["n_images"]), 0) + 1
        if name == "train-attention.jsonl":
            expected = sizes
    assert sizes == expected


def test_calibrated_build_decides_and_records_its_thresholds(world, tiny_path, loaded, tmp_path):
    model, processor = loaded
    out = tmp_path / "calibrated"
    config = whole_build_config(world, tiny_path, out, attention_quantile=0.5)
    result = build_negatives(config, model=model, processor=processor, progress=False)
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    thresholds = result.summary["thresholds"]
    candidates = [d for d in decisions if d["status"] == "wrong"]
    assert 0 < result.summary["kept"] < len(candidates)
    assert result.summary["by_reason"]["attention_above_threshold"] == len(candidates) - result.summary["kept"]
    for d in candidates:
        key = f"{d['format']}/{d['n_images']}"
        assert d["threshold"] == thresholds[key]
        margin = d["ratio"] - thresholds[key]  # the decision line rounds the ratio to 6 decimals
        assert d["kept"] if margin < -1e-6 else (not d["kept"]) if margin > 1e-6 else True
    train_ids = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert train_ids == [d["id"] for d in decisions if d["kept"]]
    assert "attention_quantile" in json.dumps(result.summary["config"])


def test_interrupted_whole_build_resumes_to_identical_files(world, tiny_path, loaded, tmp_path, monkeypatch):
    model, processor = loaded
    selection = {"attention_quantile": 0.5, "filter": "random_matched", "balance_yes_no": True}
    build_negatives(whole_build_config(world, tiny_path, tmp_path / "full", **selection), model=model,
                    processor=processor, progress=False)  # fmt: skip
    real = mia_build.generate_with_attention
    out = tmp_path / "resumed"
    monkeypatch.setattr(mia_build, "generate_with_attention", dying_in_third_chunk(real))
    with pytest.raises(KeyboardInterrupt):
        build_negatives(whole_build_config(world, tiny_path, out, **selection), model=model, processor=processor,
                        progress=False)  # fmt: skip
    assert not (out / "train.jsonl").exists()  # written whole, at the end
    with (out / "candidates.jsonl").open("a") as f:
        f.write('{"id": "half-written')
    monkeypatch.setattr(mia_build, "generate_with_attention", real)
    build_negatives(whole_build_config(world, tiny_path, out, **selection), model=model, processor=processor,
                    progress=False)  # fmt: skip
    for name in ("train.jsonl", "decisions.jsonl", "candidates.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
