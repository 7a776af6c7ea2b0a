"""TLPO's expert fusion and timestep–layer gate (mmpo.backbones.experts, expert_io) on tiny modules.

The gate's weights against a hand computation of its formula, the fused layer output against
W·x + Σ wᵢ ΔWᵢ·x computed by hand and against peft's own multi-adapter forward (static weights), the
experts frozen while the gate trains, save/load round trips and the errors for unknown experts and a
gate trained against other experts; the same fusion on a tiny Wan 2.1 transformer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402

from mmpo.backbones.expert_io import add_expert, load_expert, load_tlpo, save_expert, save_gate  # noqa: E402
from mmpo.backbones.experts import (  # noqa: E402
    GateSettings,
    StaticMix,
    TimestepLayerGate,
    attach_fusion,
    detach_fusion,
    timestep_embedding,
)


class TinyDenoiser(nn.Module):
    """Two Linear projections called with a timestep, like a diffusers denoiser."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(4, 3)
        self.ff = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.ff(self.to_q(x))


def with_experts(seed: int = 0) -> TinyDenoiser:
    """Experts ``a`` (r=2, alpha=4: scaling 2) and ``b`` (r=1, alpha=1: scaling 1) on both layers, B random."""
    torch.manual_seed(seed)
    model = TinyDenoiser().requires_grad_(False)
    add_expert(model, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "ff"]), "a")
    add_expert(model, LoraConfig(r=1, lora_alpha=1, target_modules=["to_q", "ff"]), "b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return model


def delta(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """ΔW·x by hand: scaling · x Aᵀ Bᵀ."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * x @ a.T @ b.T


def test_gate_weights_follow_the_documented_formula_by_hand():
    # D = 2: e(t) = [cos t, sin t] (one frequency, 1); E = 2 experts, G = 1 gate
    gate = TimestepLayerGate(1, 2, GateSettings(embed_dim=2, bias="after_softmax"))
    with torch.no_grad():
        gate.proj_weight.copy_(torch.tensor([[[1.0, -2.0], [0.5, 3.0]]]))
        gate.proj_bias.copy_(torch.tensor([[0.1, -0.3]]))
        gate.bias.copy_(torch.tensor([[0.2, -0.05]]))
    t = 3.0
    z = [1.0 * math.cos(t) - 2.0 * math.sin(t) + 0.1, 0.5 * math.cos(t) + 3.0 * math.sin(t) - 0.3]
    soft = [math.exp(v) / (math.exp(z[0]) + math.exp(z[1])) for v in z]
    w = gate(torch.tensor([t, t]))  # (N=2, G=1, E=2)
    assert w.shape == (2, 1, 2)
    torch.testing.assert_close(w[0, 0], torch.tensor([soft[0] + 0.2, soft[1] - 0.05]))
    assert w[0, 0].sum().item() == pytest.approx(1.0 + 0.2 - 0.05, abs=1e-6)  # 1 + Σ bias
    inside = TimestepLayerGate(1, 2, GateSettings(embed_dim=2, bias="inside_softmax"))
    inside.load_state_dict(gate.state_dict())
    zi = [z[0] + 0.2, z[1] - 0.05]
    want = torch.tensor([math.exp(v) / (math.exp(zi[0]) + math.exp(zi[1])) for v in zi])
    torch.testing.assert_close(inside(torch.tensor([t]))[0, 0], want)
    renorm = TimestepLayerGate(1, 2, GateSettings(embed_dim=2, renormalize=True))
    renorm.load_state_dict(gate.state_dict())
    got = renorm(torch.tensor([t]))[0, 0]
    torch.testing.assert_close(got, torch.tensor([soft[0] + 0.2, soft[1] - 0.05]) / (1.15))
    # the embedding is diffusers' sinusoidal form: cos then sin
    torch.testing.assert_close(timestep_embedding(torch.tensor([t]), 2), torch.tensor([[math.cos(t), math.sin(t)]]))


def test_gate_starts_at_the_equal_merge_depends_on_t_and_stays_finite_at_extremes():
    gate = TimestepLayerGate(3, 4, GateSettings(embed_dim=8))
    w = gate(torch.tensor([0.0, 999.0]))
    torch.testing.assert_close(w, torch.full((2, 3, 4), 0.25))  # init_std 0, bias 0: 1/E everywhere
    with torch.no_grad():
        gate.proj_weight.normal_(0, 1)
    w = gate(torch.tensor([0.0, 999.0]))
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[:, 0], w[:, 1])  # per t and per layer
    with torch.no_grad():
        gate.proj_weight.fill_(1e4)
    extreme = gate(torch.tensor([1e4, -1e4]))
    assert torch.isfinite(extreme).all() and torch.allclose(extreme.sum(-1), torch.ones(2, 3))
    static = TimestepLayerGate(3, 2, GateSettings(per_layer=False, timestep=False))
    assert static.proj_weight is None and static(torch.tensor([1.0, 500.0])).shape == (2, 1, 2)


def test_fused_output_is_base_plus_weighted_expert_deltas_by_hand():
    model = with_experts()
    gate = TimestepLayerGate(2, 2, GateSettings(embed_dim=4, init_std=1.0))
    fusion = attach_fusion(model, ["a", "b"], gate)
    assert fusion.layers == ["to_q", "ff"]
    x, t = torch.randn(3, 5, 4), torch.tensor([5.0, 400.0, 900.0])
    out = model(x, timestep=t)
    w = gate(t).detach()  # (3, 2 layers, 2 experts)
    q = model.to_q
    hq = q.base_layer(x) + sum(w[:, 0, i, None, None] * delta(q, e, x) for i, e in enumerate("ab"))
    f = model.ff
    want = f.base_layer(hq) + sum(w[:, 1, i, None, None] * delta(f, e, hq) for i, e in enumerate("ab"))
    torch.testing.assert_close(out, want)
    # one timestep for all rows (a pipeline's scalar t) broadcasts; a wrong count is refused
    torch.testing.assert_close(model(x[:1], timestep=torch.tensor(5.0)), out[:1])
    with pytest.raises(ValueError, match="sees 3 input rows but the denoiser was called with 2 timesteps"):
        model(x, timestep=t[:2])
    # the adapters disabled (the reference pass): the base layers only
    for layer in (q, f):
        layer.enable_adapters(False)
    torch.testing.assert_close(model(x, timestep=t), f.base_layer(q.base_layer(x)))


def test_static_merge_equals_peft_multi_adapter_forward_and_one_hot_is_one_expert():
    x, t = torch.randn(2, 4), torch.tensor([1.0, 2.0])
    reference = with_experts()
    for layer in (reference.to_q, reference.ff):  # peft's own: both adapters active, each scaled by its weight
        layer.set_adapter(["a", "b"])
        layer.set_scale("a", 0.3)
        layer.set_scale("b", 0.7)
    fused = with_experts()
    attach_fusion(fused, ["a", "b"], StaticMix([0.3, 0.7]))
    torch.testing.assert_close(fused(x, timestep=t), reference(x, timestep=t))
    alone = with_experts()
    for layer in (alone.to_q, alone.ff):
        layer.set_adapter(["b"])
    one_hot = with_experts()
    attach_fusion(one_hot, ["a", "b"], StaticMix([0.0, 1.0]))
    torch.testing.assert_close(one_hot(x, timestep=t), alone(x, timestep=t))
    detach_fusion(one_hot)  # peft's forward again: its active adapter (b, the last added)
    torch.testing.assert_close(one_hot(x, timestep=t), alone(x, timestep=t))


def test_no_gradient_reaches_the_experts_while_the_gate_trains():
    model = with_experts()
    gate = TimestepLayerGate(2, 2, GateSettings(embed_dim=4))
    attach_fusion(model, ["a", "b"], gate)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tlpo_fusion.mixer.proj_weight", "tlpo_fusion.mixer.proj_bias", "tlpo_fusion.mixer.bias"}
    model(torch.randn(3, 4), timestep=torch.tensor([1.0, 50.0, 900.0])).square().sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_experts_and_gate_round_trip_through_their_files(tmp_path):
    model = with_experts()
    digests = [save_expert(model, name, tmp_path / name) for name in ("a", "b")]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
    gate = TimestepLayerGate(2, 2, GateSettings(embed_dim=4, init_std=1.0, bias_init=0.1))
    fusion = attach_fusion(model, ["a", "b"], gate)
    save_gate(fusion, digests, tmp_path / "gate")
    x, t = torch.randn(3, 4), torch.tensor([3.0, 300.0, 700.0])
    torch.manual_seed(0)
    fresh = TinyDenoiser()  # the same base weights as with_experts(seed 0), no adapter
    loaded = load_tlpo(fresh, tmp_path / "gate")  # experts from the gate folder's parent
    assert loaded.experts == ["a", "b"] and not any(p.requires_grad for p in fresh.parameters())
    torch.testing.assert_close(fresh(x, timestep=t), model(x, timestep=t))
    info = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert [e["name"] for e in info["experts"]] == ["a", "b"] and info["settings"]["bias_init"] == 0.1


def test_unknown_expert_and_a_gate_trained_against_other_experts_are_refused(tmp_path):
    model = with_experts()
    with pytest.raises(ValueError, match=r"TimestepLayerGate gives weights \(1, 3, 2\), not \(N, 2 or 1, 2\)"):
        attach_fusion(model, ["a", "b"], TimestepLayerGate(3, 2, GateSettings()))  # sized for other layers
    with pytest.raises(ValueError, match=r"StaticMix gives weights \(1, 1, 3\)"):
        attach_fusion(model, ["a", "b"], StaticMix([0.2, 0.3, 0.5]))  # one weight too many
    digests = [save_expert(model, name, tmp_path / name) for name in ("a", "b")]
    save_gate(attach_fusion(model, ["a", "b"], StaticMix([0.5, 0.5])), digests, tmp_path / "gate")
    with pytest.raises(FileNotFoundError, match=r"no saved expert 'c'.*saved there: \['a', 'b'\]"):
        load_expert(TinyDenoiser(), tmp_path, "c")
    other = with_experts(seed=1)  # expert b retrained: other weights under the same name
    save_expert(other, "b", tmp_path / "b")
    with pytest.raises(ValueError, match=r"gate\.json: expert 'b' differs from the one the gate was trained against"):
        load_tlpo(TinyDenoiser(), tmp_path / "gate")
    swapped = tmp_path / "gate" / "gate.json"
    info = json.loads(swapped.read_text())
    info["experts"].reverse()
    swapped.write_text(json.dumps(info))
    from mmpo.backbones.expert_io import load_gate

    with pytest.raises(ValueError, match=r"gate\.json: the gate was trained against experts \['b', 'a'\], not"):
        load_gate(tmp_path / "gate", ["a", "b"], digests, ["to_q", "ff"])


def test_fusion_works_on_a_tiny_wan_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).requires_grad_(False)  # fmt: skip
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    for name in ("motion", "lip_sync"):
        add_expert(wan, LoraConfig(r=2, lora_alpha=2, target_modules=targets), name)
    with torch.no_grad():
        for n, p in wan.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    x, enc, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 16), torch.tensor([10, 900])

    def run() -> torch.Tensor:
        return wan(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]

    wan.set_adapters(["lip_sync"])  # peft's forward with one expert: the reference for the one-hot weights
    alone = run()
    fusion = attach_fusion(wan, ["motion", "lip_sync"], StaticMix([0.0, 1.0]))
    assert len(fusion.layers) == 10  # attn1, attn2 (q, k, v, out) and the two FFN projections
    torch.testing.assert_close(run(), alone)
    fusion.set_mixer(TimestepLayerGate(len(fusion.layers), 2, GateSettings(embed_dim=8, init_std=1.0)))
    run().square().mean().backward()
    assert fusion.mixer.proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in wan.named_parameters() if "lora_" in n)
