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


def _lora_net(modules_to_save: list[str] | None = None) -> nn.Module:
    """LoRA on ``up`` (and ``down`` unless it is a module to save, trained in full)."""
    torch.manual_seed(0)
    targets = ["up"] if modules_to_save else ["up", "down"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=modules_to_save)
    model = get_peft_model(_Net(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()  # peft starts B at zero (and the copy at the base): make them change the output
    return model


@pytest.mark.parametrize("modules_to_save", [None, ["down"]], ids=["lora", "lora+modules_to_save"])
def test_disabled_adapters_give_the_base_model_like_peft_and_come_back_on(modules_to_save):
    # peft's own context also switches the modules-to-save copies to their original module
    model = _lora_net(modules_to_save)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
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
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable) == bool(modules_to_save)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # gradients' switches untouched
    # the cached layer list is not a submodule: the state dict is unchanged
    assert all("_mmpo" not in k for k in model.state_dict())


@pytest.mark.parametrize("modules_to_save", [None, ["down"]], ids=["lora", "lora+modules_to_save"])
def test_adapters_come_back_on_after_an_error_and_nested_use(modules_to_save):
    model = _lora_net(modules_to_save)
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
