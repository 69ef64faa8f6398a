"""Progressive dropout of the hand head: p = 0 until `dropout_warmup_step`, then `dropout` (or a ramp).

The schedule is computed by train_hand.py (`dropout_at`, a lib.schedules hold / linear warm-up) and
only applied by the model (`model.set_dropout(p)`). Also runnable as
`python -m tests.test_progressive_dropout`: prints the plan's three checks (schedule function,
model interface, every dropout layer updated) with PASS / FAIL and the values seen.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.models.hand import Attention, HandRegressor
from train_hand import dropout_at

TINY = dict(img_size=28, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
            backbone_overrides=dict(embed_dim=48, depth=1, num_heads=3))


def _model() -> HandRegressor:
    torch.manual_seed(0)
    return HandRegressor("vit_small_patch14_dinov2", **TINY)


def test_step_schedule_before_and_after_warmup():
    assert dropout_at(0, 0.1, 10000) == 0.0
    assert dropout_at(9999, 0.1, 10000) == 0.0
    assert dropout_at(10000, 0.1, 10000) == 0.1
    assert dropout_at(99999, 0.1, 10000) == 0.1
    assert dropout_at(0, 0.1, 0) == 0.1  # no warm-up: on from the start


def test_linear_ramp():
    assert dropout_at(0, 0.1, 10000, "linear") == 0.0
    assert abs(dropout_at(2500, 0.1, 10000, "linear") - 0.025) < 1e-12
    assert abs(dropout_at(5000, 0.1, 10000, "linear") - 0.05) < 1e-12
    assert dropout_at(10000, 0.1, 10000, "linear") == 0.1


def test_set_dropout_reaches_every_head_dropout_and_not_the_backbone():
    model = _model()
    model.set_dropout(0.3)
    drops = [m for m in model.head.modules() if isinstance(m, nn.Dropout)]
    attns = [m for m in model.head.modules() if isinstance(m, Attention)]
    assert len(drops) == 1 + 2 * (2 + 2) and len(attns) == 4  # embedding + per layer: 2 attn outputs, 2 in the MLP
    assert all(m.p == 0.3 for m in drops) and all(m.attn_drop == 0.3 for m in attns)
    assert all(m.p == 0.0 for m in model.backbone.modules() if isinstance(m, nn.Dropout))
    model.set_dropout(dropout_at(5, 0.1, 10))  # the training loop's call before the warm-up step
    assert all(m.p == 0.0 for m in drops) and all(m.attn_drop == 0.0 for m in attns)


def test_eval_mode_ignores_dropout_train_mode_applies_it():
    model = _model()
    x, right = torch.randn(2, 3, 28, 28), torch.tensor([1, 0])
    model.set_dropout(0.0)
    ref = model.eval()(x, right)["joints"]
    model.set_dropout(0.5)
    out = model(x, right)["joints"]
    assert torch.equal(ref, out)  # eval: dropout has no effect
    model.train()
    torch.manual_seed(1)
    a = model(x, right)["joints"]
    torch.manual_seed(2)
    b = model(x, right)["joints"]
    assert (a - b).abs().max() > 1e-6  # train: p = 0.5 changes the output
    model.set_dropout(0.0)
    assert torch.allclose(model(x, right)["joints"], ref, atol=1e-6)  # train with p = 0 is the eval output


def _check(name: str, fn, detail: str) -> bool:
    try:
        fn()
        ok = True
    except AssertionError as e:
        ok, detail = False, f"{detail}: {e}"
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return ok


if __name__ == "__main__":
    m = _model()
    n_drop = sum(isinstance(x, nn.Dropout) for x in m.head.modules())
    n_attn = sum(isinstance(x, Attention) for x in m.head.modules())
    results = [
        _check("schedule function", lambda: (test_step_schedule_before_and_after_warmup(), test_linear_ramp()),
               f"dropout_at(step, 0.1, 10000) at steps 0 / 9999 / 10000 = {dropout_at(0, 0.1, 10000)} / "
               f"{dropout_at(9999, 0.1, 10000)} / {dropout_at(10000, 0.1, 10000)}; linear ramp at 5000 = "
               f"{dropout_at(5000, 0.1, 10000, 'linear'):.3f}"),
        _check("model interface", test_eval_mode_ignores_dropout_train_mode_applies_it,
               "model.set_dropout(p) exists; eval mode ignores p, train mode with p = 0.5 changes the output, "
               "p = 0 gives the eval output"),
        _check("every dropout layer updated", test_set_dropout_reaches_every_head_dropout_and_not_the_backbone,
               f"set_dropout(0.3) reaches all {n_drop} nn.Dropout and {n_attn} attention-dropout layers of the head, "
               "none of the backbone"),
    ]
    raise SystemExit(0 if all(results) else 1)
