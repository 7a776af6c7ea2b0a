"""``mmpo tlpo-demo``: TLPO's timestep–layer gate against single experts, one DPO model and a static merge, on the CPU.

1. The model (:mod:`mmpo.recipes.tlpo_data`): the portrait world's clips of eight 32 px frames as film strips, a VAE
   trained on its frames, a UNet over strip latents conditioned (by concatenated channels) on the reference face's
   latents and the per-frame audio envelope and mel bands.
2. Pretraining in the framework: the whole UNet by plain denoising (``SFTLoss`` through ``PreferenceModule`` and
   ``DiffusionBackbone``) on the training clips (identities ``id-000 … id-007``). Shared by every seed.
3. For each seed: the pretrained model samples ``--samples-per-clip`` clips for each of ``--n-clips`` training
   conditions (a face and its audio); the critics (:mod:`mmpo.portrait_critics`) score lip sync, motion and
   quality from the pixels; every two samples of a condition become a pair of the dimension that decides them
   (:func:`~mmpo.portrait_critics.preference_pairs`: it differs by more than ``--margin`` and more than any other).
4. Stage 1: one LoRA expert per dimension by Diffusion-DPO on that dimension's pairs; the baseline "single DPO":
   one LoRA of the same size on all pairs. Stage 2: the timestep–layer gate over the frozen experts, on all pairs.
5. Evaluation on held-out faces (``id-008``, ``id-009``) with their own audio, ``--eval-rows`` noise seeds each, the
   same noise for every model: the base model, single DPO, each expert alone, the equal static merge and TLPO,
   each critic and their mean; mean ± std over seeds. The gate's weights over timestep and layer are plotted.

The table is printed and written with every per-seed figure to ``--workdir``/``results.json``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmpo.portrait_critics import DIMENSIONS, PortraitCritics
from mmpo.recipes.diffusion_demo import _trainer, pretrain
from mmpo.recipes.report import publish, spread
from mmpo.recipes.tlpo_data import (
    CAPTION,
    PORTRAIT,
    build_portrait_pipeline,
    film_strip,
    read_split,
    strip_frames,
    write_clip_records,
    write_world,
)

__all__ = ["ClipSampler", "build_pairs", "evaluate", "main", "plot_gate", "train_stage"]

EVAL_NOISE_SEED = 0  # evaluation rows use noise seeds 0.. (pair sampling of seed s starts at 1000 (s + 1))
#: the models the evaluation compares, in table order
VARIANTS = (
    "base", "single DPO", *(f"expert {d}" for d in DIMENSIONS), "equal merge", "tuned merge", "TLPO gate",
)  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamped(path: Path, stamp: dict) -> bool:
    """Whether ``path`` records exactly ``stamp`` (a stage done with these settings, reused as it is)."""
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(stamp))


def _strip_data(root: Path) -> dict[str, Any]:
    """Datamodule arguments for film strips with conditions, paths relative to ``root``."""
    size, frames = PORTRAIT["size"], PORTRAIT["num_frames"]
    return {"resolution": [size, frames * size], "data_root": str(root), "random_flip": False}


class ClipSampler:
    """Samples clips of one model: conditions from ``root``'s ``.npy`` files, DDIM, per-row seeds."""

    def __init__(self, root: Path, pipeline: Path, steps: int, batch_size: int = 64) -> None:
        from diffusers import DDIMScheduler

        self.root, self.steps, self.batch_size = root, steps, batch_size
        self.scheduler = DDIMScheduler.from_pretrained(pipeline, subfolder="scheduler")

    def condition(self, record_id: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.root / "conditions" / f"{record_id}.npy"))

    def __call__(self, backbone: Any, model: Any, ids: list[str], seeds: list[int], desc: str) -> torch.Tensor:
        """(N, T, H, W, 3) uint8 frames of one sample per (id, seed)."""
        from mmpo.conditioned_sampling import sample_conditioned

        out = []
        rows = list(zip(ids, seeds, strict=True))
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        for chunk in tqdm(chunks, desc=desc, unit="batch", leave=False):
            condition = torch.stack([self.condition(i) for i, _ in chunk])
            images = sample_conditioned(
                backbone, model, self.scheduler, condition, [CAPTION] * len(chunk), [s for _, s in chunk], self.steps
            )
            out.append(strip_frames(images, PORTRAIT["num_frames"]))
        return torch.cat(out)


