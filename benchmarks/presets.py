"""Benchmark presets: the random-init LLaVA each one builds, its synthetic data, and its FLOP estimate.

Both frameworks read the same checkpoint (``from_pretrained`` on a local directory) and the same
data set: PNG images plus a JSONL file in TRL's vision preference format (conversational prompt,
``images`` paths, chosen and rejected assistant turns). Every response is exactly
``RESPONSE_TOKENS`` tokens (127 words + ``</s>``) for both frameworks, and every prompt has the
same length, so no batch carries padding.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from datamodules.core.atomic import atomic_directory, atomic_write_text

__all__ = [
    "LORA_TARGETS",
    "PRESETS",
    "RESPONSE_TOKENS",
    "Preset",
    "build_model",
    "model_vocab",
    "train_flops_per_pair",
    "words",
    "write_data",
]

RESPONSE_TOKENS = 128
PROMPT_WORDS = 8
# mmpo's DEFAULT_LORA_TARGETS, repeated here so the TRL child never imports mmpo (or Lightning) and its
# peak memory holds TRL's own footprint only; tests/test_bench_smoke.py checks the two are equal.
LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


@dataclass(frozen=True)
class Preset:
    """One model size, its data geometry and the batch per image count.

    Attributes:
        batch: pairs per step, by images per prompt.
        device: ``cpu`` or ``cuda``.
        dtype: weights' dtype at load time (bf16 runs use autocast in both frameworks).
        vocab_words: synthetic words in the tokenizer (plus 8 special/template tokens).
        model_vocab: the LM's vocabulary size, None for the tokenizer's (a larger one leaves rows unused,
            as real checkpoints do, but costs the full LM-head width).
    """

    name: str
    device: str
    dtype: str
    batch: dict[int, int]
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_ff: int
    text_width: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ff: int
    vocab_words: int = 2000
    model_vocab: int | None = None
    family: str = "llama"  # "llama" (build_tiny_llava), "qwen2" (LLaVA with a Qwen2 LM) or "qwen2_vl" (Qwen2-VL)
    vision_feature_layer: int = -1
    tied_embeddings: bool = False
    notes: str = ""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            device="cpu",
            dtype="float32",
            batch={1: 4, 3: 4},
            image_size=64,
            patch_size=8,
            vision_width=64,
            vision_layers=2,
            vision_heads=4,
            vision_ff=128,
            text_width=128,
            text_layers=4,
            text_heads=4,
            text_kv_heads=4,
            text_ff=256,
            notes="2-layer CLIP width 64, 64 px / patch 8 (64 image tokens); 4-layer Llama width 128",
        ),
        Preset(
            name="tiny-qwen2vl",
            device="cpu",
            dtype="float32",
            batch={1: 4, 3: 4},
            image_size=32,
            patch_size=8,  # 4-pixel patches merged 2 x 2: 16 image tokens, as 8-pixel patches count them
            vision_width=32,
            vision_layers=1,
            vision_heads=2,
            vision_ff=64,
            text_width=64,
            text_layers=2,
            text_heads=4,
            text_kv_heads=2,
            text_ff=128,
            family="qwen2_vl",
            notes="mmpo.tiny.families' Qwen2-VL (multimodal rotary positions): 32 px images, 16 tokens each; "
            "1-layer tower width 32; 2-layer LM width 64",
        ),
        Preset(
            name="cpu-real",
            device="cpu",
            dtype="float32",
            batch={1: 2, 3: 2},
            image_size=336,
            patch_size=14,
            vision_width=64,
            vision_layers=2,
            vision_heads=4,
            vision_ff=128,
            text_width=256,
            text_layers=4,
            text_heads=4,
            text_kv_heads=4,
            text_ff=512,
            notes="336 px / patch 14 (576 image tokens); 2-layer vision width 64; 4-layer Llama width 256",
        ),
        Preset(
            name="small",
            device="cuda",
            dtype="bfloat16",
            batch={1: 8, 3: 4},
            image_size=336,
            patch_size=14,
            vision_width=1024,
            vision_layers=24,
            vision_heads=16,
            vision_ff=4096,
            text_width=896,
            text_layers=24,
            text_heads=14,
            text_kv_heads=2,
            text_ff=4864,
            model_vocab=151_936,
            family="qwen2",
            vision_feature_layer=-2,
            tied_embeddings=True,
            notes="CLIP-L/14-336-like tower; Qwen2-0.5B-like LM (vocab 151,936); bf16",
        ),
    )
}


def words(n: int) -> list[str]:
    """The synthetic vocabulary: ``w0000``, ``w0001``, ..."""
    return [f"w{i:04d}" for i in range(n)]


def build_model(preset: Preset, root: Path) -> Path:
    """Write (or reuse) the preset's random-init LLaVA checkpoint and processor under ``root``."""
    from mmpo.tiny.llava import build_tiny_llava

    out = root / preset.name / "model"
    if preset.family == "llama":
        return build_tiny_llava(
            out,
            words=words(preset.vocab_words),
            image_size=preset.image_size,
            patch_size=preset.patch_size,
            vision_width=preset.vision_width,
            vision_layers=preset.vision_layers,
            text_width=preset.text_width,
            text_layers=preset.text_layers,
            heads=preset.text_heads,
            seed=0,
        )
    if preset.family == "qwen2_vl":
        from mmpo.tiny.families import build_tiny_qwen2_vl

        return build_tiny_qwen2_vl(out, words=words(preset.vocab_words), seed=0)
    return _build_qwen2_llava(preset, out)


