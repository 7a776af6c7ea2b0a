"""Each preference loss against DPO on the shapes world: same SFT model, budget, data order and yardstick.

    .venv/bin/python benchmarks/loss_comparison.py --workdir /tmp/loss-comparison   # 3 seeds, 15 losses

For every seed the quickstart's own code builds the shapes world and the tiny LLaVA and runs its SFT
warm-up once (``mmpo.recipes.quickstart``: ``prepare``, ``run_config`` on ``configs/quickstart_sft.yaml``).
Then every loss trains the same LoRA preference stage (``configs/quickstart.yaml``: AdamW, lr 2e-4, batch
16 pairs, seed-fixed data order) from that SFT model for the same number of optimizer steps, with only
``model.loss`` replaced (every ``__init__`` argument written out at the class's default). KTO and BCO train
on the same pairs as unpaired records (chosen → desirable, rejected → undesirable) with batches of 32
records, so each step reads the responses of 16 pairs, as a pair step does.

Every trained policy is then measured with the same yardsticks, whatever loss trained it:
(a) the validation pairs scored by ``DPOLoss(beta=0.1)`` against the SFT model (the adapter disabled):
reward accuracy and margin, log-prob accuracy, chosen and rejected log-probs; (b) the shapes world's
hallucination probes (``mmpo.hallucination``: POPE-style yes/no questions and CHAIR-style captions on
held-out single images, greedy answers). Writes JSON (every run's figures) and prints markdown tables:
per loss the mean ± std over seeds, and the per-seed difference to DPO (mean ± std).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# name -> class path; every loss runs at its class's defaults (docs/losses.md), none tuned on these data
LOSSES: dict[str, str] = {
    "dpo": "mmpo.losses.DPOLoss",
    "ipo": "mmpo.losses.IPOLoss",
    "hinge": "mmpo.losses.HingeLoss",
    "robust_dpo": "mmpo.losses.RobustDPOLoss",
    "simpo": "mmpo.losses.SimPOLoss",
    "orpo": "mmpo.losses.ORPOLoss",
    "ln_dpo": "mmpo.losses.LNDPOLoss",
    "ld_dpo": "mmpo.losses.LDDPOLoss",
    "asymmetric_dpo": "mmpo.losses.AsymmetricDPOLoss",
    "lcpo": "mmpo.losses.LCPOLoss",
    "bco_pair": "mmpo.losses.BCOPairLoss",
    "tdpo2": "mmpo.losses.TDPOLoss",
    "sparse_po": "mmpo.losses.SparsePOLoss",
    "kto": "mmpo.losses.KTOLoss",
    "bco": "mmpo.losses.BCOLoss",
}
UNPAIRED = ("kto", "bco")
YARDSTICK_BETA = 0.1
# (JSON key, table header): the yardstick figures, in table order
COLUMNS = [
    ("rewards/accuracies", "reward acc"),
    ("rewards/margins", "reward margin"),
    ("logps/accuracies", "log-prob acc"),
    ("logps/chosen", "log-prob chosen"),
    ("logps/rejected", "log-prob rejected"),
    ("hallucination/pope_accuracy", "POPE acc"),
    ("hallucination/chair_i", "CHAIR-i"),
    ("hallucination/object_recall", "recall"),
]


def loss_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def default_init_args(class_path: str) -> dict[str, Any]:
    """Every ``__init__`` argument of the loss at its default, so no value of the base config carries over."""
    params = inspect.signature(loss_class(class_path).__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self" and p.default is not inspect.Parameter.empty}


def write_unpaired(pairs: Path, out: Path) -> int:
    """Each pair record as two unpaired records: chosen → desirable, rejected → undesirable (same prompt, images)."""
    lines = []
    for line in pairs.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        for side, label in (("chosen", True), ("rejected", False)):
            record = {"id": f"{r['id']}-{side}", "images": r["images"], "prompt": r["prompt"]}
            lines.append(json.dumps({**record, "completion": r[side], "label": label}))
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def overlay(workdir: Path, name: str, class_path: str, init_args: dict, data: dict | None) -> Path:
    """A partial config (after configs/quickstart.yaml) that swaps in the loss and, for KTO/BCO, the data."""
    import yaml

    content: dict[str, Any] = {"model": {"init_args": {"loss": {"class_path": class_path, "init_args": init_args}}}}
    if data is not None:
        content["data"] = data
    path = workdir / f"loss-{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@torch.no_grad()
def yardstick(module: Any, datamodule: Any) -> dict[str, float]:
    """The validation pairs under ``DPOLoss(beta=0.1)``, reference = the policy with its adapter disabled
    (the SFT model), whatever loss trained the policy: pair-weighted means of TRL's figures."""
    from mmpo.losses import DPOLoss
    from mmpo.metrics import reward_metrics
    from mmpo.reference import DisabledAdapter

    loss, reference = DPOLoss(beta=YARDSTICK_BETA), DisabledAdapter()
    was_training = module.policy.training
    module.policy.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in datamodule.val_dataloader():
        if batch.num_groups == 0:
            continue
        policy = module.backbone.statistics(module.policy, batch)
        out = loss(policy, reference.statistics(module, batch, "val"))
        for k, v in {"loss": out.losses.mean(), **reward_metrics(out, policy)}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * batch.num_groups
        n += batch.num_groups
    module.policy.train(was_training)
    if n == 0:
        raise ValueError("the validation split has no usable pair")
    return {k: v / n for k, v in sums.items()}


