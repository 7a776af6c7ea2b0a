"""LLaVA-style vision-language backbones loaded through transformers' auto classes."""

from __future__ import annotations

import contextlib
import os
import re
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datamodules.vision_text.collator import TOKEN_ALIGNED_MEDIA
from mmpo.backbones.adapters import adapters_disabled
from mmpo.backbones.media_reuse import media_features_shareable, reuse_media_features
from mmpo.backbones.module_scan import modules_found_once
from mmpo.backbones.protocol import Backbone
from mmpo.backbones.quantization import QuantizationSettings
from mmpo.backbones.shared_prefix import (
    checkpointing_fallback_reason,
    logit_head,
    shared_prefix_supported,
    shared_prefix_token_logps,
)
from mmpo.logprobs import response_logprobs, response_logprobs_from_hidden
from mmpo.losses.base import ResponseStats

__all__ = ["DEFAULT_LORA_TARGETS", "LoraSettings", "VisionLanguageBackbone", "in_vision_tower"]

# The language model's attention and MLP projections, not the vision tower's or the projector's: the
# language model is ``language_model`` (LLaVA, Qwen2-VL, Gemma 3, Llama 3.2 Vision, ...) or ``text_model``
# (Idefics3). docs/models.md lists what it adapts per family.
DEFAULT_LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

