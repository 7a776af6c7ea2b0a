import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mmpo.backbones.adapters import adapters_disabled


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora_net() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)  # peft starts B at zero: make the adapter change the output
    return model


def test_disabled_adapters_give_the_base_model_and_come_back_on():
    model = _lora_net()
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            base = model(x)
        with adapters_disabled(model):
            fast = model(x)
        after = model(x)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(fast, base, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the cached layer list is not a submodule: the state dict is unchanged
    assert all("_mmpo" not in k for k in model.state_dict())


def test_adapters_come_back_on_after_an_error_and_nested_use():
    model = _lora_net()
    x = torch.randn(2, 8)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            base = model(x)
        assert not torch.allclose(adapted, base)
        inside = []
        with pytest.raises(RuntimeError, match="inside"):
            with adapters_disabled(model):
                with adapters_disabled(model):
                    inside.append(model(x))
                inside.append(model(x))  # leaving the inner block keeps the outer one's adapters off
                raise RuntimeError("inside")
        for out in inside:
            torch.testing.assert_close(out, base, rtol=0, atol=0)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)  # back on after the error


def test_adapters_disabled_serves_the_original_module_to_save_like_peft():
    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["up"], modules_to_save=["down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()  # a trained adapter and a trained copy of the output layer
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any("modules_to_save" in n and g for n, g in grads.items())
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            base = model(x)
        with adapters_disabled(model):
            fast = model(x)
            with adapters_disabled(model):
                inner = model(x)
            after_inner = model(x)  # leaving a nested block keeps the outer one's adapters off
        after = model(x)
    assert (adapted - base).abs().max() > 0.1
    for out in (fast, inner, after_inner):
        torch.testing.assert_close(out, base, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # gradients' switches untouched