def _score(world: Path, records: dict[str, dict], ids: list[str], frames: torch.Tensor, critics: PortraitCritics):
    """Critic scores of each sample against its record's audio envelope and reference face."""
    from datamodules.worlds.portrait import load_portrait_clip

    clips = {i: load_portrait_clip(world, records[i], i) for i in dict.fromkeys(ids)}
    return [critics.score(f, clips[i]["envelope"], clips[i]["reference"]) for i, f in zip(ids, frames, strict=True)]


def build_pairs(
    sampler: ClipSampler,
    backbone: Any,
    model: Any,
    world: Path,
    out: Path,
    seed: int,
    args: argparse.Namespace,
    model_id: str,
) -> dict:
    """Sample ``args.samples_per_clip`` clips per training condition, score them, write ``out/pairs.jsonl``.

    Every two samples of a condition are a pair of the dimension that decides them (or of none). Reused when
    ``out/summary.json`` was written for the same model (``model_id``), clips and settings.
    """
    from PIL import Image

    from datamodules.core.atomic import atomic_file, atomic_write_text

    records = {r["id"]: r for r in read_split(world, "train")[: args.n_clips]}
    k = args.samples_per_clip
    stamp = {"model": model_id, "clips": list(records), "k": k, "seed": seed, "margin": args.margin}
    stamp = json.loads(json.dumps(stamp | {"steps": sampler.steps}))
    done = out / "summary.json"
    if done.is_file() and (found := json.loads(done.read_text()))["stamp"] == stamp:
        return found["summary"]
    ids = [i for i in records for _ in range(k)]
    seeds = [1000 * (seed + 1) + n for n in range(len(ids))]
    frames = sampler(backbone, model, ids, seeds, "sampling pair candidates")
    critics = PortraitCritics(margin=args.margin)
    scores = _score(world, records, ids, frames, critics)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    lines, counts = [], dict.fromkeys(DIMENSIONS, 0)
    for c, record_id in enumerate(records):
        rows = range(c * k, (c + 1) * k)
        combos = list(itertools.combinations(rows, 2))
        decided = {
            d: critics.pairs([scores[a] for a, _ in combos], [scores[b] for _, b in combos], d) for d in DIMENSIONS
        }
        used = {r for d in decided.values() for i, _ in d for r in combos[i]}
        for r in sorted(used):  # each sample of a pair written once, as a film strip
            with atomic_file(out / f"clips/{record_id}-s{r - c * k}.png") as tmp:
                Image.fromarray(film_strip(frames[r]).numpy()).save(tmp, format="PNG")
        for d, kept in decided.items():
            for i, winner in kept:
                a, b = combos[i]
                w, lose = (a, b) if winner == 0 else (b, a)
                entry = {"id": f"{record_id}-{w - c * k}-{lose - c * k}", "caption": CAPTION, "dimension": d}
                entry |= {"image_0": f"pairs-{seed}/clips/{record_id}-s{w - c * k}.png"}
                entry |= {"image_1": f"pairs-{seed}/clips/{record_id}-s{lose - c * k}.png"}
                entry |= {"label_0": 1.0, "scores": [scores[w][d], scores[lose][d]]}
                lines.append(json.dumps(entry | {"condition": f"conditions/{record_id}.npy"}) + "\n")
                counts[d] += 1
    atomic_write_text(out / "pairs.jsonl", "".join(lines))
    means = {d: float(np.mean([s[d] for s in scores])) for d in DIMENSIONS}
    summary = {"pairs": counts, "candidates": len(scores), "candidate_scores": means}
    atomic_write_text(done, json.dumps({"stamp": stamp, "summary": summary}))  # last: the pairs are complete
    return summary


