"""Optimizers (sd-scripts' names and optimizer_args), their up-front problems, and the lr schedules."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.training.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    canonical_optimizer,
    optimizer_problems,
    warmup_steps,
)

CPU = torch.device("cpu")


def _two_layers() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.Linear(3, 2)


def _loss_step(first: nn.Linear, second: nn.Linear, optimizer: torch.optim.Optimizer) -> None:
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    optimizer.zero_grad()
    second(torch.tanh(first(x))).pow(2).sum().backward()
    optimizer.step()


def _build(name: str, lrs: tuple[float, float], args=None, weight_decay: float = 0.0):
    first, second = _two_layers()
    groups = [(list(first.parameters()), lrs[0]), (list(second.parameters()), lrs[1])]
    optimizer = build_optimizer(name, groups, args=args or {}, weight_decay=weight_decay, device=CPU)
    return first, second, optimizer


def _problems(name: str, args=None, **overrides) -> list[tuple[str, str]]:
    settings = {"lr_scheduler": "constant", "learning_rate": 1e-4, "cuda_available": True} | overrides
    return optimizer_problems(name, args or {}, **settings)


# (name, optimizer_args, group lrs): Prodigy needs one rate for all groups (see test below).
STEPPING = [
    ("AdamW", {}, (1e-2, 5e-3)),
    ("Lion", {}, (1e-3, 5e-4)),
    ("Prodigy", {}, (1.0, 1.0)),
    ("Adafactor", {"relative_step": False}, (1e-2, 5e-3)),
    ("SGD", {}, (1e-1, 5e-2)),
]


@pytest.mark.parametrize(("name", "args", "lrs"), STEPPING)
def test_each_optimizer_steps_with_its_group_lrs(name, args, lrs):
    first, second, optimizer = _build(name, lrs, args)
    before = [p.detach().clone() for p in (*first.parameters(), *second.parameters())]
    for _ in range(3):
        _loss_step(first, second, optimizer)
    after = list((*first.parameters(), *second.parameters()))
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert [g["lr"] for g in optimizer.param_groups] == list(lrs)
    assert optimizer.defaults["lr"] == lrs[0]  # diffusers' polynomial schedule reads it


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD"])
def test_first_step_size_is_the_group_lr(name):
    # First step: AdamW moves each weight by lr·g/|g| (bias-corrected moments), Lion by lr·sign(g),
    # SGD by lr·g; weight decay 0.
    first, second, optimizer = _build(name, (1e-2, 1e-3))
    before = [p.detach().clone() for p in (first.weight, second.weight)]
    _loss_step(first, second, optimizer)
    for weight, old, lr in zip((first.weight, second.weight), before, (1e-2, 1e-3), strict=True):
        grad = weight.grad
        expected = lr * grad if name == "SGD" else lr * torch.sign(grad)
        torch.testing.assert_close(
            old - weight.detach(), expected, rtol=1e-4, atol=2e-7
        )  # float32 rounding of p - Δ


def test_prodigy_refuses_different_group_lrs():
    with pytest.raises(ValueError, match="same learning rate"):
        _build("Prodigy", (1.0, 0.5))
    key, problem = _problems("Prodigy", learning_rate=1.0, text_encoder_lr=0.5)[0]
    assert key == "text_encoder_lr" and "Prodigy needs one learning rate" in problem


def test_adafactor_relative_step_ignores_lrs_and_uses_its_schedule():
    first, second, optimizer = _build("Adafactor", (1e-2, 5e-3))
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    schedule = build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10, num_processes=1)
    before = first.weight.detach().clone()
    for _ in range(3):
        _loss_step(first, second, optimizer)
        schedule.step()
    assert not torch.equal(before, first.weight)
    # Relative step at step 3 is min(1e-2, 1/sqrt(3)) = 1e-2, times the weight's RMS (scale_parameter).
    state = optimizer.state[first.weight]
    assert schedule.get_last_lr()[0] == pytest.approx(1e-2 * max(1e-3, float(state["RMS"])))
    with pytest.raises(ValueError, match="relative_step"):
        build_lr_scheduler("cosine", optimizer, warmup_steps=0, total_steps=10, num_processes=1)


def test_adamw_picks_fused_on_cpu_and_user_args_win():
    assert _build("AdamW", (1e-3, 1e-3))[2].defaults["fused"] is True
    assert not _build("AdamW", (1e-3, 1e-3))[2].defaults["foreach"]
    assert _build("AdamW", (1e-3, 1e-3), {"foreach": False})[2].defaults["foreach"] is False
    fused = _build("AdamW", (1e-3, 1e-3), {"fused": True})[2]  # torch has a fused CPU AdamW too
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_picks_fused_on_cuda():
    layer = nn.Linear(4, 3).cuda()
    optimizer = build_optimizer(
        "AdamW", [(list(layer.parameters()), 1e-3)], args={}, weight_decay=0.0, device=torch.device("cuda")
    )
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


@pytest.mark.parametrize(("name", "args"), [(n, a) for n, a, _ in STEPPING])
def test_weight_decay_is_forwarded_unless_optimizer_args_set_it(name, args):
    assert _build(name, (1.0, 1.0), args, weight_decay=0.05)[2].param_groups[0]["weight_decay"] == 0.05
    own = _build(name, (1.0, 1.0), args | {"weight_decay": 0.2}, weight_decay=0.05)[2]
    assert own.param_groups[0]["weight_decay"] == 0.2


def test_optimizer_args_are_forwarded_with_yaml_lists_as_tuples():
    assert _build("Lion", (1e-4, 1e-4), {"betas": [0.95, 0.98]})[2].defaults["betas"] == (0.95, 0.98)
    adafactor = _build("Adafactor", (1e-3, 1e-3), {"relative_step": False, "eps": [1e-30, 1e-2]})[2]
    assert adafactor.defaults["eps"] == (1e-30, 1e-2)
    assert _build("SGD", (0.1, 0.1), {"momentum": 0.9, "nesterov": True})[2].defaults["nesterov"] is True


def test_optimizer_args_problems():
    assert _problems("Lion", {"beta": (0.9, 0.99)}) == [
        ("optimizer_args", "'beta' is not an argument of Lion (did you mean 'betas'?)")
    ]
    assert _problems("AdamW", {"lr": 1e-3, "params": []}) == [
        ("optimizer_args", "'lr' is set by learning_rate and text_encoder_lr; remove it from optimizer_args"),
        (
            "optimizer_args",
            "'params' is set by the LoRA weights being trained; remove it from optimizer_args",
        ),
    ]
    [(key, problem)] = _problems("AdamW", {"betas": "0.9,0.99"})
    assert key == "optimizer_args" and problem.startswith("'betas': '0.9,0.99' is text")
    with pytest.raises(UserError, match="'beta' is not an argument of Lion"):
        _build("Lion", (1e-4, 1e-4), {"beta": (0.9, 0.99)})
    with pytest.raises(UserError, match="AdamW rejected these settings"):
        _build("AdamW", (1e-4, 1e-4), {"betas": (2.0, 0.999)})


def test_optimizer_names():
    assert OPTIMIZERS == ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD")
    assert canonical_optimizer("adamw8bit") == "AdamW8bit" and canonical_optimizer("LION") == "Lion"
    assert canonical_optimizer("Adam") is None
    [(key, problem)] = _problems("Lionn")
    assert key == "optimizer_type" and problem.endswith("(did you mean 'Lion'?)")


def test_adamw8bit_problems_without_bitsandbytes_or_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    assert _problems("AdamW8bit") == [
        (
            "optimizer_type",
            "AdamW8bit needs the 'bitsandbytes' package, which is not installed (pip install bitsandbytes, "
            "or use optimizer_type: AdamW).",
        )
    ]
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=torch.optim.AdamW)  # stands in for the real signature
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert _problems("AdamW8bit", {"betas": (0.9, 0.99)}) == []
    assert _problems("AdamW8bit", cuda_available=False) == [
        ("optimizer_type", "AdamW8bit (bitsandbytes) needs a CUDA GPU; use optimizer_type: AdamW here")
    ]
    with pytest.raises(UserError, match="AdamW8bit \\(bitsandbytes\\) needs a CUDA GPU"):
        _build("AdamW8bit", (1e-4, 1e-4))


@pytest.mark.parametrize(
    ("name", "module", "pip"),
    [("Lion", "lion_pytorch", "lion-pytorch"), ("Prodigy", "prodigyopt", "prodigyopt")],
)
def test_missing_package_names_the_pip_command(monkeypatch, name, module, pip):
    monkeypatch.setitem(sys.modules, module, None)
    [(key, problem)] = _problems(name, learning_rate=1.0)
    assert key == "optimizer_type" and f"(pip install {pip}, or use optimizer_type: AdamW)" in problem
    with pytest.raises(UserError, match=f"pip install {pip}"):
        _build(name, (1.0, 1.0))


def test_prodigy_low_learning_rate():
    assert _problems("Prodigy", learning_rate=1e-4) == [
        (
            "learning_rate",
            "0.0001 is too low for Prodigy, which adapts the step size itself and expects about 1.0 "
            "(set learning_rate: 1.0)",
        )
    ]
    assert _problems("Prodigy", learning_rate=1.0, text_encoder_lr=1.0) == []


def test_adafactor_relative_step_rules():
    [(key, problem)] = _problems("Adafactor", lr_scheduler="cosine")
    assert key == "lr_scheduler" and "use lr_scheduler: constant, or set relative_step: false" in problem
    assert _problems("Adafactor", {"relative_step": True}, lr_scheduler="constant") == []
    assert _problems("Adafactor", {"relative_step": False}, lr_scheduler="cosine") == []
    assert _problems("Adafactor", {"relative_step": False, "warmup_init": True}) == [
        ("optimizer_args", "Adafactor's warmup_init: true needs relative_step: true; remove one of them")
    ]


def _lr_after(name: str, steps: int, *, lr: float = 1.0, num_processes: int = 1, **schedule) -> float:
    """Group 0's rate after `steps` scheduler steps of a 10-warmup, 100-step schedule."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    settings = {"warmup_steps": 10, "total_steps": 100} | schedule
    scheduler = build_lr_scheduler(name, optimizer, num_processes=num_processes, **settings)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


