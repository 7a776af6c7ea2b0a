import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules import BadSampleError, PreferenceDataset, VisionPreferenceCollator, load_preference_records

N_IMAGE_TOKENS = 36  # 48 px / patch 8 = 6x6 patches, CLS dropped


def _write(tmp_path: Path, records: list, name="data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _image(tmp_path: Path, name="a.png", color=(255, 0, 0)) -> str:
    Image.new("RGB", (64, 64), color).save(tmp_path / name)
    return name


def _batch(processor, path, **kw):
    mode = kw.setdefault("on_bad_sample", "error")
    records, problems = load_preference_records(path, on_bad_sample=mode)
    ds = PreferenceDataset(records, mode)
    return VisionPreferenceCollator(processor, **kw)([ds[i] for i in range(len(ds))]), problems


def test_batch_layout_image_tokens_and_masks(processor, tmp_path):
    img = _image(tmp_path)
    path = _write(
        tmp_path,
        [
            {
                "id": "r1",
                "images": [img],
                "prompt": "describe the image .",
                "chosen": "a red circle .",
                "rejected": "a blue square and a red circle .",
            },
            {"id": "r2", "prompt": "is there a red circle ?", "chosen": "yes .", "rejected": "no ."},
        ],
    )
    batch, _ = _batch(processor, path)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert batch.num_pairs == 2 and batch.ids == ["r1", "r2"]
    assert batch.input_ids.shape[0] == 4
    # rows 0 and 2 carry the image: every one of its tokens intact, in both chosen and rejected
    assert [(row == image_id).sum().item() for row in batch.input_ids] == [N_IMAGE_TOKENS, 0, N_IMAGE_TOKENS, 0]
    assert batch.media["pixel_values"].shape == (1, 3, 48, 48)  # stored once for the pair
    assert batch.row_media()["pixel_values"].shape == (2, 3, 48, 48)  # one per row for a naive forward
    for i, response in enumerate(["a red circle .", "yes .", "a blue square and a red circle .", "no ."]):
        want = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch.input_ids[i][batch.response_mask[i]].tolist() == want
        # the response starts right after the prompt and the prompt ends with "ASSISTANT :"
        p = batch.prompt_lengths[i].item()
        assert batch.response_mask[i, :p].sum() == 0
        assert tok.convert_ids_to_tokens(batch.input_ids[i, p - 2 : p].tolist()) == ["ASSISTANT", ":"]
        assert batch.attention_mask[i].sum() == p + len(want)
    # chosen and rejected rows share the prompt token for token
    assert torch.equal(batch.input_ids[0, : batch.prompt_lengths[0]], batch.input_ids[2, : batch.prompt_lengths[2]])


def test_conversational_records_match_plain_ones(processor, tmp_path):
    img = _image(tmp_path)
    plain = {"images": [img], "prompt": "describe the image .", "chosen": "a red circle .", "rejected": "no ."}
    conv = {
        "images": [img],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red circle ."}]}],
        "rejected": [{"role": "assistant", "content": "no ."}],
    }
    a, _ = _batch(processor, _write(tmp_path, [plain], "a.jsonl"))
    b, _ = _batch(processor, _write(tmp_path, [conv], "b.jsonl"))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)


def test_prompt_that_would_cut_image_tokens_is_an_error_or_a_counted_skip(processor, tmp_path):
    img = _image(tmp_path)
    rec = {"id": "long", "images": [img], "prompt": "describe the image .", "chosen": "yes .", "rejected": "no ."}
    path = _write(tmp_path, [rec, {**rec, "id": "ok", "images": []}])
    with pytest.raises(BadSampleError, match=r"data.jsonl:1.*max_length=20"):
        _batch(processor, path, max_length=20)
    batch, _ = _batch(processor, path, max_length=20, on_bad_sample="skip")
    assert batch.skipped == 1 and batch.ids == ["ok"]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_keeps_the_prompt_and_its_image_whole_and_the_first_response_tokens(processor, tmp_path):
    img = _image(tmp_path)
    chosen, rejected = "a red circle and a blue square .", "no ."
    rec = {"id": "t", "images": [img], "prompt": "describe the image .", "chosen": chosen, "rejected": rejected}
    path = _write(tmp_path, [rec])
    tok = processor.tokenizer
    whole, _ = _batch(processor, path)  # no limit
    p = whole.prompt_lengths[0].item()
    prompt = whole.input_ids[0, :p].tolist()
    assert prompt.count(tok.convert_tokens_to_ids("<image>")) == N_IMAGE_TOKENS
    long, short = _ids(tok, chosen), _ids(tok, rejected)  # 9 and 3 tokens, EOS included
    room = len(short)  # the rejected response fits exactly; the chosen one loses its last tokens and its EOS
    assert len(long) > room
    with pytest.warns(UserWarning, match="shortened"):
        batch, _ = _batch(processor, path, max_length=p + room)
    assert batch.truncated == 1
    assert batch.prompt_lengths.tolist() == [p, p] and batch.row_lengths == ((p, p), (room, room))
    for row, kept in ((0, long[:room]), (1, short)):
        assert batch.input_ids[row, :p].tolist() == prompt  # prompt and image tokens never cut
        assert batch.input_ids[row, p:].tolist() == kept  # the response's first tokens, in order
        assert batch.response_mask[row].tolist() == [False] * p + [True] * room
        assert batch.attention_mask[row].tolist() == [1] * (p + room)
    torch.testing.assert_close(batch.media["pixel_values"], whole.media["pixel_values"], rtol=0, atol=0)