def train_stage(
    base: Path, root: Path, pairs: Path, out: Path, args: argparse.Namespace, seed: int, **backbone: Any
) -> Path:
    """Diffusion-DPO of one TLPO stage (``ExpertDiffusionBackbone`` arguments in ``backbone``) on ``pairs``,
    the reference being the base denoiser (every adapter off); ``dimensions`` in ``backbone`` keeps those pairs."""
    import lightning as L

    from datamodules import DiffusionPreferenceDataModule
    from mmpo.backbones.diffusion_experts import ExpertDiffusionBackbone
    from mmpo.losses import DPOLoss
    from mmpo.module import PreferenceModule

    dimensions = backbone.pop("dimensions", None)
    gate = backbone.get("stage") == "gate"
    lr = args.gate_lr if gate else args.lr
    steps = args.gate_steps if gate else args.dpo_steps
    stamp = {
        "backbone": json.loads(json.dumps(backbone, default=vars)), "dimensions": dimensions, "steps": steps,
        "lr": lr, "beta": args.beta, "batch_size": args.batch_size, "seed": seed, "pairs": _digest(pairs),
    }  # fmt: skip
    if _stamped(out / "mmpo_stage.json", stamp):
        return out
    L.seed_everything(seed, verbose=False)
    module = PreferenceModule(
        ExpertDiffusionBackbone(str(base), **backbone), DPOLoss(beta=args.beta), reference="adapter",
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0), save_dir=str(out),
    )  # fmt: skip
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs), center_crop=True, dimensions=dimensions,
        loader={"batch_size": args.batch_size, "seed": seed, "num_workers": 0}, **_strip_data(root),
    )  # fmt: skip
    _trainer(steps, out.parent / f"{out.name}-run").fit(module, datamodule=dm)
    (out / "mmpo_stage.json").write_text(json.dumps(stamp))  # last: the stage counts as done once it exists
    return out


