"""Weights files and run-folder checkpoints: round trips, refusals, atomicity, exact resumption."""
import os

import numpy as np
import pytest
import safetensors.numpy

from tinydiff import backend, checkpoint, nn
from tinydiff.checkpoint import (CheckpointError, load_checkpoint, load_weights, save_checkpoint,
                                 save_weights)
from tinydiff.optim import EMA, Adam, clip_grad_norm_, cosine_with_warmup
from tinydiff.tensor import Tensor


def small_net(channels=3):
    """Conv-BatchNorm-ReLU-Dropout-Conv: parameters, float and int64 buffers, random dropout."""
    return nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Dropout(0.2), nn.Conv2d(channels, 2, 3, padding=1))


def train(model, opt, ema, start, n, total=12):
    """Denoising steps: data and noise from backend.generator, dropout masks from tinydiff.philox (both saved)."""
    for step in range(start, start + n):
        rng = backend.generator("cpu")
        opt.lr = cosine_with_warmup(step, total, 1e-2, warmup=2)
        x0 = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        device = model.parameters()[0].device               # the batch goes where the model is
        loss = ((model(Tensor(x0 + eps).to(device)) - Tensor(eps).to(device)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update()


def arrays_of(model):
    return {k: t.data.copy() for k, t in model.state_dict().items()}


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def flip_byte(path, where):
    data = bytearray(open(path, "rb").read())
    data[where] ^= 0xFF
    open(path, "wb").write(bytes(data))


def trained(steps=2, seed=0):
    backend.manual_seed(seed)
    model = small_net()
    opt = Adam(model.parameters())
    ema = EMA(model, decay=0.9)
    train(model, opt, ema, 0, steps)
    return model, opt, ema


# --- weights files --------------------------------------------------------------------------

def test_weights_round_trip_is_bitwise_with_pytorch_keys(tmp_path):
    model, _, _ = trained()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    raw = safetensors.numpy.load_file(str(path))            # a plain safetensors file
    assert sorted(raw) == sorted(model.state_dict())
    assert raw["1.num_batches_tracked"].dtype == np.int64 and raw["1.num_batches_tracked"].shape == ()
    other = small_net()
    load_weights(other, path)
    assert_same(arrays_of(model), arrays_of(other))
    assert os.listdir(tmp_path) == ["model.safetensors"]   # no temporary file left behind


def test_weights_move_to_torch_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch
    model, _, _ = trained()
    save_weights(model, tmp_path / "ours.safetensors")
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                               torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Conv2d(3, 2, 3, padding=1))
    tnet.load_state_dict(safetensors.torch.load_file(tmp_path / "ours.safetensors"))   # strict
    for k, t in tnet.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), model.state_dict()[k].data, err_msg=k)
    with torch.no_grad():
        for p in tnet.parameters():
            p.mul_(2)
    safetensors.torch.save_file(tnet.state_dict(), tmp_path / "theirs.safetensors")
    load_weights(model, tmp_path / "theirs.safetensors")
    for k, t in tnet.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), model.state_dict()[k].data, err_msg=k)


