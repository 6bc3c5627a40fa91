"""A time budget plans the run's length from its own speed, saves the plan, and anneals to it."""
import json
import os

import numpy as np
import pytest

from tinydiff import checkpoint, train

TINY = dict(n_feat=8, batch_size=8, timesteps=10, sample_steps=2, sample_per_class=1, checkpoint_every=7, warmup=10)


@pytest.fixture(autouse=True)
def short_plan(monkeypatch):
    """The planning window scaled down to these tiny runs: steps 5 to 25 timed, 3% kept in reserve."""
    monkeypatch.setattr(train, "PLAN_FROM", 5)
    monkeypatch.setattr(train, "PLAN_STEPS", 20)
    monkeypatch.setattr(train, "PLAN_RESERVE", 0.03)


def test_plan_steps_counts_what_fits():
    assert train.plan_steps(25, 0.1, 10.0) == 125                 # 100 more steps of 0.1 s
    assert train.plan_steps(25, 0.1, -3.0) == 26                  # the budget already spent: one more


def test_learning_rate_before_the_plan_is_the_peak_or_the_warm_up():
    cfg = dict(lr=1e-3, lr_schedule="linear", warmup=0)
    assert train.learning_rate(cfg, 3, None) == 1e-3
    cfg.update(lr_schedule="cosine", warmup=10)
    assert train.learning_rate(cfg, 3, None) == pytest.approx(3e-4)
    assert train.learning_rate(cfg, 3, 100) == pytest.approx(3e-4)   # the same once planned: warm-up ignores total


def run_cfg(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


class FakeClock:
    """time.time() for train.py: each call moves it on by `tick` seconds, so that a step costs the
    same time whatever the machine is doing (a test must not depend on the machine's load)."""

    def __init__(self, tick):
        self.now, self.tick = 1e9, tick

    def time(self):
        self.now += self.tick
        return self.now


def test_a_budget_plans_the_length_and_the_run_ends_there(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "time", FakeClock(0.01))          # two calls a step: 20 ms a step
    out = str(tmp_path / "run")
    train.train(dict(TINY, out=out, time_budget=0.02), progress=False)   # 1.2 s of the fake clock
    cfg = run_cfg(out)
    planned = cfg["planned_steps"]
    assert cfg["total_steps"] == planned and 50 <= planned <= 58     # (1.2 s * 0.97 - 25 steps' 0.5 s) / 20 ms + 25
    info = checkpoint.load_checkpoint(out)
    assert info["step"] == planned                                # it ran to its plan, not cut by the budget
    assert train.learning_rate(cfg, planned, planned) == 0.0      # and the schedule annealed to 0


def test_a_planned_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Stopped after its plan and resumed, a run ends where the uninterrupted one does (the plan is
    fixed here to 40 steps, so that both runs plan the same)."""
    monkeypatch.setattr(train, "plan_steps", lambda step, per_step, left: 40)
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    train.train(dict(TINY, out=whole, time_budget=5), progress=False)
    real_save = train.save_run
    calls = []

    def save_then_stop(cfg, model, opt, ema, step, *rest):      # a Ctrl-C right after step 28's checkpoint
        real_save(cfg, model, opt, ema, step, *rest)
        calls.append(step)
        if step == 28:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_run", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train(dict(TINY, out=part, time_budget=5), progress=False)
    monkeypatch.setattr(train, "save_run", real_save)
    assert run_cfg(part)["planned_steps"] == 40
    train.train(dict(out=part), resume=True, progress=False)
    a, b = checkpoint.load_checkpoint(whole), checkpoint.load_checkpoint(part)
    assert a["step"] == b["step"] == 40
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        pa, pb = os.path.join(a["dir"], name), os.path.join(b["dir"], name)
        if os.path.exists(pa):
            wa, _ = checkpoint.read_safetensors(pa)
            wb, _ = checkpoint.read_safetensors(pb)
            assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa), name


def test_a_run_stopped_before_its_plan_plans_when_resumed(tmp_path, monkeypatch):
    """Ctrl-C at step 10, before the plan (at step 25): the resumed run times its own first steps."""
    monkeypatch.setattr(train, "time", FakeClock(0.01))
    out = str(tmp_path / "run")
    real_save = train.save_run

    def save_then_stop(cfg, model, opt, ema, step, *rest):
        real_save(cfg, model, opt, ema, step, *rest)
        if step == 7:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_run", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train(dict(TINY, out=out, time_budget=0.02), progress=False)
    assert "planned_steps" not in run_cfg(out)                   # stopped before its plan
    monkeypatch.setattr(train, "save_run", real_save)
    train.train(dict(out=out), resume=True, progress=False)
    planned = run_cfg(out)["planned_steps"]
    assert planned > 7 + train.PLAN_FROM + train.PLAN_STEPS
    assert checkpoint.load_checkpoint(out)["step"] == planned


def test_the_eta_is_the_sooner_of_the_steps_left_and_the_budget_left(monkeypatch):
    """Under a budget the bar's ETA never runs past the budget's end (the run stops there), and
    where the steps left end sooner it is tqdm's own estimate."""
    clock = FakeClock(0.0)
    monkeypatch.setattr(train, "time", clock)
    bars = [train._progress_bar(1000, 0, True, deadline=clock.now + 3),      # 995 steps left, 3 s of budget
            train._progress_bar(1000, 0, True),                             # no budget
            train._progress_bar(10, 0, True, deadline=clock.now + 1e6)]     # 5 steps left, budget to spare
    for bar in bars:
        bar.n = 5
        bar._ema_dn, bar._ema_dt = (lambda: 5.0), (lambda: 1.0)             # tqdm's rate: 5 steps a second
    budget, plain, far = (bar.format_dict for bar in bars)
    assert budget["rate"] == 5.0 and budget["remaining"] == "00:03"        # not 995 / 5 = 03:19
    assert "<00:03," in str(bars[0])
    assert "remaining" not in plain and "<03:19," in str(bars[1])          # tqdm's own estimate
    assert far["remaining"] == "00:01"                                     # 5 steps at 5 a second
    for bar in bars:
        bar.close()