def evaluate(
    sampler: ClipSampler, backbone: Any, model: Any, world: Path, args: argparse.Namespace, name: str
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean critic scores of ``args.eval_rows`` samples per held-out condition at the evaluation noise."""
    records = {r["id"]: r for r in read_split(world, "val")[: args.n_eval]}
    ids = [i for _ in range(args.eval_rows) for i in records]
    seeds = [EVAL_NOISE_SEED + r for r in range(args.eval_rows) for _ in records]
    frames = sampler(backbone, model, ids, seeds, f"evaluation: {name}")
    scores = _score(world, records, ids, frames, PortraitCritics())
    figures = {d: float(np.mean([s[d] for s in scores])) for d in DIMENSIONS}
    figures["mean"] = float(np.mean([figures[d] for d in DIMENSIONS]))
    return figures, frames


def _models(run: Path) -> dict[str, Any]:
    """Each evaluated model as ExpertDiffusionBackbone arguments (None: the base model)."""
    experts = {"experts_dir": str(run / "experts"), "experts": list(DIMENSIONS)}
    one_hot = {
        f"expert {d}": {"stage": "inference", **experts, "static_weights": [float(d == e) for e in DIMENSIONS]}
        for d in DIMENSIONS
    }
    return {
        "base": None,
        "single DPO": {"stage": "inference", "experts_dir": str(run), "experts": ["single"], "static_weights": [1.0]},
        **one_hot,
        "equal merge": {"stage": "inference", **experts, "static_weights": [1 / len(DIMENSIONS)] * len(DIMENSIONS)},
        "tuned merge": {"stage": "inference", **experts, "gate_dir": str(run / "experts" / "static")},
        "TLPO gate": {"stage": "inference", **experts, "gate_dir": str(run / "experts" / "gate")},
    }


def gate_weights(base: Path, run: Path, variant: str = "TLPO gate") -> tuple[np.ndarray, list[str]]:
    """A trained gate's weights (timesteps 0..999, layers or 1, experts) and the layer names."""
    from mmpo.backbones.diffusion_experts import ExpertDiffusionBackbone
    from mmpo.backbones.experts import FUSION_NAME

    backbone = ExpertDiffusionBackbone(str(base), **_models(run)[variant])
    fusion = getattr(backbone.build().denoiser, FUSION_NAME)
    with torch.no_grad():
        weights = fusion.mixer(torch.arange(1000))  # (T, G, E)
    return weights.numpy(), list(fusion.layers)


def plot_gate(weights: np.ndarray, layers: list[str], path: Path, title: str) -> Path:
    """One heat map per expert: weight over timestep (x) and adapted layer (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(4.2 * len(DIMENSIONS), 4.2), sharey=True)
    vmin, vmax = float(weights.min()), float(weights.max())
    for e, (ax, name) in enumerate(zip(axes, DIMENSIONS, strict=True)):
        image = ax.imshow(weights[:, :, e].T, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(f"expert {name}")
        ax.set_xlabel("timestep t")
    axes[0].set_ylabel(f"adapted layer (0..{len(layers) - 1}, down -> up blocks)")
    fig.colorbar(image, ax=axes, shrink=0.85, label="gate weight")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save_samples(samples: dict[str, torch.Tensor], path: Path, clips: int = 2) -> Path:
    """The first ``clips`` held-out clips (first noise seed) of every model as film strips, a row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    fig, axes = plt.subplots(len(names), clips, figsize=(5.0 * clips, 0.9 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(clips):
            frames = samples[name][c]  # (T, H, W, 3)
            axes[r, c].imshow(film_strip(frames).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    for c in range(clips):
        axes[0, c].set_title(f"held-out clip {c} (8 frames)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _table(results: dict) -> list[str]:
    names = [*DIMENSIONS, "mean"]
    lines = [f"{'model':<22}" + "".join(f"{n:>18}" for n in names)]
    for variant in VARIANTS:
        per_seed = [r[variant] for r in results["after"]]
        lines.append(f"{variant:<22}" + "".join(f"{spread([f[n] for f in per_seed]):>18}" for n in names))
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="mmpo tlpo-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/tlpo_demo", help="where data, models and results go")
    parser.add_argument("--seeds", type=int, default=3, help="runs of both stages (seeds 0..n-1)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world, the VAE and the pretraining")
    parser.add_argument("--n-train", type=int, default=800, help="training clips of the world")
    parser.add_argument("--n-val", type=int, default=50, help="held-out clips of the world")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument("--n-clips", type=int, default=200, help="training conditions pairs are sampled for")
    parser.add_argument("--samples-per-clip", type=int, default=4, help="candidates sampled per condition")
    parser.add_argument("--margin", type=float, default=0.05, help="smallest critic difference that decides a pair")
    parser.add_argument("--n-eval", type=int, default=50, help="held-out conditions evaluated")
    parser.add_argument("--eval-rows", type=int, default=2, help="noise seeds per held-out condition")
    parser.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--dpo-steps", type=int, default=300, help="steps of each expert and of single DPO")
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per Diffusion-DPO step")
    parser.add_argument("--beta", type=float, default=500.0, help="DPOLoss beta (no 0.5 factor: official / 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the experts and single DPO")
    parser.add_argument("--gate-lr", type=float, default=1e-2, help="learning rate of the gate")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--lora-targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
        help="UNet modules with LoRA (attention and feed-forward projections, as TLPO adapts)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> dict:
    from mmpo.backbones import DiffusionBackbone, LoraSettings
    from mmpo.backbones.diffusion_experts import ExpertDiffusionBackbone
    from mmpo.backbones.experts import GateSettings

    start, seconds = time.perf_counter(), {}
    workdir = Path(args.workdir)
    world = workdir / "world"
    print("[mmpo] stage 1/5: the portrait world and the model (VAE trained on its frames)")
    t0 = time.perf_counter()
    write_world(world, args.n_train, args.n_val, args.world_seed)
    pipeline, vae = build_portrait_pipeline(workdir / "untrained", world, args.world_seed, args.vae_steps)
    print(
        f"[mmpo] VAE: held-out reconstructions score lip sync {vae['reconstructed_lip_sync']:.3f}, quality "
        f"{vae['reconstructed_quality']:.3f} (originals {vae['original_lip_sync']:.3f}, {vae['original_quality']:.3f})"
    )
    train_clips = write_clip_records(workdir, world, pipeline, "train")
    write_clip_records(workdir, world, pipeline, "val", args.n_eval)
    seconds["model"] = round(time.perf_counter() - t0, 1)

    print(f"[mmpo] stage 2/5: pretraining the UNet ({args.pretrain_steps} steps of plain denoising)")
    t0 = time.perf_counter()
    base = pretrain(
        pipeline, train_clips, workdir / "pretrained", args.pretrain_steps, args.pretrain_batch_size,
        args.pretrain_lr, args.world_seed, 0.0, _strip_data(workdir),
    )  # fmt: skip
    seconds["pretrain"] = round(time.perf_counter() - t0, 1)
    sampler = ClipSampler(workdir, base, args.sampling_steps)
    base_id = _digest(base / "unet" / "diffusion_pytorch_model.safetensors")
    plain = DiffusionBackbone(str(base))
    base_model = plain.build().eval()
    t0 = time.perf_counter()
    base_figures, base_frames = evaluate(sampler, plain, base_model, world, args, "base")
    seconds["evaluate base"] = round(time.perf_counter() - t0, 1)
    print(f"[mmpo] pretrained model: {base_figures}")

    lora = LoraSettings(r=args.lora_rank, alpha=args.lora_rank, dropout=0.0, target_modules=args.lora_targets)
    after, counts, gates = [], [], []
    for seed in range(args.seeds):
        run_dir = workdir / f"seed-{seed}"
        print(f"[mmpo] stage 3/5: seed {seed}: pairs from the pretrained model's samples")
        t0 = time.perf_counter()
        built = build_pairs(sampler, plain, base_model, world, workdir / f"pairs-{seed}", seed, args, base_id)
        counts.append(built)
        print(f"[mmpo] pairs per dimension: {built['pairs']} from {built['candidates']} samples")
        if not all(built["pairs"].values()):
            raise RuntimeError(f"a dimension decided no pair ({built['pairs']}); lower --margin or sample more")
        seconds[f"pairs seed {seed}"] = round(time.perf_counter() - t0, 1)
        pairs = workdir / f"pairs-{seed}" / "pairs.jsonl"
        t0 = time.perf_counter()
        for d in DIMENSIONS:
            print(f"[mmpo] stage 4/5: seed {seed}: expert {d} ({args.dpo_steps} steps)")
            train_stage(
                base, workdir, pairs, run_dir / "experts" / d, args, seed, stage="expert", expert=d, lora=lora,
                dimensions=[d],
            )  # fmt: skip
        print(f"[mmpo] stage 4/5: seed {seed}: single DPO on all pairs ({args.dpo_steps} steps)")
        train_stage(base, workdir, pairs, run_dir / "single", args, seed, stage="expert", expert="single", lora=lora)
        print(f"[mmpo] stage 4/5: seed {seed}: the gate over the frozen experts ({args.gate_steps} steps)")
        train_stage(
            base, workdir, pairs, run_dir / "experts" / "gate", args, seed, stage="gate",
            experts_dir=str(run_dir / "experts"), experts=list(DIMENSIONS),
        )  # fmt: skip
        print(f"[mmpo] stage 4/5: seed {seed}: the tuned static merge, one weight per expert ({args.gate_steps} steps)")
        train_stage(
            base, workdir, pairs, run_dir / "experts" / "static", args, seed, stage="gate",
            experts_dir=str(run_dir / "experts"), experts=list(DIMENSIONS),
            gate=GateSettings(per_layer=False, timestep=False),
        )  # fmt: skip
        seconds[f"train seed {seed}"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        figures, shown = {"base": base_figures}, {"base": base_frames[:2]}
        for name, kwargs in _models(run_dir).items():
            if kwargs is None:
                continue
            backbone = ExpertDiffusionBackbone(str(base), **kwargs)
            figures[name], frames = evaluate(sampler, backbone, backbone.build().eval(), world, args, name)
            shown[name] = frames[:2]
        after.append(figures)
        save_samples(shown, run_dir / "samples.png")
        weights, layers = gate_weights(base, run_dir)
        plot_gate(weights, layers, run_dir / "gate_weights.png", f"TLPO gate weights (seed {seed})")
        np.save(run_dir / "gate_weights.npy", weights)
        thirds = np.array_split(np.arange(1000), 3)
        gates.append(
            {
                "tuned merge": gate_weights(base, run_dir, "tuned merge")[0][0, 0].round(4).tolist(),
                **{f"TLPO t {t[0]}-{t[-1]}": weights[t].mean((0, 1)).round(4).tolist() for t in thirds},
            }
        )
        seconds[f"evaluate seed {seed}"] = round(time.perf_counter() - t0, 1)
        print(f"[mmpo] seed {seed}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in figures.items()))

    total = round(time.perf_counter() - start, 1)
    results = {
        "after": after,
        "pairs": counts,
        "gates": gates,
        "vae": vae,
        "settings": vars(args),
        "seconds": seconds,
        "total_seconds": total,
    }
    lines = [
        "",
        f"mmpo tlpo-demo: critic scores of {args.eval_rows} samples per held-out condition ({args.n_eval} clips of "
        "held-out faces), mean ± std over seeds",
        "",
        *_table(results),
        "",
        f"pairs per seed: {[c['pairs'] for c in counts]}; stage seconds: {seconds}; total {total:.0f} s",
        f"expert weights ({', '.join(DIMENSIONS)}) per seed: {gates}",
    ]
    return publish(workdir, lines, results)


if __name__ == "__main__":
    main()