def test_weights_that_do_not_fit_are_refused_with_keys_and_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(small_net(channels=3), path)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*shape mismatch: 0\.weight: "
                                              r"weights \(3, 2, 3, 3\), model \(4, 2, 3, 3\)"):
        load_weights(small_net(channels=4), path)

    state = {k: v for k, v in safetensors.numpy.load_file(str(path)).items() if k != "1.running_var"}
    state["extra.bias"] = np.zeros(5, np.float32)
    save_weights(state, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(small_net(), path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (in the model, not the weights): 1.running_var (3,)" in message
    assert "unexpected keys (in the weights, not the model): extra.bias (5,)" in message
    # one wording: load_state_dict refuses the same mismatch in the same words, less the file name
    with pytest.raises(ValueError) as direct:
        small_net().load_state_dict(safetensors.numpy.load_file(str(path)))
    assert message == f"{path}: {direct.value}"
    before = arrays_of(small_net())
    loose = small_net()
    load_weights(loose, path, strict=False)                 # non-strict: takes what fits
    assert set(arrays_of(loose)) == set(before)


@pytest.mark.parametrize("damage", ["truncate", "header", "data", "empty"])
def test_damaged_weights_file_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_weights(small_net(), path)
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size - 10)
    elif damage == "header":
        flip_byte(path, 12)                                 # inside the JSON header
    elif damage == "data":
        flip_byte(path, size - 3)                           # inside the last tensor's bytes
    else:
        open(path, "wb").close()
    with pytest.raises(CheckpointError, match=str(path)):
        load_weights(small_net(), path)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    model = small_net()
    save_weights(model, path)
    old = open(path, "rb").read()

    def crash(*args):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_weights(small_net(), path)
    assert open(path, "rb").read() == old
    assert os.listdir(tmp_path) == ["model.safetensors"]


# --- run folders ----------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model, opt, ema = trained()
    rng_state = backend.get_rng_state()
    extra = {"epoch": 3, "loader": {"position": 17, "order": np.arange(5)}, "sched": [1, 2.5]}
    save_checkpoint(tmp_path, model, opt, step=2, ema=ema, extra=extra, config={"channels": 3})
    backend.manual_seed(123)

    info = load_checkpoint(tmp_path)                        # without a model: only reads
    assert info["step"] == 2 and info["config"] == {"channels": 3}
    assert backend.get_rng_state() != rng_state

    model2 = small_net()
    opt2 = Adam(model2.parameters(), lr=0.5)                # hyper-parameters come from the file
    ema2 = EMA(model2, decay=0.5)
    info = load_checkpoint(tmp_path, model2, opt2, ema2)
    assert info["extra"]["epoch"] == 3 and info["extra"]["sched"] == [1, 2.5]
    np.testing.assert_array_equal(info["extra"]["loader"]["order"], np.arange(5))
    assert backend.get_rng_state() == rng_state
    assert_same(arrays_of(model), arrays_of(model2))
    assert_same(ema.state_dict(), ema2.state_dict())
    assert opt2.lr == opt.lr and opt2.betas == opt.betas and ema2.decay == ema.decay
    for s, s2 in zip(opt.state, opt2.state):
        assert s["step"] == s2["step"]
        np.testing.assert_array_equal(s["exp_avg"], s2["exp_avg"])
        np.testing.assert_array_equal(s["exp_avg_sq"], s2["exp_avg_sq"])

    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                   for d, _, fs in os.walk(tmp_path) for f in fs)
    assert files == ["checkpoint.json", "readers.lock", "step-00000002/ema.safetensors",
                     "step-00000002/model.safetensors", "step-00000002/train_state.json",
                     "step-00000002/train_state.safetensors"]


def test_keep_and_pick_a_step(tmp_path):
    model, opt, ema = trained()
    weights = {}
    for step in (1, 2, 3):
        model[0].bias.data = model[0].bias.data + 1
        weights[step] = arrays_of(model)
        save_checkpoint(tmp_path, model, opt, step, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "readers.lock", "step-00000002", "step-00000003"]
    for step in (2, 3):
        other = small_net()
        assert load_checkpoint(tmp_path, other, step=step)["step"] == step
        assert_same(weights[step], arrays_of(other))
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 1 \(kept: \[2, 3\]\)"):
        load_checkpoint(tmp_path, small_net(), step=1)
    save_checkpoint(tmp_path, model, opt, 3, keep=2)        # the same step again: a new folder
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "readers.lock", "step-00000003", "step-00000003-1"]