def _build_qwen2_llava(preset: Preset, out: Path) -> Path:
    """A LLaVA with a CLIP tower and a Qwen2 language model, at the preset's sizes (bf16 on disk)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from mmpo.tiny.llava import build_tiny_processor

    stamp = out / "bench_preset.json"
    settings = {"version": 1, **asdict(preset)}
    settings["batch"] = {str(k): v for k, v in preset.batch.items()}
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out
    processor = build_tiny_processor(words(preset.vocab_words), preset.image_size, preset.patch_size)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=preset.vision_width,
            intermediate_size=preset.vision_ff,
            num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads,
            image_size=preset.image_size,
            patch_size=preset.patch_size,
            projection_dim=768,
        ),
        text_config=Qwen2Config(
            vocab_size=preset.model_vocab or len(tok),
            hidden_size=preset.text_width,
            intermediate_size=preset.text_ff,
            num_hidden_layers=preset.text_layers,
            num_attention_heads=preset.text_heads,
            num_key_value_heads=preset.text_kv_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=preset.tied_embeddings,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=preset.vision_feature_layer,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=preset.tied_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(getattr(torch, preset.dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "bench_preset.json").write_text(json.dumps(settings, indent=1))
    return out


def _image(size: int, rng: random.Random):
    """A smooth random RGB image (a coarse random grid, resized): PNG-compressible, like a photo."""
    from PIL import Image

    grid = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
    return grid.resize((size, size), Image.BILINEAR)


def write_data(preset: Preset, images: int, n_pairs: int, root: Path, seed: int = 0) -> Path:
    """Write ``n_pairs`` records with ``images`` PNGs each; returns the JSONL path (reused if present).

    Records are conversational, with string contents, so TRL inserts the image placeholders before
    the user text and mmpo does the same (images first in the first user turn).
    """
    out = root / preset.name / f"data-{images}img-{n_pairs}"
    jsonl = out / "train.jsonl"
    if jsonl.exists():
        return jsonl
    rng = random.Random(seed)
    vocab = words(preset.vocab_words)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_pairs):
        paths = []
        for j in range(images):
            rel = f"images/{i:05d}_{j}.png"
            _image(preset.image_size, rng).save(out / rel)
            paths.append(rel)
        prompt = " ".join(rng.choices(vocab, k=PROMPT_WORDS))
        # 127 words; the chat template (TRL) or the collator (mmpo) adds </s>: 128 response tokens.
        chosen, rejected = (" ".join(rng.choices(vocab, k=RESPONSE_TOKENS - 1)) for _ in range(2))
        record = {
            "id": f"pair-{i:05d}",
            "images": paths,
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        lines.append(json.dumps(record))
    atomic_write_text(jsonl, "\n".join(lines) + "\n")
    return jsonl


def model_vocab(model_dir: Path) -> int:
    """The language model's vocabulary size, from the checkpoint's config."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


def train_flops_per_pair(preset: Preset, images: int, prompt_tokens: int, shared_prefix: bool, vocab: int) -> float:
    """Estimated FLOPs of one DPO training pair (LoRA, reference = disabled adapter).

    Counts matrix multiplies only (2 FLOPs a multiply-add): the frozen vision tower and projector run
    forward in the policy and in the reference pass (no backward: nothing upstream of the language
    model needs a gradient); the language model runs forward twice (policy, reference) and backward
    once with activation gradients only (its base weights are frozen: no weight gradients), with
    attention's backward counted twice its forward; LoRA adds its own forward, and input and weight
    gradients; the LM head runs on response positions only (both frameworks skip the others), with
    an input gradient in the backward. With ``shared_prefix`` the prompt (and its images) runs once per
    pair and model, otherwise once per response. Elementwise work (norms, softmax, rotary) is left out.
    """
    p, r = prompt_tokens, RESPONSE_TOKENS
    dv, fv, nv = preset.vision_width, preset.vision_ff, preset.image_tokens + 1  # +1: the CLS token
    vision = preset.vision_layers * (nv * (4 * dv * dv + 2 * dv * fv) + 2 * nv * nv * dv)
    vision += nv * 3 * preset.patch_size**2 * dv  # patch embedding
    d, f = preset.text_width, preset.text_ff
    kv = d * preset.text_kv_heads // preset.text_heads
    projector = preset.image_tokens * (dv * d + d * d)
    linear = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o, k, v, gate, up, down: MACs per token per layer
    lora = LORA["r"] * (2 * d + 2 * d + 2 * (d + kv) + 3 * (d + f))

    def segment(n_tokens: int, context_before: int) -> tuple[float, float, float]:
        """(linear, attention, lora) MACs of n tokens after a cached context, over all layers."""
        attn = 2 * d * (n_tokens * context_before + n_tokens * (n_tokens + 1) / 2)
        return preset.text_layers * n_tokens * linear, preset.text_layers * attn, preset.text_layers * n_tokens * lora

    prompt_runs = 1 if shared_prefix else 2
    media = prompt_runs * images * (vision + projector)
    pl, pa, plo = segment(p, 0)
    rl, ra, rlo = segment(r, p)
    lin = prompt_runs * pl + 2 * rl
    att = prompt_runs * pa + 2 * ra
    lo = prompt_runs * plo + 2 * rlo
    head = 2 * r * d * vocab
    forward_ref = media + lin + att + head
    forward_policy = forward_ref + lo
    backward = lin + 2 * att + head + 2 * lo
    return 2.0 * (forward_policy + forward_ref + backward)
