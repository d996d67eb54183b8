"""Your functions train a tiny Gemma: the hook behind chapter 08's capstone (exercise 08.capstone).

The exercises of chapter 08 ask for the next-token loss, the learning-rate schedule and one AdamW step,
each checked against the package on its own. The capstone puts the three into one training loop and
asks for the package's loss curve:

    from minigemma.learner_train import YourTraining
    yours = YourTraining(next_token_loss=next_token_loss, lr_schedule=lr_schedule, adamw_step=adamw_step)
    yours(20)   # the loss of each of 20 steps, your code doing the training

The loop (`YourTraining.__call__`), written out so that each of your functions has one place:

    model  = a tiny Gemma 3, seeded (`tiny_config`: 2 layers, width 32, vocabulary 64), float32
    ids, mask = `batch()`: 4 fixed rows of 16 tokens, one left-padded and one right-padded
    for s in 0 .. steps - 1:
        loss = next_token_loss(model(ids, attention_mask=mask), ids, mask); loss.backward()
        lr   = lr_schedule(s, PEAK_LR, WARMUP, steps, MIN_RATIO)          # the run ends at `steps`
        for each parameter p (weight decay on matrices only, as `train.make_optimizer`):
            adamw_step(p, p.grad, m_p, v_p, s + 1, lr, BETAS, EPS, wd)    # in place, step counted from 1
    the curve: each step's loss, before its update

These are the exercises' own signatures (08.next_token_loss, 08.lr_schedule, 08.adamw_step). A function
you do not give keeps the package's (`losses.next_token_loss`, `train.lr_at`, `train.adamw_step`), so
`YourTraining()` is the reference; `train.adamw_step` is `torch.optim.AdamW`'s step, bit for bit, so the
reference curve is what the package's optimizer gives. The whole run takes a tenth of a second on one core.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import losses, train
from .gemma import Gemma, GemmaConfig, layer_pattern
from .learner import swapped_alone

# name -> (signature, the exercise that checks it on its own)
FUNCTIONS: dict[str, tuple[str, str]] = {
    "next_token_loss": ("next_token_loss(logits, ids, mask)", "08.next_token_loss"),
    "lr_schedule": ("lr_schedule(step, peak, warmup, total, min_ratio)", "08.lr_schedule"),
    "adamw_step": ("adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)",
                   "08.adamw_step"),
}
PACKAGE: dict[str, Callable] = {"next_token_loss": losses.next_token_loss, "lr_schedule": train.lr_at,
                                "adamw_step": train.adamw_step}

# the run: a peak high enough that the tiny model learns in 20 steps; warm-up and decay both matter
PEAK_LR, WARMUP, MIN_RATIO = 1e-2, 5, 0.1
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
SEED, PAD_ID, BOS_ID = 0, 0, 2
# Two curves count as the same when every step's loss agrees within TOLERANCE (nats). Right answers
# written other ways (another order of float operations, torch's cross-entropy, float64, torch's AdamW)
# stay within 1e-5 of the reference over 20 steps (measured: 2e-6); each wrong answer of the exercises
# that changes this run at all moves some step by more than 1e-3 (measured: 3e-3 at the least, weight
# decay applied after the update). tests/test_learner_train.py checks both margins.
TOLERANCE = 1e-4


def tiny_config() -> GemmaConfig:
    """A Gemma 3 of 2 layers (one local, one global), width 32, 2 query heads sharing 1 key/value head."""
    return GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_types=layer_pattern(2, 2),
                       sliding_window=8, query_pre_attn_scalar=16, use_qk_norm=True)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (4, 16) long, mask (4, 16) bool): a noisy count (a pattern the model can learn) after BOS;
    row 1 has 3 pads on the left, row 2 has 4 on the right (PAD_ID), so the mask matters."""
    g = torch.Generator().manual_seed(SEED)
    start = torch.randint(0, 60, (4, 1), generator=g)
    ids = (start + 7 * torch.arange(16) + torch.randint(0, 2, (4, 16), generator=g)) % 60 + 3
    ids[:, 0] = BOS_ID
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, :3] = False
    ids[1, :4] = torch.tensor([PAD_ID, PAD_ID, PAD_ID, BOS_ID])
    mask[2, 12:] = False
    ids[2, 12:] = PAD_ID
    return ids, mask