def probe(module: Any, processor: Any, probes: list) -> dict[str, float]:
    """POPE/CHAIR figures of the policy's greedy answers to the shapes-world probes (``single`` setting)."""
    from mmpo.generation import generate_answers
    from mmpo.hallucination import metrics_from_counts, score

    answers = generate_answers(
        module.policy, processor, [p.prompt for p in probes], [p.images for p in probes], max_new_tokens=24
    )
    return {f"hallucination/{k}": v for k, v in metrics_from_counts(score(probes, answers)["single"]).items()}


def run_seed(args: argparse.Namespace, seed: int, names: list[str], results: dict, save: Any) -> None:
    from mmpo.hallucination import make_probes
    from mmpo.recipes.quickstart import prepare, run_config

    configs, workdir = Path(args.configs), Path(args.workdir) / f"seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    common = [
        f"--seed_everything={seed}",
        "--trainer.check_val_every_n_epoch=1000000",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    t0 = time.perf_counter()
    if not (args.reuse_sft and (workdir / "sft-model").is_dir()):
        prepare(workdir, args.n_train, args.n_val, seed)
        sft_extra = [*common, f"--trainer.max_epochs={args.sft_epochs}"]
        sft = run_config(configs / "quickstart_sft.yaml", workdir, sft_extra)
        sft.trainer.fit(sft.model, datamodule=sft.datamodule)
    print(f"[compare] seed {seed}: world, model and SFT warm-up in {time.perf_counter() - t0:.0f} s", flush=True)

    stage = [
        *common,
        "--trainer.max_epochs=1000",
        f"--trainer.max_steps={args.steps}",
        "--model.init_args.save_dir=null",
    ]
    evaluator = run_config(configs / "quickstart.yaml", workdir, [*stage, f"--trainer.default_root_dir={workdir}/eval"])
    eval_data = evaluator.datamodule
    eval_data.setup("validate")
    probes = make_probes("single", args.probes, args.probes, seed=seed) if args.probes else []
    evaluator.model.configure_model()
    before = yardstick(evaluator.model, eval_data)
    if probes:
        before.update(probe(evaluator.model, eval_data.processor, probes))
    results["sft"][str(seed)] = before

    unpaired_data = None
    if any(n in UNPAIRED for n in names):
        count = write_unpaired(workdir / "data" / "train.jsonl", workdir / "data" / "unpaired-train.jsonl")
        write_unpaired(workdir / "data" / "val.jsonl", workdir / "data" / "unpaired-val.jsonl")
        init = {"train_file": f"{workdir}/data/unpaired-train.jsonl", "val_file": f"{workdir}/data/unpaired-val.jsonl"}
        init["loader"] = {"batch_size": 2 * eval_data.loader.batch_size}
        unpaired_data = {"class_path": "datamodules.UnpairedPreferenceDataModule", "init_args": init}
        print(f"[compare] seed {seed}: {count} unpaired training records", flush=True)

    for name in names:
        t0 = time.perf_counter()
        try:
            row = preference_run(configs, workdir, stage, name, unpaired_data, eval_data, probes)
        except Exception as e:  # one loss failing must not lose the others' figures: recorded, reported, skipped
            results["failed"].append({"seed": seed, "loss": name, "error": f"{type(e).__name__}: {e}"})
            save()
            print(f"[compare] seed {seed} {name:<15} FAILED after {time.perf_counter() - t0:.0f} s: {e}", flush=True)
            continue
        results["runs"].append({"seed": seed, **row})
        save()
        print(
            f"[compare] seed {seed} {name:<15} {row['steps']} steps, train {row['train_seconds']:.1f} s, eval "
            f"{row['eval_seconds']:.1f} s, reward acc {row['figures']['rewards/accuracies']:.3f}",
            flush=True,
        )