@pytest.mark.parametrize("crash_at", ["model.safetensors", "train_state.json", "checkpoint.json"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    model, opt, ema = trained()
    save_checkpoint(tmp_path, model, opt, 1, ema=ema)
    at_step1 = arrays_of(model)
    train(model, opt, ema, 2, 1)

    real_write = checkpoint.write_atomic

    def crashing_write(path, data):
        if os.path.basename(path) == crash_at:
            raise KeyboardInterrupt("killed (simulated)")
        real_write(path, data)
    monkeypatch.setattr(checkpoint, "write_atomic", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, 2, ema=ema)
    monkeypatch.undo()

    restored = small_net()
    assert load_checkpoint(tmp_path, restored, Adam(restored.parameters()), EMA(restored))["step"] == 1
    assert_same(at_step1, arrays_of(restored))
    (tmp_path / "checkpoint.json.tmp-1-dead").write_bytes(b"{")   # as a SIGKILL would leave it
    save_checkpoint(tmp_path, model, opt, 3, ema=ema)       # the next save clears the debris
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "readers.lock", "step-00000003"]
    assert not any(".tmp" in f for _, _, fs in os.walk(tmp_path) for f in fs)


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "train_state.json",
                                  "train_state.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_file_is_refused_naming_it(tmp_path, name, damage):
    model, opt, ema = trained()
    folder = save_checkpoint(tmp_path, model, opt, 2, ema=ema)
    path = os.path.join(folder, name)
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "flip":
        flip_byte(path, os.path.getsize(path) // 2)
    else:
        os.remove(path)
    fresh = small_net()
    with pytest.raises(CheckpointError, match=path):
        load_checkpoint(tmp_path, fresh, Adam(fresh.parameters()), EMA(fresh))


def test_corrupt_manifest_is_refused_naming_it(tmp_path):
    model, opt, _ = trained()
    save_checkpoint(tmp_path, model, opt, 2)
    manifest = tmp_path / "checkpoint.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointError, match=str(manifest)):
        load_checkpoint(tmp_path, small_net())
    with pytest.raises(CheckpointError, match=str(manifest)):   # nor is it overwritten blindly
        save_checkpoint(tmp_path, model, opt, 3)
    with pytest.raises(CheckpointError, match="manifest not found"):
        load_checkpoint(tmp_path / "nothing", small_net())


def test_checkpoint_into_a_different_model_is_refused(tmp_path):
    model, opt, ema = trained()
    save_checkpoint(tmp_path, model, opt, 2, ema=ema)
    wide = small_net(channels=5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*0\.weight: weights \(3, 2, 3, 3\), "
                                              r"model \(5, 2, 3, 3\)"):
        load_checkpoint(tmp_path, wide, Adam(wide.parameters()))


def test_resume_equals_uninterrupted(tmp_path):
    """Same seed, CPU: N steps, save, rebuild everything, load, N more == 2N steps, bit for bit."""
    n = 3
    backend.manual_seed(0)
    model_a = small_net()
    opt_a, ema_a = Adam(model_a.parameters()), EMA(model_a, decay=0.8)
    train(model_a, opt_a, ema_a, 0, 2 * n)

    backend.manual_seed(0)
    model_b = small_net()
    opt_b, ema_b = Adam(model_b.parameters()), EMA(model_b, decay=0.8)
    train(model_b, opt_b, ema_b, 0, n)
    save_checkpoint(tmp_path, model_b, opt_b, n, ema=ema_b, extra={"epoch": 0})
    del model_b, opt_b, ema_b

    backend.manual_seed(999)                                # a different global state in between
    model_c = small_net()                                   # with different initial weights
    opt_c, ema_c = Adam(model_c.parameters()), EMA(model_c, decay=0.8)
    step = load_checkpoint(tmp_path, model_c, opt_c, ema_c)["step"]
    train(model_c, opt_c, ema_c, step, n)

    assert_same(arrays_of(model_a), arrays_of(model_c))
    assert_same(ema_a.state_dict(), ema_c.state_dict())
    for s, s2 in zip(opt_a.state, opt_c.state):
        np.testing.assert_array_equal(s["exp_avg_sq"], s2["exp_avg_sq"])


def test_gpu_checkpoint_loads_on_cpu(tmp_path):
    ok, why = backend.cuda_available(reason=True)
    if not ok:
        pytest.skip(f"no GPU: {why}")
    model, opt, ema = trained()
    model.to("cuda")
    opt_gpu = Adam(model.parameters())
    opt_gpu.load_state_dict(opt.state_dict())
    ema_gpu = EMA(model, decay=0.9)
    train(model, opt_gpu, ema_gpu, 2, 1)
    save_checkpoint(tmp_path, model, opt_gpu, 3, ema=ema_gpu)
    cpu = small_net()
    cpu_opt, cpu_ema = Adam(cpu.parameters()), EMA(cpu)
    load_checkpoint(tmp_path, cpu, cpu_opt, cpu_ema)
    for k, t in model.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), cpu.state_dict()[k].data)
    assert all(backend.device_of(s["exp_avg"]) == "cpu" for s in cpu_opt.state)
    back = small_net().to("cuda")                           # and from the CPU back to the GPU
    back_opt = Adam(back.parameters())
    load_checkpoint(tmp_path, back, back_opt)
    assert all(backend.device_of(s["exp_avg"]) == "cuda" for s in back_opt.state)
    for k, t in back.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), cpu.state_dict()[k].data)
