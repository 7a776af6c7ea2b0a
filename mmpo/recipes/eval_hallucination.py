"""``mmpo eval-hallucination``: POPE, CHAIR and MMHal-Bench on a saved model, with files the user holds.

The model is what a run saved (``model.init_args.save_dir``: a LoRA adapter with its processor, or a
full model), a merged export (``mmpo export``), or any hub id / folder that
``AutoModelForImageTextToText.from_pretrained`` loads; a Lightning checkpoint is exported first. The
benchmarks and their metrics are those of :mod:`mmpo.hallucination_benchmarks`; the command prints one
table per benchmark and writes metrics, counts and every answer to a JSON file.

Example:
    mmpo eval-hallucination runs/llava15-7b-dpo/adapter \\
        --pope pope/coco_pope_random.json pope/coco_pope_popular.json pope/coco_pope_adversarial.json \\
        --pope-images coco/val2014 \\
        --coco-annotations coco/annotations/instances_val2014.json --coco-images coco/val2014 --captions 500 \\
        --mmhal mmhal/response_template.json --mmhal-images mmhal/images --judge my_judges.gpt4_judge \\
        --out runs/llava15-7b-dpo/hallucination.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from mmpo.benchmark_files import ChairSettings, MMHalSettings, PopeSettings
from mmpo.hallucination_benchmarks import FIELDS, HallucinationBenchmarks, format_table, write_report

__all__ = ["load_model", "main"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(
    model: str, processor: str | None = None, dtype: str = "auto", device: str = "cpu", base: str | None = None
) -> tuple[Any, Any]:
    """``(model, processor)`` from a run's saved folder (LoRA adapter or full model), a hub id or a folder.

    Args:
        model: hub id or folder; a folder with ``adapter_config.json`` is a LoRA adapter on the base model it names.
        processor: processor source (default: the model folder, then the adapter's base model).
        dtype: weights' dtype; ``auto`` keeps the checkpoint's own.
        device: where the model runs.
        base: the adapter's base model instead of the one ``adapter_config.json`` names.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    adapter = Path(model) / "adapter_config.json"
    sources = [processor] if processor else [model]
    if adapter.is_file():
        name = base or json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not name:
            raise ValueError(f"{adapter} names no base model (base_model_name_or_path): pass --base")
        from peft import PeftModel

        policy = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(name, **kwargs), model)
        sources += [] if processor else [name]
    else:
        policy = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    for source in sources:
        try:
            return policy.to(device).eval(), AutoProcessor.from_pretrained(source)
        except (OSError, ValueError):
            continue
    raise ValueError(f"no processor in {' or '.join(sources)}: pass --processor")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmpo eval-hallucination",
        description="POPE / CHAIR / MMHal-Bench hallucination metrics of a saved model on benchmark files you "
        "hold (nothing is downloaded). Prints a table per benchmark and writes a JSON report.",
    )
    p.add_argument("model", help="a run's save_dir (LoRA adapter or full model), a merged export, or a hub id")
    p.add_argument("--base", help="the adapter's base model, instead of the one adapter_config.json names")
    p.add_argument("--processor", help="processor source (default: the model folder, then the base model)")
    g = p.add_argument_group("POPE")
    g.add_argument("--pope", nargs="+", metavar="FILE", help="question files (split from the name, or name=FILE)")
    g.add_argument("--pope-images", help="folder of the POPE images (default: each file's folder)")
    g.add_argument("--pope-template", default="{question}", help="the question as asked ({question}: its text)")
    g.add_argument("--answer-rule", choices=("pope", "first_word"), default="pope", help="how yes/no is read")
    g = p.add_argument_group("CHAIR")
    g.add_argument("--coco-annotations", help="COCO-style instances file (e.g. instances_val2014.json)")
    g.add_argument("--coco-images", help="folder of its images (default: the file's folder)")
    g.add_argument("--captions", type=int, default=500, help="images captioned, drawn with --seed (0: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the draw of captioned images")
    g.add_argument("--caption-prompt", default=ChairSettings.prompt, help="the caption request")
    g.add_argument("--reference-captions", help="COCO captions file: objects they name count as present")
    g.add_argument("--synonyms", help="synonym file (class, synonym, ... per line, or JSON) added to the table")
    g.add_argument("--replace-synonyms", action="store_true", help="the synonym file replaces the built-in table")
    g.add_argument("--caption-tokens", type=int, default=128, help="longest caption")
    g = p.add_argument_group("MMHal-Bench")
    g.add_argument("--mmhal", help="MMHal-Bench JSON list of questions")
    g.add_argument("--mmhal-images", help="folder of its images; URLs are looked up by file name here")
    g.add_argument(
        "--judge", help="judge(record, answer) -> score in [0, 6]: pkg.module.name or file.py:name (none: answers only)"
    )
    g.add_argument("--mmhal-tokens", type=int, default=128, help="longest MMHal answer")
    g = p.add_argument_group("run")
    g.add_argument("--max-questions", type=int, help="the first N questions of each POPE file and of MMHal")
    g.add_argument("--max-new-tokens", type=int, default=16, help="longest POPE answer")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    g.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights' dtype (auto: the checkpoint's own)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("-o", "--out", default="hallucination.json", help="the JSON report")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not (args.pope or args.coco_annotations or args.mmhal):
        parser.error("nothing to evaluate: give --pope, --coco-annotations and/or --mmhal")
    pope = chair = mmhal = None
    if args.pope:
        pope = PopeSettings(
            args.pope, args.pope_images, args.pope_template, args.answer_rule, args.max_questions, args.max_new_tokens
        )
    if args.coco_annotations:
        chair = ChairSettings(
            args.coco_annotations,
            args.coco_images,
            args.captions or None,
            args.seed,
            args.caption_prompt,
            args.reference_captions,
            args.synonyms,
            args.replace_synonyms,
            args.caption_tokens,
        )
    if args.mmhal:
        mmhal = MMHalSettings(args.mmhal, args.mmhal_images, args.judge, args.max_questions, args.mmhal_tokens)
    benchmarks = HallucinationBenchmarks(pope, chair, mmhal)
    try:
        items = benchmarks.load()  # every file checked before the model is loaded
    except (OSError, ValueError) as e:
        parser.exit(2, f"mmpo eval-hallucination: {e}\n")
    print(f"[mmpo] {', '.join(f'{t}: {len(r)}' for t, r in items.items())}; loading {args.model}", flush=True)
    model, processor = load_model(args.model, args.processor, args.dtype, args.device, args.base)
    counts, answers = benchmarks.evaluate(model, processor, args.batch_size, progress=True)
    metrics = benchmarks.metrics(counts)
    print(format_table(metrics) or "(no metrics: MMHal answers without a judge are written unscored)")
    named = {name: dict(zip(FIELDS[kind], counts[name], strict=True)) for name, kind in benchmarks.rows()}
    write_report(args.out, metrics, named, answers, model=args.model, stage="eval")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