@pytest.mark.parametrize(
    ("name", "step", "factor", "schedule"),
    [
        ("constant", 5, 1.0, {}),
        ("constant_with_warmup", 5, 0.5, {}),
        ("constant_with_warmup", 60, 1.0, {}),
        ("linear", 5, 0.5, {}),
        ("linear", 55, 0.5, {}),  # (100 - 55) / (100 - 10)
        ("linear", 100, 0.0, {}),
        ("cosine", 55, 0.5, {}),  # half-way through the decay: 0.5·(1 + cos(π/2))
        ("cosine", 40, 0.5 * (1 + math.cos(math.pi / 3)), {}),
        ("cosine", 100, 0.0, {}),
        ("cosine_with_restarts", 25, 0.5, {"warmup_steps": 0, "num_cycles": 2}),
        ("cosine_with_restarts", 50, 1.0, {"warmup_steps": 0, "num_cycles": 2}),  # the restart
        ("cosine_with_restarts", 75, 0.5, {"warmup_steps": 0, "num_cycles": 2}),
        ("polynomial", 55, (1 - 1e-7) * 0.5**2 + 1e-7, {"power": 2.0}),  # decays to lr_end 1e-7
        ("polynomial", 55, (1 - 1e-7) * 0.5 + 1e-7, {}),
    ],
)
def test_schedule_follows_its_formula(name, step, factor, schedule):
    assert _lr_after(name, step, lr=1.0, **schedule) == pytest.approx(factor, abs=1e-12)