def train_curve(steps: int, next_token_loss: Callable, lr_schedule: Callable, adamw_step: Callable) -> torch.Tensor:
    """The loop of the module docstring with these three functions: (steps,) float64, each step's loss."""
    with torch.random.fork_rng(devices=[]):  # the seeded model leaves the caller's random state alone
        torch.manual_seed(SEED)
        model = Gemma(tiny_config())
    ids, mask = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params}
    curve = []
    for s in range(steps):
        loss = next_token_loss(model(ids, attention_mask=mask), ids, mask)
        loss.backward()
        curve.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        lr = lr_schedule(s, PEAK_LR, WARMUP, steps, MIN_RATIO)
        for p in params:
            m, v = state[p]
            with torch.no_grad():
                adamw_step(p, p.grad, m, v, s + 1, lr, BETAS, EPS, WEIGHT_DECAY if p.dim() >= 2 else 0.0)
            p.grad = None
    return torch.tensor(curve, dtype=torch.float64)


_CURVES: dict = {}  # (functions, steps) -> curve: see YourTraining


class YourTraining:
    """The capstone's training run with your functions: `yours(steps)` returns the loss curve, a float64
    tensor of one loss per step. Any subset of the three functions of `FUNCTIONS` may be given.

    Curves are remembered per function objects and number of steps, so a check that runs on several seeds,
    and the diagnosis that swaps each function in alone, train each run once. Redefining a function makes
    a new object, so it is run again.
    """

    def __init__(self, **functions: Callable):
        unknown = sorted(set(functions) - set(FUNCTIONS))
        if unknown:
            raise TypeError(f"unknown functions {unknown}; give any of: "
                            + ", ".join(sig for sig, _ in FUNCTIONS.values()))
        bad = [name for name, f in functions.items() if not callable(f)]
        if bad:
            raise TypeError(f"not functions: {bad}")
        self.functions = {name: functions[name] for name in FUNCTIONS if name in functions}

    def only(self, name: str) -> "YourTraining":
        """The same, with only your `name` swapped in (the package's code everywhere else)."""
        return YourTraining(**{name: self.functions[name]})

    def __call__(self, steps: int) -> torch.Tensor:
        key = (tuple(self.functions.items()), steps)
        if key not in _CURVES:
            _CURVES[key] = train_curve(steps, **{**PACKAGE, **self.functions})
        return _CURVES[key].clone()

    def __repr__(self) -> str:
        return f"YourTraining({', '.join(self.functions) or 'nothing swapped'})"


def reference_curve(steps: int) -> torch.Tensor:
    """The package's own curve: every function the package's."""
    return YourTraining()(steps)


def same_curve(got, expected: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape
            and bool(torch.isfinite(got).all()) and bool(((got - expected).abs() <= TOLERANCE).all()))


def first_step_off(got: torch.Tensor, expected: torch.Tensor) -> int:
    """The first step whose loss is off (non-finite, or more than TOLERANCE away)."""
    off = ~torch.isfinite(got) | ((got - expected).abs() > TOLERANCE)
    return int(off.nonzero()[0, 0])


def diagnose(fn, case, expected) -> str | None:
    """Which of your functions breaks the curve: each is swapped in alone, and its curve compared."""
    if not isinstance(fn, YourTraining) or not fn.functions:
        return None
    return swapped_alone({name: FUNCTIONS[name][1] for name in fn.functions},
                         lambda name: fn.only(name)(*case.args, **case.kwargs),
                         lambda alone: None if same_curve(alone, expected)
                         else f"; the loss is off from step {first_step_off(alone, expected)}",
                         "the loss curve", shapes="the run's shapes")
