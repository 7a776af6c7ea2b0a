"""A training step reads nothing back from the device but the two checks that decide whether to step.

On a GPU every value read on the host (``.item()``, ``bool(t)``, ``.tolist()``) and every boolean-mask
selection waits for the queued work to finish. ``mmpo.diagnostics.count_device_syncs`` finds them on the
CPU too, so this runs in CI.
"""

import re
import types

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import ImagePreferenceDataModule, PreferenceBatch
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.diagnostics import count_device_syncs
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule

# the two reads a step needs: is the loss finite (else skip the backward), are the gradients finite
EXPECTED = {"mmpo/module.py _step": 1, "mmpo/module.py _grads_finite": 1}


def test_counter_sees_host_reads_and_mask_selections_only():
    x = torch.arange(6.0)
    mask = x > 2
    with count_device_syncs() as syncs:
        x[mask]  # boolean-mask selection
        x[mask] = 0.0  # and assignment
        x.sum().item()
        x.tolist()
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]))
        # none of these wait for a device
        x[torch.tensor([0, 2])]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]), output_size=3)
        (x * 2).cumsum(0)
    reasons = sorted(reason for reason, _ in syncs.counts.elements())
    assert reasons == [
        "boolean-mask indexing",
        "boolean-mask indexing",
        "repeat_interleave without output_size",
        "tolist()",
        "value read on the host",
    ]
    assert all(site.startswith("tests/test_device_syncs.py:") for _, site in syncs.counts)
    assert "tolist" not in torch.Tensor.__dict__  # the wrapper is gone
    assert x.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]


class _CountStep(L.Callback):
    """Counts what the third training step (forward, backward, optimizer step, logging) reads back."""

    def __init__(self) -> None:
        self.report = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            self._cm = count_device_syncs()
            self.report = self._cm.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            self._cm.__exit__(None, None, None)


def _own_sites(report) -> dict[str, int]:
    out: dict[str, int] = {}
    for prefix in ("mmpo/", "datamodules/"):
        for site, n in report.sites(prefix).items():
            key = re.sub(r":\d+ ", " ", site)
            out[key] = out.get(key, 0) + n
    return out


@pytest.mark.parametrize(
    ("shared_prefix", "pack", "reference"),
    [(True, None, "auto"), (True, False, "auto"), (False, None, "auto"), (True, None, "cached")],
    ids=["packed", "repeated", "naive", "cached-reference"],
)
def test_a_training_step_reads_back_only_the_two_checks(world, tiny_llava, tmp_path, shared_prefix, pack, reference):
    backbone = VisionLanguageBackbone(
        str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0), shared_prefix=shared_prefix, pack_responses=pack
    )
    module = PreferenceModule(backbone, DPOLoss(beta=0.1), reference=reference, reference_cache_dir=str(tmp_path))
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4})
    probe = _CountStep()
    trainer = quiet_trainer(max_steps=3, callbacks=[probe], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert probe.report is not None and probe.report.total > 0  # the counter was on during the step
    assert _own_sites(probe.report) == EXPECTED, probe.report.table()


def test_collator_records_row_lengths_and_batches_keep_them(world, tiny_llava):
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 3})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prompts, responses = batch.row_lengths
    assert list(prompts) == batch.prompt_lengths.tolist()
    assert list(responses) == batch.response_mask.sum(-1).tolist()
    for i, (p, n) in enumerate(zip(prompts, responses, strict=True)):  # the response follows the prompt
        assert batch.response_mask[i, p : p + n].all() and batch.response_mask[i].sum() == n
    assert batch.to("cpu", non_blocking=True).row_lengths == batch.row_lengths
    # a batch built by hand reads its lengths once, from its tensors
    fields = {**batch.__dict__, "row_lengths": None}
    assert PreferenceBatch(**fields).host_lengths() == batch.row_lengths
    # one whose response mask does not follow the prompt is refused, not misread
    mask = batch.response_mask.clone()
    mask[1, batch.row_lengths[0][1]] = False
    with pytest.raises(ValueError, match="row 1 .* not the span right after its prompt"):
        PreferenceBatch(**{**fields, "response_mask": mask}).host_lengths()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_batch_pins_every_tensor(world, tiny_llava):
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2})
    dm.setup("fit")
    pinned = next(iter(dm.train_dataloader())).pin_memory()
    assert pinned.input_ids.is_pinned() and all(v.is_pinned() for v in pinned.media.values())


def test_loaders_pin_memory_when_training_on_cuda(tiny_llava):
    dm = ImagePreferenceDataModule(str(tiny_llava))

    def trainer_on(device: str):
        return types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))

    assert dm._pins(trainer_on("cuda")) and not dm._pins(trainer_on("cpu")) and not dm._pins(None)
    assert not ImagePreferenceDataModule(str(tiny_llava), loader={"pin_memory": False})._pins(trainer_on("cuda"))
    assert ImagePreferenceDataModule(str(tiny_llava), loader={"pin_memory": True})._pins(None)
