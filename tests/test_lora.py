"""lora.add_adapters / merge_adapters: the merged weight by hand, the seed, the global generator left alone."""

import pytest
import torch
from torch import nn

from pruning_lab import lora


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(4, 3, bias=False)
        self.other = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        return self.other(self.q_proj(x))


def test_merged_weight_is_w_plus_scaled_b_a_by_hand():
    model = _Tiny()
    w = model.q_proj.weight.detach().clone()
    wrapped = lora.add_adapters(model, rank=2, alpha=4, targets=("q_proj",), seed=3)
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 and all("lora_" in n for n in trainable)  # only the adapters train
    a = next(p for n, p in trainable.items() if "lora_A" in n)
    b = next(p for n, p in trainable.items() if "lora_B" in n)
    assert a.shape == (2, 4) and b.shape == (3, 2) and not b.any()  # B starts at zero: the model itself
    with torch.no_grad():
        b.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
    merged = lora.merge_adapters(wrapped)
    want = w + (4 / 2) * b.detach() @ a.detach()  # W + (alpha / r) · B A
    assert torch.allclose(merged.q_proj.weight, want, atol=1e-6)
    assert isinstance(merged.q_proj, nn.Linear) and isinstance(merged, _Tiny)  # an ordinary model again


def test_adapters_are_seeded_and_leave_the_global_generator_alone():
    def a_of(seed, model=None):
        wrapped = lora.add_adapters(model or _Tiny(), rank=2, alpha=4, targets=("q_proj",), seed=seed)
        return next(p for n, p in wrapped.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(a_of(5), a_of(5)) and not torch.equal(a_of(5), a_of(6))
    model = _Tiny()  # (its constructor seeds the global generator itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a_of(7, model)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_a_rank_that_is_not_a_positive_integer_is_refused(rank):
    with pytest.raises(ValueError, match="positive integer"):
        lora.add_adapters(_Tiny(), rank=rank, alpha=4, targets=("q_proj",))
