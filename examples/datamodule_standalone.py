"""Use mmpo's datamodules from another project, without importing mmpo itself.

    python examples/datamodule_standalone.py PROCESSOR_DIR_OR_HUB_ID DATA.jsonl

Prints the shapes of the first batch and checks that ``mmpo`` was never imported. With no
arguments it writes a small shapes world next to this run and uses a processor directory given in
the environment variable ``MMPO_EXAMPLE_PROCESSOR``.
"""

from __future__ import annotations

import os
import sys
import tempfile

from datamodules import ImagePreferenceDataModule, LoaderSettings, write_shapes_world


def main(argv: list[str]) -> None:
    if len(argv) >= 2:
        processor, train_file = argv[0], argv[1]
    else:
        processor = os.environ["MMPO_EXAMPLE_PROCESSOR"]
        root = tempfile.mkdtemp(prefix="shapes-")
        train_file = write_shapes_world(root, n_train=8, n_val=4)["train"]
    dm = ImagePreferenceDataModule(
        processor=processor, train_file=train_file, loader=LoaderSettings(batch_size=4), on_bad_sample="skip"
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    print("pairs:", batch.num_pairs, "ids:", batch.ids)
    print("input_ids:", tuple(batch.input_ids.shape), "response tokens per row:", batch.response_mask.sum(-1).tolist())
    print("media:", {k: tuple(v.shape) for k, v in batch.media.items()})
    assert "mmpo" not in sys.modules, "the datamodules package must not import mmpo"
    print("mmpo imported: no")


if __name__ == "__main__":
    main(sys.argv[1:])
