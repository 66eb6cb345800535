"""ema.py: the moving average against a hand computation; buffers copied, not averaged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from braintumor.training.ema import ModelEma


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_average_equals_hand_computation_with_warm_up():
    model = tiny_model()
    ema = ModelEma(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 101):  # the warm-up reaches the cap of 0.9 at step 80
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves BatchNorm's running statistics
        decay = min(0.9, (1 + step) / (10 + step))
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(model)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    assert ema.updates == 100
    for averaged, hand in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(averaged, hand, rtol=1e-6, atol=1e-6)
    # The average differs from the live weights, and the decay cap (0.9) was reached.
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert ema.current_decay() == 0.9
    # Buffers are the live model's, exactly.
    for target, source in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(target, source)


def test_state_dict_round_trip_continues_identically():
    model = tiny_model()
    ema = ModelEma(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
    copy = ModelEma(model, 0.99)
    copy.load_state_dict(ema.state_dict())
    for one in (ema, copy):
        one.update(model)
    for a, b in zip(ema.module.state_dict().values(), copy.module.state_dict().values()):
        assert torch.equal(a, b)
    assert copy.updates == ema.updates == 4


def test_the_copy_is_frozen_and_the_decay_checked():
    ema = ModelEma(tiny_model(), 0.5)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError):
        ModelEma(tiny_model(), 1.0)