def test_polynomial_scales_each_group_by_the_first_groups_lr():
    first, second, optimizer = _build("SGD", (1e-3, 5e-4))
    scheduler = build_lr_scheduler(
        "polynomial", optimizer, warmup_steps=10, total_steps=100, num_processes=1, power=2.0
    )
    for _ in range(55):
        optimizer.step()
        scheduler.step()
    factor = ((1e-3 - 1e-7) * 0.25 + 1e-7) / 1e-3
    assert scheduler.get_last_lr() == pytest.approx([1e-3 * factor, 5e-4 * factor], rel=1e-12)


def test_schedule_scales_steps_by_num_processes():
    # Two processes: accelerate steps the scheduler twice per update, so 10 steps are update 5 of 10 warmup.
    assert _lr_after("linear", 10, num_processes=2) == pytest.approx(0.5)
    assert _lr_after("linear", 110, num_processes=2) == pytest.approx(0.5)  # update 55 of 100


def test_warmup_steps():
    assert warmup_steps(0.1, 250) == 25
    assert warmup_steps(0.15, 10) == 1  # truncated, as sd-scripts' int(ratio * steps)
    assert warmup_steps(30, 250) == 30
    assert warmup_steps(0, 250) == 0
    for bad in (1.5, 0.0, -0.2, -1, True):
        with pytest.raises(ValueError):
            warmup_steps(bad, 250)