def test_responses_of_different_lengths_are_cut_to_the_same_room_and_padded(processor, tmp_path):
    tok = processor.tokenizer
    rec = {
        "id": "a",
        "prompt": "describe the image .",
        "chosen": "a red circle and a blue square .",
        "rejected": "no .",
    }
    path = _write(tmp_path, [rec, {**rec, "id": "b", "prompt": "is there a red circle in the image ?"}])
    whole, _ = _batch(processor, path)
    p = whole.prompt_lengths.tolist()  # rows: chosen a, chosen b, rejected a, rejected b
    assert p[0] < p[1]
    limit = p[1] + 3  # record b's prompt leaves 3 tokens, record a's 8: both too few for the 9-token chosen
    with pytest.warns(UserWarning, match="shortened"):
        batch, _ = _batch(processor, path, max_length=limit)
    long, short = _ids(tok, rec["chosen"]), _ids(tok, rec["rejected"])
    assert len(long) > limit - p[0] > limit - p[1] >= len(short)
    expected = [long[: limit - p[0]], long[: limit - p[1]], short, short]
    assert batch.truncated == 2  # both chosen responses; "no ." fits everywhere
    assert batch.input_ids.shape[1] == limit
    for row, kept in enumerate(expected):
        n = p[row] + len(kept)
        assert batch.input_ids[row, : p[row]].tolist() == whole.input_ids[row, : p[row]].tolist()
        assert batch.input_ids[row, p[row] : n].tolist() == kept
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all()
        assert batch.response_mask[row].nonzero().flatten().tolist() == list(range(p[row], n))
        assert batch.attention_mask[row].sum().item() == n and batch.attention_mask[row, :n].all()


