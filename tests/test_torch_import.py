"""load_torch_checkpoint: torch.save files read without torch; code-running pickles refused."""
import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tinydiff
from tinydiff.torch_import import UnsafePickleError, load_torch_checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_committed_fixture_without_torch():
    """tests/make_fixtures.py wrote it; the values are recomputed here from their formulas."""
    state = load_torch_checkpoint(os.path.join(FIXTURES, "tiny_state_dict.pth"))
    base = np.arange(24, dtype=np.float32).reshape(4, 6) / 4
    expect = {
        "layer.weight": base,
        "layer.weight_t": base.T,                        # a transposed view
        "layer.slice": base[1:3, 2:5],                   # an offset view of the same storage
        "double": np.arange(5, dtype=np.float64) * 0.1,
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "long": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "half": (np.arange(6, dtype=np.float32) / 8).astype(np.float16),
        "bf16": np.arange(6, dtype=np.float32) - 2.5,    # bfloat16 comes back as float32
    }
    assert list(state) == list(expect)
    for k, v in expect.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        np.testing.assert_array_equal(state[k], v, err_msg=k)
        assert state[k].flags.c_contiguous and state[k].flags.writeable
    assert tinydiff.load_torch_checkpoint is load_torch_checkpoint


def test_malicious_fixture_is_refused():
    path = os.path.join(FIXTURES, "malicious.pth")
    with pytest.raises(UnsafePickleError, match=r"malicious\.pth.*'os\.system'"):
        load_torch_checkpoint(path)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)


def fake_pth(path, payload, storages=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        for key, data in storages:
            zf.writestr(f"archive/data/{key}", data)
    return path


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "exec"),
                                         ("subprocess", "Popen"), ("torch", "load"),
                                         ("numpy", "frombuffer")])
def test_any_other_global_is_refused(tmp_path, module, name):
    payload = f"c{module}\n{name}\n(S'1+1'\ntR.".encode()   # protocol 0: GLOBAL, args, REDUCE
    path = fake_pth(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafePickleError, match=rf"evil\.pth.*'{module}\.{name}'"):
        load_torch_checkpoint(path)


def test_stride_past_the_storage_is_refused(tmp_path):
    """A view whose strides point outside its storage must not read stray memory."""
    payload = (b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\n("
               b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
               b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89)tRs.")     # size (2, 3), stride (3, 1): 6 > 4
    path = fake_pth(tmp_path / "bad.pth", payload, [("0", np.zeros(4, np.float32).tobytes())])
    with pytest.raises(pickle.UnpicklingError, match="reads past its storage"):
        load_torch_checkpoint(path)
    short = fake_pth(tmp_path / "short.pth", payload, [("0", np.zeros(3, np.float32).tobytes())])
    with pytest.raises(pickle.UnpicklingError, match=r"short\.pth: storage data/0 has 12 bytes"):
        load_torch_checkpoint(short)


def test_legacy_and_non_state_dicts_are_refused_clearly(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(pickle.UnpicklingError, match=r"legacy\.pth: not a zip-format"):
        load_torch_checkpoint(legacy)
    path = fake_pth(tmp_path / "numbers.pth", pickle.dumps({"epoch": 3, "loss": 0.5}, protocol=2))
    with pytest.raises(ValueError, match=r"numbers\.pth: does not hold a state dict.*'epoch': 'int'"):
        load_torch_checkpoint(path)


def test_matches_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5, 7, generator=g)
    state = collections.OrderedDict([
        ("conv.weight", torch.randn(4, 3, 3, 3, generator=g)),
        ("conv.bias", torch.randn(4, generator=g, dtype=torch.float64)),
        ("view.t", big.t()),
        ("view.cols", big[:, 1::2]),
        ("view.tail", big[3:]),
        ("bn.running_var", torch.rand(4, generator=g)),
        ("bn.num_batches_tracked", torch.tensor(12345678901)),
        ("h", torch.randn(3, generator=g).half()),
        ("b", torch.randn(3, generator=g).bfloat16()),
        ("empty", torch.zeros(0, 3)),
        ("flag", torch.tensor([True, False])),
        ("param", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
    ])
    path = tmp_path / "sd.pth"
    torch.save(state, path)
    ours = load_torch_checkpoint(path)
    assert list(ours) == list(state)
    for k, t in state.items():
        ref = t.detach().float() if t.dtype == torch.bfloat16 else t.detach()
        np.testing.assert_array_equal(ours[k], ref.numpy(), err_msg=k)
        assert ours[k].dtype == ref.numpy().dtype, k

    nested = tmp_path / "nested.pth"                        # {"model": state_dict, ...}
    torch.save({"epoch": 4, "model": state, "optimizer": {"lr": 0.1}}, nested)
    assert list(load_torch_checkpoint(nested)) == list(state)
    np.testing.assert_array_equal(load_torch_checkpoint(nested, key="model")["h"], state["h"].numpy())

    module = tmp_path / "module.pth"                        # a whole pickled module: refused
    torch.save(torch.nn.Linear(2, 2), module)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_torch_checkpoint(module)


def test_torch_model_weights_load_into_tinydiff(tmp_path):
    """A course-style save: torch.save(model.state_dict()) loads into our module by key."""
    torch = pytest.importorskip("torch")
    from tinydiff import nn
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    tnet(torch.randn(2, 2, 5, 5))                           # move the running statistics
    torch.save(tnet.state_dict(), tmp_path / "m.pth")
    ours = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    ours.load_state_dict(load_torch_checkpoint(tmp_path / "m.pth"))
    for k, t in tnet.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k].data, t.numpy(), err_msg=k)


def test_no_torch_import_in_tinydiff():
    code = ("import sys, tinydiff, tinydiff.optim, tinydiff.checkpoint, tinydiff.torch_import; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