def preference_run(
    configs: Path, workdir: Path, stage: list[str], name: str, unpaired_data: dict | None, eval_data: Any, probes: list
) -> dict[str, Any]:
    """Train one loss from the seed's SFT model (configs/quickstart.yaml with the loss swapped) and measure it."""
    from mmpo.recipes.quickstart import run_config

    class_path, init_args = LOSSES[name], default_init_args(LOSSES[name])
    data = unpaired_data if name in UNPAIRED else None
    extra = ["--config", str(overlay(workdir, name, class_path, init_args, data))]
    cli = run_config(
        configs / "quickstart.yaml", workdir, [*stage, *extra, f"--trainer.default_root_dir={workdir}/{name}"]
    )
    loss = cli.model.loss
    wrong = {k: getattr(loss, k) for k, v in init_args.items() if hasattr(loss, k) and getattr(loss, k) != v}
    if type(loss).__name__ != class_path.rsplit(".", 1)[1] or wrong:
        raise RuntimeError(f"{name}: the config built {type(loss).__name__} with {wrong}, not {class_path}")
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = yardstick(cli.model, eval_data)
    if probes:
        figures.update(probe(cli.model, eval_data.processor, probes))
    row = {
        "loss": name,
        "class_path": class_path,
        "init_args": init_args,
        "reference": cli.model.reference_mode,
        "steps": cli.trainer.global_step,
        "train_seconds": round(train_s, 2),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "figures": figures,
    }
    if name == "dpo":  # the module's own validation (its own loss, its own loop) must match the yardstick
        own = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        row["own_validation"] = {k: float(v) for k, v in own.items()}
    return row


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:  # no spread from one seed
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(results: dict) -> str:
    """Markdown: per loss the mean ± std over seeds, then the per-seed difference to DPO (mean ± std)."""
    runs = results["runs"]
    names = list(dict.fromkeys(r["loss"] for r in runs))
    columns = [(k, h) for k, h in COLUMNS if any(k in r["figures"] for r in runs)]
    dpo = {r["seed"]: r["figures"] for r in runs if r["loss"] == "dpo"}
    head = "| loss | seeds | " + " | ".join(h for _, h in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    out = ["Mean ± std over seeds (yardstick: DPOLoss β=0.1 vs the SFT model; probes: greedy answers)", "", head, rule]
    sft = list(results["sft"].values())
    out.append(
        "| SFT model (before) | "
        + f"{len(sft)} | "
        + " | ".join(_mean_std([f[k] for f in sft if k in f]) for k, _ in columns)
        + " |"
    )
    for name in names:
        rows = [r["figures"] for r in runs if r["loss"] == name]
        out.append(
            f"| {name} | {len(rows)} | "
            + " | ".join(_mean_std([f[k] for f in rows if k in f]) for k, _ in columns)
            + " |"
        )
    if dpo:
        out += ["", "Per-seed difference to DPO (loss − DPO, same seed), mean ± std over seeds", "", head, rule]
        for name in names:
            if name == "dpo":
                continue
            rows = [r for r in runs if r["loss"] == name and r["seed"] in dpo]
            # a figure without a denominator (CHAIR-i of a policy that named no object) is absent: that seed drops out
            cells = [
                _mean_std(
                    [r["figures"][k] - dpo[r["seed"]][k] for r in rows if k in r["figures"] and k in dpo[r["seed"]]]
                )
                for k, _ in columns
            ]
            out.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    if results.get("failed"):
        out += [
            "",
            "Failed runs: " + "; ".join(f"seed {f['seed']} {f['loss']}: {f['error']}" for f in results["failed"]),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, from {', '.join(LOSSES)}")
    parser.add_argument(
        "--n-train", type=int, default=1500, help="training pairs of the shapes world (SFT and preference)"
    )
    parser.add_argument("--n-val", type=int, default=256, help="validation pairs (the yardstick)")
    parser.add_argument("--sft-epochs", type=int, default=5, help="SFT warm-up epochs (the quickstart's)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every preference run")
    parser.add_argument("--probes", type=int, default=48, help="POPE questions and captions each per run; 0: none")
    parser.add_argument(
        "--reuse-sft", action="store_true", help="keep a seed's world and SFT model already in --workdir (resume)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (1 avoids thread barriers on a busy CPU)"
    )
    parser.add_argument("--configs", default=str(REPO / "configs"), help="directory of the quickstart configs")
    parser.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "mmpo-loss-comparison"),
        help="everything is written here",
    )
    parser.add_argument("--out", default=None, help="results JSON (default <workdir>/results.json)")
    parser.add_argument("--report", default=None, help="only print the tables of this results JSON (a partial one too)")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(tables(results))
        return results
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")
    out = Path(args.out) if args.out else Path(args.workdir) / "results.json"
    start = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "configs")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "yardstick": f"DPOLoss(beta={YARDSTICK_BETA}) vs the SFT model (adapter disabled)",
        "sft": {},
        "runs": [],
        "failed": [],
    }

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)

    if args.threads:
        torch.set_num_threads(args.threads)
    results["machine"]["threads"] = torch.get_num_threads()
    for seed in args.seeds:
        run_seed(args, seed, names, results, save)
    save()
    print("\n" + tables(results) + f"\n\ntotal {results['seconds']:.0f} s; results in {out}")
    return results


if __name__ == "__main__":
    main()