def test_room_for_min_response_tokens_is_the_boundary(processor, tmp_path):
    rec = {"id": "x", "prompt": "describe the image .", "chosen": "a red circle .", "rejected": "no ."}
    path = _write(tmp_path, [rec])
    p = _batch(processor, path)[0].prompt_lengths[0].item()
    tok = processor.tokenizer
    exact, _ = _batch(processor, path, max_length=p + len(_ids(tok, "a red circle .")))
    assert exact.truncated == 0 and exact.input_ids[0, p:].tolist() == _ids(tok, "a red circle .")  # fits: whole
    one, _ = _batch(processor, path, max_length=p + 1)
    assert one.truncated == 2 and one.input_ids[:, p:].tolist() == [_ids(tok, "a")[:1], _ids(tok, "no")[:1]]
    two, _ = _batch(processor, path, max_length=p + 2, min_response_tokens=2)
    assert two.truncated == 2 and two.input_ids[:, p:].tolist() == [_ids(tok, "a red")[:2], _ids(tok, "no .")[:2]]
    with pytest.raises(BadSampleError, match=f"leaves 1 of max_length={p + 1}"):
        _batch(processor, path, max_length=p + 1, min_response_tokens=2)
    with pytest.raises(BadSampleError, match=f"leaves 0 of max_length={p}"):
        _batch(processor, path, max_length=p)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "missing field"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' response is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["nope.png"]}, "media file not found"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["../escape.png"]}, "outside the data root"),
        ({"prompt": "<image> <image> q", "chosen": "a", "rejected": "b", "images": ["a.png"]}, "2 image placeholder"),
        ('{"prompt": "q", "chosen": ', "malformed JSON"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    sub = tmp_path / "root"
    sub.mkdir()
    _image(sub)
    _image(tmp_path, "escape.png")
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(sub, [good, record])
    with pytest.raises(BadSampleError, match=message) as err:
        load_preference_records(path)
    assert f"{path}:2" in str(err.value)
    records, problems = load_preference_records(path, on_bad_sample="skip")
    assert len(records) == 1 and len(problems) == 1 and f"{path}:2" in problems[0]


def test_corrupt_image_is_an_error_or_a_counted_skip(processor, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _image(tmp_path)
    rec = {"id": "x", "prompt": "describe the image .", "chosen": "yes .", "rejected": "no ."}
    path = _write(tmp_path, [{**rec, "images": ["bad.png"]}, {**rec, "id": "y", "images": ["a.png"]}])
    records, _ = load_preference_records(path)
    with pytest.raises(BadSampleError, match=r"data.jsonl:1: cannot decode image .*bad.png"):
        PreferenceDataset(records)[0]
    batch, _ = _batch(processor, path, on_bad_sample="skip")
    assert batch.skipped == 1 and batch.ids == ["y"]


def test_all_skipped_gives_an_empty_batch(processor, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    path = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b", "images": ["bad.png"]}])
    batch, _ = _batch(processor, path, on_bad_sample="skip")
    assert batch.num_pairs == 0 and batch.skipped == 1


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet_files_read_like_jsonl(processor, tmp_path, suffix):
    import datasets

    img = _image(tmp_path)
    rows = [
        {"id": "a", "images": [img], "prompt": "describe the image .", "chosen": "a red circle .", "rejected": "no ."},
        {"id": "b", "images": [img], "prompt": "is there a red circle ?", "chosen": "yes .", "rejected": "no ."},
    ]
    jsonl, _ = _batch(processor, _write(tmp_path, rows))
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    other, _ = _batch(processor, path)
    assert other.ids == ["a", "b"]
    assert torch.equal(other.input_ids, jsonl.input_ids) and torch.equal(other.response_mask, jsonl.response_mask)


def test_datamodules_work_without_importing_mmpo(tiny_llava):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "MMPO_EXAMPLE_PROCESSOR": str(tiny_llava)}
    out = subprocess.run(
        [sys.executable, str(repo / "examples/datamodule_standalone.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pairs: 4" in out.stdout and "mmpo imported: no" in out.stdout


def test_in_memory_trl_format_dataset_with_pil_images_matches_the_file(processor, world, tiny_llava):
    import datasets

    from datamodules import ImagePreferenceDataModule

    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:6]]
    # TRL's vision datasets hold decoded images (an Image feature), not paths
    with_paths = [{**r, "images": [str(world / p) for p in r["images"]]} for r in rows]
    ds = datasets.Dataset.from_list(with_paths).cast_column("images", datasets.Sequence(datasets.Image()))
    assert isinstance(ds[0]["images"][0], Image.Image)

    kw = {"loader": {"batch_size": 6, "shuffle": False}}
    from_memory = ImagePreferenceDataModule(str(tiny_llava), train_dataset=ds, **kw)
    from_file = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), **kw)
    from_memory.setup("fit")
    from_file.setup("fit")
    a = next(iter(from_memory.train_dataloader()))
    b = next(iter(from_file.train_dataloader()))
    assert a.ids == b.ids
    assert torch.equal(a.input_ids, b.input_ids[:, : a.input_ids.shape[1]])
    torch.testing.assert_close(a.media["pixel_values"], b.media["pixel_values"])


def test_in_memory_rows_name_their_index_in_errors():
    from datamodules import BadSampleError, load_preference_records

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    with pytest.raises(BadSampleError, match=r"<dataset>\[1\]: missing field"):
        load_preference_records(rows)


def test_a_list_of_train_files_reads_each_with_its_own_media_root(world, tiny_llava, tmp_path):
    import shutil

    from datamodules import ImagePreferenceDataModule

    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:5]]
    files = []
    for folder, part in (("a", rows[:3]), ("b", rows[3:])):  # two datasets, images relative to their folder
        (tmp_path / folder / "pics").mkdir(parents=True)
        for r in part:
            shutil.copy(world / r["images"][0], tmp_path / folder / "pics" / Path(r["images"][0]).name)
        moved = [{**r, "id": f"{folder}-{r['id']}", "images": [f"pics/{Path(r['images'][0]).name}"]} for r in part]
        files.append(tmp_path / folder / "train.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in moved))

    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=[str(f) for f in files], loader={"batch_size": 4, "shuffle": False}
    )
    dm.setup("fit")
    records = dm.datasets["train"].records
    assert [r.id for r in records] == [f"a-{r['id']}" for r in rows[:3]] + [f"b-{r['id']}" for r in rows[3:]]
    assert [Path(r.images[0]).parent.parent.name for r in records] == ["a"] * 3 + ["b"] * 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.ids == [r.id for r in records[:4]]
    single = ImagePreferenceDataModule(
        str(tiny_llava), str(world / "train.jsonl"), loader={"batch_size": 4, "shuffle": False}
    )
    single.setup("fit")
    same = next(iter(single.train_dataloader()))
    torch.testing.assert_close(batch.media["pixel_values"], same.media["pixel_values"])  # the same images
