"""benchmarks/loss_comparison.py: its pieces by hand, and a smallest end-to-end run (2 losses, 1 seed).

The end-to-end run checks that the yardstick is the same for every loss: the DPO run's yardstick equals the
module's own validation figures, the SFT model scores rewards of exactly 0 against itself, and every run's
rewards are β × (its log-probs − the SFT model's), whichever loss trained it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import loss_comparison as lc  # noqa: E402


def test_write_unpaired_splits_each_pair(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"id": "a", "images": ["i/a.png"], "prompt": "<image>\nq1", "chosen": "yes .", "rejected": "no ."},
        {"id": "b", "images": ["i/b.png"], "prompt": "q2", "chosen": "red", "rejected": "blue", "kind": "color"},
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "unpaired.jsonl"
    assert lc.write_unpaired(pairs, out) == 4
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["id"], g["completion"], g["label"]) for g in got] == [
        ("a-chosen", "yes .", True),
        ("a-rejected", "no .", False),
        ("b-chosen", "red", True),
        ("b-rejected", "blue", False),
    ]
    assert got[3]["images"] == ["i/b.png"] and got[3]["prompt"] == "q2" and "chosen" not in got[3]


def test_default_init_args_are_the_classes_defaults():
    assert lc.default_init_args("mmpo.losses.SimPOLoss") == {"beta": 2.0, "gamma": 0.5}
    assert lc.default_init_args("mmpo.losses.DPOLoss") == {"beta": 0.1, "label_smoothing": 0.0}
    tdpo = lc.default_init_args("mmpo.losses.TDPOLoss")
    assert tdpo["variant"] == "tdpo2" and tdpo["alpha"] == 0.5
    for path in lc.LOSSES.values():  # every listed loss builds from its written-out defaults
        assert type(lc.loss_class(path)(**lc.default_init_args(path))).__name__ == path.rsplit(".", 1)[1]


def _run(seed, loss, **figures):
    return {"seed": seed, "loss": loss, "figures": figures}


def test_tables_mean_std_and_difference_to_dpo():
    results = {
        "sft": {"0": {"rewards/accuracies": 0.0}, "1": {"rewards/accuracies": 0.0}},
        "runs": [
            _run(0, "dpo", **{"rewards/accuracies": 0.5}),
            _run(1, "dpo", **{"rewards/accuracies": 0.7}),
            _run(0, "ipo", **{"rewards/accuracies": 0.6}),
            _run(1, "ipo", **{"rewards/accuracies": 0.6}),
            _run(0, "orpo", **{"rewards/accuracies": 0.4}),
        ],
        "failed": [{"seed": 1, "loss": "orpo", "error": "ValueError: boom"}],
    }
    text = lc.tables(results)
    # dpo: mean 0.6, sample std sqrt(0.02) = 0.141; ipo − dpo per seed: 0.1, −0.1 → mean 0, std 0.141
    assert "| dpo | 2 | 0.600 ± 0.141 |" in text
    assert "| ipo | 2 | 0.600 ± 0.000 |" in text
    assert "| ipo | 2 | 0.000 ± 0.141 |" in text
    assert "| SFT model (before) | 2 | 0.000 ± 0.000 |" in text
    assert "| orpo | 1 | 0.400 |" in text and "| orpo | 1 | -0.100 |" in text  # one seed: no spread shown
    assert "seed 1 orpo: ValueError: boom" in text
    assert "log-prob acc" not in text  # a figure no run has gets no column


@pytest.mark.slow
def test_smallest_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["--seeds", "0", "--losses", "dpo,simpo", "--n-train", "32", "--n-val", "8", "--sft-epochs", "1"]
    args += ["--steps", "2", "--probes", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    lc.main(args)
    results = json.loads(out.read_text())
    assert results["failed"] == []
    assert [(r["seed"], r["loss"], r["steps"]) for r in results["runs"]] == [(0, "dpo", 2), (0, "simpo", 2)]
    assert [r["reference"] for r in results["runs"]] == ["adapter", "none"]  # SimPO trains without a reference
    assert results["runs"][1]["init_args"] == {"beta": 2.0, "gamma": 0.5}
    keys = {"loss", "rewards/accuracies", "rewards/margins", "logps/accuracies", "logps/chosen", "logps/rejected"}
    keys |= {"hallucination/pope_accuracy", "hallucination/object_recall"}
    sft = results["sft"]["0"]
    for figures in [sft, *(r["figures"] for r in results["runs"])]:
        assert keys <= figures.keys()
    # the SFT model is the reference: rewards exactly 0, no pair counted as won
    assert sft["rewards/chosen"] == sft["rewards/margins"] == sft["rewards/accuracies"] == 0.0
    assert sft["loss"] == pytest.approx(0.693147, abs=1e-6)
    # the DPO run's yardstick is the module's own validation (its own loss and loop)
    dpo = results["runs"][0]
    for key, value in dpo["own_validation"].items():
        assert dpo["figures"][key.removeprefix("val/")] == pytest.approx(value, rel=1e-5, abs=1e-7)
    # every run, whatever its loss: mean reward = 0.1 × (mean log-prob − the SFT model's), on both sides
    for run in results["runs"]:
        f = run["figures"]
        for side in ("chosen", "rejected"):
            expected = 0.1 * (f[f"logps/{side}"] - sft[f"logps/{side}"])
            assert f[f"rewards/{side}"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert results["runs"][1]["figures"]["logps/chosen"] != sft["logps/chosen"]  # SimPO moved the policy
    printed = capsys.readouterr().out
    assert "| simpo | 1 |" in printed and "Per-seed difference to DPO" in printed
