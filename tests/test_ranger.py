"""Ranger (RAdam + LookAhead + Gradient Centralization): checked against torch.optim.RAdam with hand-written GC
and LookAhead, against pytorch_optimizer.Ranger, and against the algorithm's properties."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from braintumor.optim import Ranger

BETAS = (0.95, 0.999)
GC_MIN_DIM = {"all": 2, "conv": 4, "none": 99}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation, which stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Conv (4-D weights), BatchNorm and bias (1-D) and Linear (2-D) parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    return model.to(dtype)


def _batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 8, 8, generator=generator).to(dtype), torch.randint(0, 3, (4,), generator=generator))
        for _ in range(n)
    ]


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _hand_gc(params, gc: str) -> None:
    for param in params:
        grad = param.grad
        if grad is not None and grad.dim() >= GC_MIN_DIM[gc]:
            grad -= grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


# --- Oracle 1: torch.optim.RAdam + hand GC + hand LookAhead ---------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "gc, weight_decay, k, alpha",
    [("all", 0.0, 6, 0.5), ("all", 0.1, 5, 0.8), ("conv", 0.1, 6, 0.5), ("conv", 0.0, 3, 0.3), ("none", 0.1, 4, 1.0),
     ("none", 0.0, 1, 0.5)],
)
@pytest.mark.slow
def test_matches_torch_radam_with_hand_gc_and_lookahead(gc, weight_decay, k, alpha, foreach):
    lr = 1e-2
    model = _small_model()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    ranger = Ranger(model.parameters(), lr=lr, weight_decay=weight_decay, k=k, alpha=alpha, gc=gc, foreach=foreach)
    radam = torch.optim.RAdam(
        reference.parameters(), lr=lr, betas=BETAS, eps=1e-5, weight_decay=weight_decay,
        decoupled_weight_decay=True, foreach=False,
    )
    slow_weights = [param.detach().clone() for param in reference.parameters()]
    worst = 0.0
    for step, (x, y) in enumerate(_batches(60), start=1):
        _backward(model, ranger, x, y)
        _backward(reference, radam, x, y)
        _hand_gc(reference.parameters(), gc)
        ranger.step()
        radam.step()
        if step % k == 0:
            with torch.no_grad():
                for param, slow in zip(reference.parameters(), slow_weights):
                    slow += alpha * (param - slow)
                    param.copy_(slow)
        worst = max(worst, _max_difference(model, reference))
    assert worst <= 1e-6
    assert _max_difference(model, initial) > 3e-3  # the trajectory went somewhere, far beyond the tolerance


def test_matches_torch_radam_in_float64():
    model = _small_model(dtype=torch.float64)
    reference = copy.deepcopy(model)
    ranger = Ranger(model.parameters(), lr=1e-2, weight_decay=0.1, k=4)
    radam = torch.optim.RAdam(
        reference.parameters(), lr=1e-2, betas=BETAS, eps=1e-5, weight_decay=0.1, decoupled_weight_decay=True,
        foreach=False,
    )
    slow_weights = [param.detach().clone() for param in reference.parameters()]
    for step, (x, y) in enumerate(_batches(20, dtype=torch.float64), start=1):
        _backward(model, ranger, x, y)
        _backward(reference, radam, x, y)
        _hand_gc(reference.parameters(), "all")
        ranger.step()
        radam.step()
        if step % 4 == 0:
            with torch.no_grad():
                for param, slow in zip(reference.parameters(), slow_weights):
                    slow += 0.5 * (param - slow)
                    param.copy_(slow)
    assert all(param.dtype == torch.float64 for param in model.parameters())
    assert all(value.dtype == torch.float64 for state in ranger.state.values() for value in state.values()
               if torch.is_tensor(value))
    assert _max_difference(model, reference) <= 1e-12


# --- Oracle 2: pytorch_optimizer.Ranger ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("gc", ["all", "conv", "none"])
def test_matches_pytorch_optimizer_ranger(gc, weight_decay):
    from pytorch_optimizer import Ranger as ReferenceRanger

    lr = 1e-2
    model = _small_model()
    reference = copy.deepcopy(model)
    ranger = Ranger(model.parameters(), lr=lr, weight_decay=weight_decay, gc=gc)
    other = ReferenceRanger(
        reference.parameters(), lr=lr, betas=(0.95, 0.999), alpha=0.5, k=6, n_sma_threshold=5,
        degenerated_to_sgd=True, use_gc=gc != "none", gc_conv_only=gc == "conv", weight_decay=weight_decay,
        weight_decouple=True, fixed_decay=False, eps=1e-5,
    )
    worst = 0.0
    for x, y in _batches(50):
        _backward(model, ranger, x, y)
        _backward(reference, other, x, y)
        ranger.step()
        other.step()
        worst = max(worst, _max_difference(model, reference))
    assert worst <= 1e-6


# --- Properties --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_gc_keeps_per_channel_mean_during_momentum_phase(foreach):
    def channel_means(model):
        return [p.detach().mean(dim=tuple(range(1, p.dim()))).clone() for p in model.parameters() if p.dim() > 1]

    drift = {}
    for gc in ("all", "none"):
        model = _small_model()
        before = channel_means(model)
        optimizer = Ranger(model.parameters(), lr=1e-2, gc=gc, foreach=foreach)
        worst = 0.0
        for x, y in _batches(5):  # steps 1-5: momentum SGD, before rectification and LookAhead's first sync
            _backward(model, optimizer, x, y)
            optimizer.step()
            worst = max(worst, max((a - b).abs().max().item() for a, b in zip(channel_means(model), before)))
        drift[gc] = worst
    assert drift["all"] <= 1e-7
    assert drift["none"] > 1e-4  # without GC the means do move, so the check above has teeth


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("gc", ["all", "conv", "none"])
def test_first_step_centralizes_exactly_the_right_tensors(gc, foreach):
    lr = 1e-2
    generator = torch.Generator().manual_seed(0)
    shapes = [(5,), (5, 7), (5, 3, 4), (5, 3, 2, 2)]  # bias / BatchNorm, Linear, Conv1d, Conv2d weights
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) + 3.0 for shape in shapes]  # a mean far from zero
    # A channels_last Conv2d gradient takes the strided path instead of the (O, n) view.
    params.append(nn.Parameter(torch.randn(5, 3, 2, 2, generator=generator)))
    grads.append((torch.randn(5, 3, 2, 2, generator=generator) + 3.0).contiguous(memory_format=torch.channels_last))
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    assert not params[-1].grad.is_contiguous()
    before = [param.detach().clone() for param in params]
    Ranger(params, lr=lr, gc=gc, foreach=foreach).step()
    for param, start, grad in zip(params, before, grads):
        expected_grad = grad
        if grad.dim() >= GC_MIN_DIM[gc]:
            expected_grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
        # Step 1 is momentum SGD: p1 = p0 - lr * m1 / (1 - beta1) = p0 - lr * g.
        torch.testing.assert_close(param.detach(), start - lr * expected_grad, rtol=0, atol=1e-6)


def test_lookahead_waits_k_steps_then_interpolates():
    k, alpha = 6, 0.5
    model = _small_model()
    fast_only = copy.deepcopy(model)
    start = [param.detach().clone() for param in model.parameters()]
    optimizer = Ranger(model.parameters(), lr=1e-2, k=k, alpha=alpha)
    no_lookahead = Ranger(fast_only.parameters(), lr=1e-2, k=k, alpha=1.0)
    for step, (x, y) in enumerate(_batches(k), start=1):
        for net, opt in ((model, optimizer), (fast_only, no_lookahead)):
            _backward(net, opt, x, y)
            opt.step()
        if step < k:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fast_only.parameters()))
    for param, fast, initial in zip(model.parameters(), fast_only.parameters(), start):
        expected = initial + alpha * (fast.detach() - initial)
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(optimizer.state[param]["slow_weights"], expected, rtol=0, atol=1e-7)
    assert _max_difference(model, fast_only) > 1e-3  # the sync did pull the weights back


@pytest.mark.parametrize("foreach", [False, True])
def test_steps_one_to_five_are_momentum_sgd_then_rectified(foreach):
    lr, beta1 = 1e-2, BETAS[0]
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(6, generator=generator)), nn.Parameter(torch.randn(3, 4, generator=generator))]
    optimizer = Ranger(params, lr=lr, gc="none", foreach=foreach)
    expected = [param.detach().clone() for param in params]
    moments = [torch.zeros_like(param) for param in params]
    for step in range(1, 7):
        grads = [torch.randn(param.shape, generator=generator) for param in params]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        for index, grad in enumerate(grads):
            moments[index] = beta1 * moments[index] + (1 - beta1) * grad
            expected[index] = expected[index] - lr * moments[index] / (1 - beta1**step)
        for param, target, moment in zip(params, expected, moments):
            torch.testing.assert_close(optimizer.state[param]["exp_avg"], moment, rtol=0, atol=1e-6)
            if step <= 5:
                torch.testing.assert_close(param.detach(), target, rtol=0, atol=1e-6)
            else:  # step 6 is rectified: the update is no longer m / (1 - beta1^t)
                assert (param.detach() - target).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(16,), (4, 6)])
def test_first_steps_lower_the_norm_on_a_quadratic(shape):
    weight = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    optimizer = Ranger([weight])
    previous = weight.detach().pow(2).sum().item()
    for _ in range(5):
        optimizer.zero_grad()
        weight.pow(2).sum().backward()
        optimizer.step()
        current = weight.detach().pow(2).sum().item()
        assert current < previous
        previous = current


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    def build():
        model = _small_model(dtype=dtype)
        optimizer = Ranger(
            [{"params": model[:4].parameters(), "lr": 1e-2}, {"params": model[4:].parameters(), "weight_decay": 0.1}],
            lr=3e-3, k=4,
        )
        return model, optimizer

    batches = _batches(30, dtype=dtype)
    straight, straight_optimizer = build()
    for x, y in batches:
        _backward(straight, straight_optimizer, x, y)
        straight_optimizer.step()

    first, first_optimizer = build()
    for x, y in batches[:10]:
        _backward(first, first_optimizer, x, y)
        first_optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, resumed_optimizer = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for param in resumed.parameters():
        state = resumed_optimizer.state[param]
        assert state["step"] == 10
        assert all(state[key].dtype == torch.float32 for key in ("exp_avg", "exp_avg_sq", "slow_weights"))
    for x, y in batches[10:]:
        _backward(resumed, resumed_optimizer, x, y)
        resumed_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def test_load_state_dict_does_not_alias_the_source():
    model = _small_model()
    optimizer = Ranger(model.parameters())
    for x, y in _batches(2):
        _backward(model, optimizer, x, y)
        optimizer.step()
    other = Ranger(model.parameters())
    other.load_state_dict(optimizer.state_dict())
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "slow_weights"):
            assert other.state[param][key].data_ptr() != optimizer.state[param][key].data_ptr()


@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_equal_separate_optimizers(foreach):
    first_options = dict(lr=1e-2, betas=(0.9, 0.99))
    second_options = dict(lr=3e-3, betas=(0.95, 0.999), weight_decay=0.1, k=3, alpha=0.7, gc="conv")
    grouped = _small_model()
    separate = copy.deepcopy(grouped)
    one = Ranger(
        [{"params": grouped[:4].parameters(), **first_options}, {"params": grouped[4:].parameters(), **second_options}],
        foreach=foreach,
    )
    two = [
        Ranger(separate[:4].parameters(), foreach=foreach, **first_options),
        Ranger(separate[4:].parameters(), foreach=foreach, **second_options),
    ]
    for x, y in _batches(20):
        _backward(grouped, one, x, y)
        for optimizer in two:
            optimizer.zero_grad()
        F.cross_entropy(separate(x), y).backward()
        one.step()
        for optimizer in two:
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(grouped.parameters(), separate.parameters()))


@pytest.mark.parametrize("foreach", [False, True])
def test_parameters_that_get_gradients_late_run_their_own_schedule(foreach):
    generator = torch.Generator().manual_seed(0)
    early, late, never = (nn.Parameter(torch.randn(3, 4, generator=generator)) for _ in range(3))
    early_alone, late_alone = nn.Parameter(early.detach().clone()), nn.Parameter(late.detach().clone())
    never_start = never.detach().clone()
    together = Ranger([early, late, never], lr=1e-2, k=3, foreach=foreach)
    optimizers_alone = Ranger([early_alone], lr=1e-2, k=3), Ranger([late_alone], lr=1e-2, k=3)
    for step in range(1, 16):
        grads = [torch.randn(3, 4, generator=generator) for _ in range(2)]
        early.grad, early_alone.grad = grads[0].clone(), grads[0].clone()
        optimizers_alone[0].step()
        if step >= 5:
            late.grad, late_alone.grad = grads[1].clone(), grads[1].clone()
            optimizers_alone[1].step()
        together.step()
    assert torch.equal(early, early_alone) and torch.equal(late, late_alone)
    assert together.state[late]["step"] == 11 and together.state[early]["step"] == 15
    assert torch.equal(never, never_start) and never not in together.state


@pytest.mark.parametrize("foreach", [False, True])
def test_loss_falls_on_a_small_problem(foreach):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=generator) * 2
    labels = torch.randint(0, 3, (256,), generator=generator)
    inputs = centers[labels] + torch.randn(256, 10, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = Ranger(model.parameters(), lr=1e-2, foreach=foreach)
    losses = [_backward(model, optimizer, inputs, labels).item()]
    for _ in range(100):
        optimizer.step()
        losses.append(_backward(model, optimizer, inputs, labels).item())
    assert losses[-1] < 0.2 * losses[0]


def test_rosenbrock_converges_with_closure():
    point = nn.Parameter(torch.tensor([0.0, 0.0]))
    optimizer = Ranger([point], lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = (1 - point[0]) ** 2 + 100 * (point[1] - point[0] ** 2) ** 2
        loss.backward()
        return loss

    first_loss = optimizer.step(closure)
    assert first_loss.item() == pytest.approx(1.0)
    for _ in range(2000):
        optimizer.step(closure)
    assert (point.detach() - torch.tensor([1.0, 1.0])).norm() < 1e-3


# --- Implementation paths, dtypes, integrations -------------------------------------------------------------------


def test_foreach_equals_per_tensor_across_dtypes_and_groups():
    generator = torch.Generator().manual_seed(0)
    shapes = [(6,), (4, 5), (4, 3, 2, 2)]

    def build():
        groups = []
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            groups.append([nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype))
                           for shape in shapes])
        return groups

    runs = {}
    for foreach in (False, True):
        groups = build()
        optimizer = Ranger(
            [{"params": groups[0] + groups[2], "lr": 1e-2, "k": 4},
             {"params": groups[1] + groups[3], "weight_decay": 0.1, "gc": "conv"}],
            foreach=foreach,
        )
        generator.manual_seed(1)
        for step in range(14):
            for params in groups:
                for index, param in enumerate(params):
                    if index == 1 and step < 3:
                        param.grad = None  # this one joins late, with its own step count
                        continue
                    param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
            optimizer.step()
        runs[foreach] = (groups, optimizer)
    (groups_a, optimizer_a), (groups_b, optimizer_b) = runs[False], runs[True]
    for params_a, params_b in zip(groups_a, groups_b):
        for a, b in zip(params_a, params_b):
            assert a.dtype == b.dtype and torch.equal(a, b)
            for key in ("exp_avg", "exp_avg_sq", "slow_weights"):
                assert torch.equal(optimizer_a.state[a][key], optimizer_b.state[b][key])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_are_updated_in_float32(dtype, foreach):
    """A half parameter must follow a float32 run whose weights are rounded to half after each step."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8,), (4, 6), (4, 2, 3, 3)]
    half = [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    full = [nn.Parameter(param.detach().float()) for param in half]
    optimizer = Ranger(half, lr=1e-3, weight_decay=0.1, k=4, foreach=foreach)
    reference = Ranger(full, lr=1e-3, weight_decay=0.1, k=4, foreach=foreach)
    for _ in range(13):
        for a, b in zip(half, full):
            grad = torch.randn(a.shape, generator=generator).to(dtype)
            a.grad, b.grad = grad, grad.float()
        optimizer.step()
        reference.step()
        with torch.no_grad():
            for param in full:
                param.copy_(param.to(dtype).float())
    for a, b in zip(half, full):
        assert a.dtype == dtype and torch.equal(a.float(), b)
        assert all(optimizer.state[a][key].dtype == torch.float32 for key in ("exp_avg", "exp_avg_sq", "slow_weights"))


def test_grad_scaler_matches_unscaled_run_and_skips_overflow():
    model = _small_model()
    plain = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=1e-2)
    plain_optimizer = Ranger(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in _batches(8):
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        _backward(plain, plain_optimizer, x, y)
        plain_optimizer.step()
    assert _max_difference(model, plain) <= 1e-7

    before = [param.detach().clone() for param in model.parameters()]
    x, y = _batches(1, seed=5)[0]
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0].fill_(float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(state["step"] == 8 for state in optimizer.state.values())
    assert scaler.get_scale() == scale / 2


def test_lr_scheduler_changes_are_read_every_step():
    model = _small_model()
    manual = copy.deepcopy(model)
    constant = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.7**epoch)
    manual_optimizer = Ranger(manual.parameters(), lr=1e-2)
    constant_optimizer = Ranger(constant.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(_batches(10)):
        _backward(model, optimizer, x, y)
        optimizer.step()
        scheduler.step()
        manual_optimizer.param_groups[0]["lr"] = 1e-2 * 0.7**step
        _backward(manual, manual_optimizer, x, y)
        manual_optimizer.step()
        _backward(constant, constant_optimizer, x, y)
        constant_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), manual.parameters()))
    assert _max_difference(model, constant) > 1e-3  # the decayed lr did change the trajectory
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7**10)


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=-1e-3), dict(lr=float("nan")), dict(lr="0.1"), dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.0)),
        dict(betas=(-0.1, 0.999)), dict(betas=(0.9,)), dict(eps=0.0), dict(eps=-1e-8), dict(weight_decay=-0.1),
        dict(k=0), dict(k=2.5), dict(k=True), dict(alpha=0.0), dict(alpha=1.5), dict(threshold=3.9),
        dict(threshold=float("nan")), dict(gc="fc"), dict(gc=True), dict(foreach="yes"),
    ],
)
def test_invalid_arguments_raise_value_error(options):
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Ranger"):
        Ranger([param], **options)
    with pytest.raises(ValueError, match="Ranger"):
        Ranger([{"params": [param], **options}])


def test_threshold_four_is_accepted_and_sparse_gradients_are_refused():
    param = nn.Parameter(torch.zeros(3))
    optimizer = Ranger([param], threshold=4)
    param.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
