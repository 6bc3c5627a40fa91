"""Regenerate the small committed files under tests/fixtures/ (needs torch for the first one).

    python tests/make_fixtures.py

tiny_state_dict.pth   torch.save of a small state dict whose values are arange-based, so the
                      tests can recompute them without torch: a plain tensor, a transposed
                      (non-contiguous) view and an offset slice of it sharing one storage,
                      float64, int64 (0-d, like BatchNorm's num_batches_tracked), float16 and
                      bfloat16.
malicious.pth         a torch-zip-shaped archive whose data.pkl, written by hand in pickle
                      protocol 0, calls os.system("echo ...") when unpickled by plain pickle.
                      Harmless (it only echoes), and loading it with tinydiff must refuse.
"""
import collections
import os
import zipfile

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# A dict {"weight": os.system("echo ...")}: GLOBAL 'os system', MARK, string, TUPLE, REDUCE.
MALICIOUS_PICKLE = (b"(dp0\nS'weight'\np1\n"
                    b"cos\nsystem\np2\n(S'echo tinydiff malicious fixture executed'\np3\ntp4\nRp5\n"
                    b"s.")


def tiny_state_dict(torch):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 4   # exact in float32 and float16
    state = collections.OrderedDict()
    state["layer.weight"] = base
    state["layer.weight_t"] = base.t()                   # non-contiguous: strides (1, 6)
    state["layer.slice"] = base[1:3, 2:5]                # offset 8 into the same storage
    state["double"] = torch.arange(5, dtype=torch.float64) * 0.1
    state["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    state["long"] = torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3)
    state["half"] = (torch.arange(6, dtype=torch.float32) / 8).to(torch.float16)
    state["bf16"] = (torch.arange(6, dtype=torch.float32) - 2.5).to(torch.bfloat16)
    return state


def main():
    import torch
    os.makedirs(HERE, exist_ok=True)
    torch.save(tiny_state_dict(torch), os.path.join(HERE, "tiny_state_dict.pth"))
    with zipfile.ZipFile(os.path.join(HERE, "malicious.pth"), "w") as zf:
        zf.writestr("malicious/data.pkl", MALICIOUS_PICKLE)
        zf.writestr("malicious/byteorder", "little")
        zf.writestr("malicious/version", "3\n")
    print("wrote", sorted(os.listdir(HERE)))


if __name__ == "__main__":
    main()
