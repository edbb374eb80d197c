"""The training core on a toy regression: what the loop computes (AdamW, clipping, accumulation, EMA), the loss
log, checkpoints and resume, against hand-written reference loops."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffprobe.errors import InputError
from diffprobe.training import LossLog, Trainer, TrainSettings, checkpoints

X = torch.linspace(-1, 1, 32).reshape(16, 2)
Y = X @ torch.tensor([[2.0], [-1.0]]) + 0.5


def toy():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 1)


def batches(size):
    def make(position, rank, world):
        while True:
            i = (position * world + rank) * size % len(X)
            yield X[i:i + size], Y[i:i + size]
            position += 1
    return make


def mse(batch, ctx):
    x, y = batch
    return torch.nn.functional.mse_loss(ctx.modules["m"](x), y)


def reference(settings: TrainSettings, size: int) -> torch.nn.Module:
    """The same training written out by hand with torch (no EMA)."""
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay)
    data = batches(size)(0, 0, 1)
    for _ in range(settings.steps):
        for _ in range(settings.accumulation):
            x, y = next(data)
            (torch.nn.functional.mse_loss(model(x), y) / settings.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_loop_is_adamw_with_clipping_and_accumulation(accumulation):
    settings = TrainSettings(steps=7, lr=0.05, accumulation=accumulation, ema_decay=None, device="cpu",
                             max_grad_norm=0.5)
    model = toy()
    result = Trainer(settings).fit({"m": model}, mse, batches(4), None)
    ref = reference(settings, 4)
    assert result.steps == 7 and result.trainable_parameters == 3
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    full_loss = torch.nn.functional.mse_loss
    assert full_loss(model(X), Y) < full_loss(toy()(X), Y)
    assert len(result.history) == 7


def test_the_saved_weights_are_the_ema_with_the_diffusers_ramp():
    settings = TrainSettings(steps=4, lr=0.1, ema_decay=0.5, device="cpu")
    model = toy()
    Trainer(settings).fit({"m": model}, mse, batches(4), None)
    raw = reference(TrainSettings(steps=4, lr=0.1, ema_decay=None, device="cpu"), 4)
    # By hand: the raw trajectory, and ema <- d*ema + (1-d)*p with d = min(0.5, (1+s)/(10+s)), s = step - 1
    # (diffusers' EMAModel: the first update copies, d = 0).
    opt_model = toy()
    opt = torch.optim.AdamW(opt_model.parameters(), lr=0.1, weight_decay=1e-2)
    data = batches(4)(0, 0, 1)
    ema = None
    for step in range(1, 5):
        x, y = next(data)
        torch.nn.functional.mse_loss(opt_model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(opt_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        p = opt_model.weight.detach().clone()
        s = step - 1
        d = 0.0 if s <= 0 else min(0.5, (1 + s) / (10 + s))
        ema = p if ema is None else d * ema + (1 - d) * p
    assert torch.equal(opt_model.weight, raw.weight)
    assert torch.allclose(model.weight, ema, atol=1e-7) and not torch.allclose(model.weight, raw.weight)


def test_resume_after_a_kill_equals_a_straight_run_and_the_log_continues(tmp_path):
    settings = TrainSettings(steps=8, lr=0.05, accumulation=2, ema_decay=0.9, checkpoint_every=3, log_every=4,
                             keep_checkpoints=2, device="cpu")
    straight = toy()
    Trainer(settings).fit({"m": straight}, mse, batches(2), tmp_path / "a")
    killed = toy()
    first = Trainer(settings).fit({"m": killed}, mse, batches(2), tmp_path / "b", stop=lambda s: s == 7)
    assert first.stopped and [s for s, _ in checkpoints(tmp_path / "b")] == [3, 6]
    again = toy()  # a fresh process: the model as built, state from the checkpoint of step 6
    second = Trainer(settings).fit({"m": again}, mse, batches(2), tmp_path / "b")
    assert second.resumed_from == 6 and second.steps == 8 and len(second.history) == 2
    assert torch.equal(again.weight, straight.weight) and torch.equal(again.bias, straight.bias)
    rows = [list(csv.DictReader(open(tmp_path / d / "loss.csv"))) for d in ("a", "b")]
    assert [r["step"] for r in rows[1]] == ["4", "8"]  # row 8 averages steps 5-8 across the kill
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]
    stored = json.loads((tmp_path / "b" / "training_settings.json").read_text())
    assert stored["settings"]["lr"] == 0.05 and "device" not in stored["settings"]


def test_other_settings_or_parameters_do_not_resume(tmp_path):
    settings = TrainSettings(steps=2, lr=0.05, checkpoint_every=1, device="cpu")
    Trainer(settings).fit({"m": toy()}, mse, batches(2), tmp_path, identity={"data": "a"})
    with pytest.raises(InputError, match=r"identity.data: 'a' \(stored\) != 'b' \(now\)"):
        Trainer(settings).fit({"m": toy()}, mse, batches(2), tmp_path, identity={"data": "b"})
    model = toy()
    model.bias.requires_grad_(False)
    with pytest.raises(InputError, match="other trainable parameters"):
        Trainer(settings).fit({"m": model}, mse, batches(2), tmp_path, identity={"data": "a"})


def test_a_second_trainer_in_a_busy_folder_is_refused_and_the_folder_frees_after(tmp_path):
    settings = TrainSettings(steps=3, lr=0.05, checkpoint_every=1, device="cpu")
    refused = []

    def loss_with_a_rival(batch, ctx):
        if ctx.step == 2:  # while this run holds the folder, a second trainer tries the same one
            with pytest.raises(InputError) as err:
                Trainer(settings).fit({"m": toy()}, mse, batches(2), tmp_path)
            refused.append(str(err.value))
        return mse(batch, ctx)

    result = Trainer(settings).fit({"m": toy()}, loss_with_a_rival, batches(2), tmp_path)
    assert result.steps == 3 and refused == [
        f"another process is training in {tmp_path}; wait for it to finish, or train into another folder"]
    assert [s for s, _ in checkpoints(tmp_path)] == [3]  # the run finished as if alone
    again = Trainer(TrainSettings(steps=4, lr=0.05, checkpoint_every=1, device="cpu"))
    with pytest.raises(InputError, match="other settings"):  # free again: refused for its settings, not the lock
        again.fit({"m": toy()}, mse, batches(2), tmp_path)


def test_frozen_modules_and_bad_settings():
    model = toy().requires_grad_(False)
    with pytest.raises(InputError, match="nothing to train"):
        Trainer(TrainSettings(steps=1, lr=0.1, device="cpu")).fit({"m": model}, mse, batches(2), None)
    with pytest.raises(InputError, match="needs a CUDA device"):
        Trainer(TrainSettings(steps=1, lr=0.1, device="cpu", mixed_precision="fp16"))
    with pytest.raises(InputError, match="learning rate"):
        TrainSettings(steps=1, lr=0)


def test_loss_log_resume_drops_rows_after_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "loss.csv"
    log = LossLog(path, every=2)
    for step in range(1, 7):
        log.add("train", step, torch.tensor(float(step)))
    log.close()
    log = LossLog.resume(path, every=2, phase="train", step=3, running=3.0, elapsed=5.0)
    log.add("train", 4, torch.tensor(5.0))
    log.close()
    rows = list(csv.DictReader(open(path)))
    assert [(r["step"], float(r["loss"])) for r in rows] == [("2", 1.5), ("4", 4.0)]
    assert float(rows[-1]["elapsed_s"]) >= 5.0