_VISION_PATTERNS = ("vision_tower", "visual", "vision_model", "image_encoder")
_PROJECTOR_PATTERNS = ("multi_modal_projector", "visual.merger", "mm_projector")
# per-token inputs the shared prompt pass cuts to the prompts (the responses are text, which they leave out)
_SPLIT_INPUTS = frozenset({"mm_token_type_ids", "token_type_ids", "cross_attention_mask"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def in_vision_tower(name: str) -> bool:
    """Whether a parameter ``name`` is the vision encoder's (its projector, even where inside it, is not)."""
    return any(s in name for s in _VISION_PATTERNS) and not any(s in name for s in _PROJECTOR_PATTERNS)


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on in ``model``: asked on every forward, so kept cheap.

    transformers' ``is_activation_checkpointing`` walks every module on each read (milliseconds per
    call); the modules that carry a ``gradient_checkpointing`` flag are found once per model and their
    flags read on each call, so turning checkpointing on or off later is still seen.
    """
    flagged = modules_found_once(model, "_mmpo_checkpointing_flags", lambda m: hasattr(m, "gradient_checkpointing"))
    return any(m.gradient_checkpointing for m in flagged)


class LoraSettings:
    """LoRA adapter settings (passed to ``peft.LoraConfig``).

    Args:
        r: rank.
        alpha: scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: a regex over full module names, or a list of module-name suffixes.
        modules_to_save: modules trained in full next to the adapter (e.g. ``["multi_modal_projector"]``).
    """

    def __init__(
        self,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = DEFAULT_LORA_TARGETS,
        modules_to_save: list[str] | None = None,
    ) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.modules_to_save = modules_to_save

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            bias="none",
        )


class VisionLanguageBackbone(Backbone):
    """How to load a vision-language model and compute response log-probs with it.

    Not a module itself: ``build()`` returns the policy (a transformers model, wrapped by peft when
    ``lora`` is set), which the Lightning module registers as its submodule.

    Args:
        model_name_or_path: hub id (e.g. ``llava-hf/llava-1.5-7b-hf``) or local checkpoint directory.
        lora: LoRA settings; None trains the full model (vision tower frozen unless told otherwise).
        freeze_vision_tower: keep the vision encoder frozen.
        freeze_projector: keep the vision-to-language projector frozen (full fine-tuning only).
        dtype: weights' dtype at load time.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2`` or None for the default.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow custom model code from the hub (off by default).
        revision: hub revision (branch, tag or commit).
        logprob_chunk_size: positions projected through the LM head at once.
        shared_prefix: run each group's prompt and images once and its K responses on its key/value
            cache (same losses and gradients as running the prompt K times), with or without gradient
            checkpointing. Falls back to the naive path, with a one-time notice, for groups whose
            responses see different media, a scaled LM head (``logit_scale``) or per-token inputs other
            than Qwen2-VL's, Gemma 3's and PaliGemma's token types and Llama 3.2 Vision's cross-attention
            mask, and under reentrant checkpointing (``use_reentrant=True``, not mmpo's setting).
            Multimodal rotary positions (Qwen2-VL, Qwen2.5-VL) are continued over the responses;
            PaliGemma 2's soft-capped head is applied as its forward applies it, and its prompt attends
            bidirectionally in the prompt pass; Llama 3.2 Vision's cross-attention layers keep the
            prompt's image keys and values in the cache for the responses.
        quantization: load the frozen base in 4 or 8 bits (QLoRA, through bitsandbytes); needs ``lora``.
            The reference is then the quantized base with the adapter off; ``mmpo export`` merges the
            adapter into the base loaded in ``dtype``, not into the quantized weights.
        pack_responses: on the shared-prefix path, run a group's K responses in one row under a
            block mask on the prompt's cache (``True``), or on the cache repeated for each
            (``False``). None (default) packs with ``sdpa``/``eager`` attention and no
            sliding-window layers when the prompt is at least twice the longest response, where
            saving the cache copies outweighs the attention between the two responses.
    """

    def __init__(
        self,
        model_name_or_path: str,
        lora: LoraSettings | None = None,
        freeze_vision_tower: bool = True,
        freeze_projector: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        logprob_chunk_size: int = 1024,
        shared_prefix: bool = True,
        pack_responses: bool | None = None,
        quantization: QuantizationSettings | None = None,
    ) -> None:
        if quantization is not None and lora is None:
            raise ValueError(
                "backbone.quantization trains adapters on a frozen quantized base: set backbone.lora too "
                "(a 4/8-bit model cannot be fine-tuned in full)"
            )
        self.model_name_or_path = model_name_or_path
        self.lora = lora
        self.freeze_vision_tower = freeze_vision_tower
        self.freeze_projector = freeze_projector
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.logprob_chunk_size = logprob_chunk_size
        self.shared_prefix = shared_prefix
        self.pack_responses = pack_responses
        self.quantization = quantization
        self._fallback_noted: set[str] = set()

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None

    def load_pretrained(self, model_name_or_path: str | None = None, revision: str | None = None) -> nn.Module:
        """``AutoModelForImageTextToText.from_pretrained`` with this backbone's settings.

        Args:
            model_name_or_path: another checkpoint to load with the same settings (default: this
                backbone's).
            revision: its hub revision (default: this backbone's, for its own checkpoint).
        """
        from transformers import AutoModelForImageTextToText

        if model_name_or_path is None:
            model_name_or_path, revision = self.model_name_or_path, self.revision
        kwargs: dict[str, Any] = {"dtype": _DTYPES[self.dtype], "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if revision:
            kwargs["revision"] = revision
        if self.quantization is not None:
            kwargs["quantization_config"] = self.quantization.transformers_config()
        return AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)

    def build(self) -> nn.Module:
        """Load the model, freeze what should stay frozen, and attach LoRA if configured."""
        model = self.load_pretrained()
        if self.quantization is not None:
            model = self.quantization.prepare(model)
        for name, p in model.named_parameters():
            if self.freeze_vision_tower and in_vision_tower(name):
                p.requires_grad_(False)
            if self.freeze_projector and any(s in name for s in _PROJECTOR_PATTERNS):
                p.requires_grad_(False)
        if self.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if self.lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, self.lora.peft_config())
            matched = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
            if not matched:
                raise ValueError(f"LoRA target_modules {self.lora.target_modules!r} matched no module of the model")
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The transformers model under a peft wrapper (LoRA layers stay injected)."""
        get_base = getattr(model, "get_base_model", None)
        return get_base() if callable(get_base) else model

    def adapters_disabled(self, model: nn.Module) -> AbstractContextManager:
        """The LoRA adapters switched off inside the block (for passes under ``torch.no_grad()``)."""
        if not self.uses_lora:
            raise ValueError("the adapter-disabled reference needs a LoRA backbone (set backbone.lora)")
        return adapters_disabled(model)

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        if self.quantization is not None:
            raise ValueError(
                "a frozen copy of a quantized model is not supported: with backbone.quantization use the "
                "disabled-adapter reference (reference: adapter, the default), cached or separate-checkpoint one"
            )
        return super().frozen_copy(model)

    def load_reference(self, model_name_or_path: str, revision: str | None = None) -> nn.Module:
        ref = self.load_pretrained(model_name_or_path, revision).eval()
        ref.requires_grad_(False)
        return ref

    def media_shareable(self, model: nn.Module) -> bool:
        # frozen, adapter-free media encoders give the policy and the reference the same features
        return media_features_shareable(model)

    def media_reuse(self, model: nn.Module) -> AbstractContextManager:
        inner = getattr(self.unwrap(model), "model", None)
        return reuse_media_features(inner) if inner is not None else contextlib.nullcontext()

    def fingerprint_settings(self) -> dict[str, Any]:
        modules_to_save = self.lora.modules_to_save if self.lora is not None else None
        settings: dict[str, Any] = {"dtype": self.dtype, "modules_to_save": modules_to_save}
        if self.quantization is not None:  # absent otherwise: unquantized caches keep their fingerprints
            settings["quantization"] = self.quantization.fingerprint()
        return settings

    def statistics(self, model: nn.Module, batch: Any) -> ResponseStats:
        """Summed and per-token response log-probs (B, K) and (B, K, T) of ``model`` on ``batch``."""
        return ResponseStats.from_rows(self.token_logps(model, batch), batch.response_mask, batch.group_size)

    def token_logps(self, model: nn.Module, batch: Any) -> Tensor:
        """Response-token log-probs (N, T) in the row layout of a :class:`~datamodules.core.batch.PreferenceBatch`.

        Runs the inner model to its last hidden state and projects only response positions through
        the LM head, so no (2B, T, V) logits tensor is formed; a soft-capped head (Gemma 2's
        ``final_logit_softcapping``) is capped per chunk. Models with a scaled head (``logit_scale``) take
        the full-logits path.
        """
        base = self.unwrap(model)
        if self.shared_prefix:
            reason = self._naive_reason(base, batch)
            if reason is None:
                return shared_prefix_token_logps(
                    base, batch, pad_id=0, chunk_size=self.logprob_chunk_size, pack_responses=self.pack_responses
                )
            if reason not in self._fallback_noted:
                self._fallback_noted.add(reason)
                rank_zero_info(f"[mmpo] shared-prefix forward off: {reason}; running prompts once per response")
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
        inner = getattr(base, "model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        text_cfg = getattr(base.config, "text_config", base.config)
        if inner is not None and head is not None and not getattr(text_cfg, "logit_scale", None):
            hidden = inner(**inputs, use_cache=False).last_hidden_state  # (N, T, H)
            return response_logprobs_from_hidden(
                hidden,
                logit_head(base),
                batch.input_ids,
                batch.response_mask,
                self.logprob_chunk_size,
                batch.host_lengths(),
            )
        logits = base(**inputs, use_cache=False).logits  # (N, T, V)
        return response_logprobs(logits, batch.input_ids, batch.response_mask, self.logprob_chunk_size)

    def response_hidden(
        self, model: nn.Module, batch: Any, layers: bool = False
    ) -> tuple[Tensor, Tensor, nn.Module, Tensor] | tuple[Tensor, Tensor, nn.Module, Tensor, Tensor]:
        """Final hidden states at the positions that predict each row's response tokens, the LM head, and
        the response-token log-probs of the same pass.

        Rows run through the naive path (each row its own prompt and media), so this serves batches whose
        responses see different media (online video negatives); the log-probs are those
        :meth:`token_logps` computes on that path, so a caller may use them as the model's statistics.

        Args:
            model: the policy, or the reference's model.
            batch: the preference batch.
            layers: also return every decoder layer's output at the same positions (SparsePO's learned
                masks read them).

        Returns:
            ``(hidden (N, R, H), mask (N, R), head, token_logps (N, T))``: position j of row i predicts
            response token j (R the longest response; mask False past a row's end); with ``layers``, a
            fifth element (N, L, R, H): the L decoder layers' outputs (the model's ``hidden_states`` after
            the embeddings) at those positions.
        """
        base = self.unwrap(model)
        inner, head = getattr(base, "model", None), base.get_output_embeddings()
        text_cfg = getattr(base.config, "text_config", base.config)
        if inner is None or head is None or any(getattr(text_cfg, a, None) for a in ("final_logit_softcapping",)):
            raise ValueError(f"{type(base).__name__}: response hidden states need an inner model and a plain LM head")
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
        out = inner(**inputs, use_cache=False, output_hidden_states=layers)
        hidden = out.last_hidden_state  # (N, T, H)
        prompts, counts = batch.host_lengths()
        token_logps = response_logprobs_from_hidden(
            hidden, head, batch.input_ids, batch.response_mask, self.logprob_chunk_size, (prompts, counts)
        )  # (N, T)
        r = max(counts) if counts else 0
        offsets = torch.arange(r, device=hidden.device)  # (R,)
        starts = torch.tensor(prompts, device=hidden.device) - 1  # the prompt's last token predicts token 0
        positions = (starts[:, None] + offsets[None]).clamp(max=hidden.shape[1] - 1)  # (N, R)
        mask = offsets[None] < torch.tensor(counts, device=hidden.device)[:, None]  # (N, R)
        index = positions[..., None].expand(-1, -1, hidden.shape[-1])  # (N, R, H)
        picked = hidden.gather(1, index)  # (N, R, H)
        if not layers:
            return picked, mask, head, token_logps
        per_layer = torch.stack([h.gather(1, index) for h in out.hidden_states[1:]], dim=1)  # (N, L, R, H)
        return picked, mask, head, token_logps, per_layer

    @staticmethod
    def _naive_reason(base: nn.Module, batch: Any) -> str | None:
        if not getattr(batch, "shared_prompt", False):
            return "the responses of a group see different media"
        name = type(base).__name__
        if not shared_prefix_supported(base):
            return f"{name} is not supported (a scaled LM head, or no inner model)"
        if per_token := sorted(key for key in batch.media if key in TOKEN_ALIGNED_MEDIA and key not in _SPLIT_INPUTS):
            return f"the per-token inputs {', '.join(per_token)} are not split between prompt and responses"
        if base.training and torch.is_grad_enabled() and _checkpointing(base):
            return checkpointing_fallback_reason(base)
        return None

    def save(self, model: nn.Module, out_dir: str | os.PathLike) -> None:
        """Save the adapter (LoRA) or the full model, plus the processor, in standard HF format.

        Only the trained adapter is written: a frozen snapshot adapter (the refreshed reference of
        ``mmpo.iterative``) lives in the callback's checkpoint state, not in the export.
        """
        from peft import PeftModel

        if isinstance(model, PeftModel):
            from mmpo.reference.adapter_snapshot import SNAPSHOT_ADAPTER

            model.save_pretrained(out_dir, selected_adapters=[n for n in model.peft_config if n != SNAPSHOT_ADAPTER])
        else:
            model.save_pretrained(out_dir)
        try:
            from transformers import AutoProcessor

            AutoProcessor.from_pretrained(
                self.model_name_or_path, trust_remote_code=self.trust_remote_code, revision=self.revision
            ).save_pretrained(out_dir)
        except (OSError, ValueError):  # a model without a processor: the weights alone are still complete
            pass

    def describe(self, model: nn.Module) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        kind = f"LoRA r={self.lora.r}" if self.lora else "full fine-tuning"
        if self.quantization is not None:
            kind = f"Q{kind} on a {self.quantization.bits}-bit base"
        name = re.sub(r"^.*/", "", str(self.model_name_or_path).rstrip("/"))
        return f"{name}: {kind}, {trainable:,} trainable of {total:,} parameters"
