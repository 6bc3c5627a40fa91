"""A run folder under stress: one writer at a time, readers that always get a whole checkpoint,
a full disk (ENOSPC) or a failing disk (EIO) survived, and the soak: a training run killed with
SIGKILL at several moments, a checkpoint write among them, resumed each time to bit-identical
weights.

Run:  python -m pytest tests/test_hardening.py -q
The C++ side of the hardening (ASan and UBSan on the kernels) is scripts/sanitize.sh.
"""
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from test_cli import TINY, assert_same_run, run
from tinydiff import checkpoint, cli, optim, runs
from tinydiff.checkpoint import RunLock, RunLocked, WriteError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 4-step run, checkpoints at 2 and 4 (the model of every test below)."""
    out = tmp_path_factory.mktemp("runs") / "small"
    assert run("train", "--out", out, "--steps", 4, "--checkpoint-every", 2, *TINY) == 0
    return out


def child(code, *args):
    """A Python child process running `code` (which prints READY when it is where we want it)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    for line in proc.stdout:
        if line.strip() == "READY":
            return proc
    proc.wait()
    raise AssertionError(f"the child exited ({proc.returncode}) before it was ready")


# ---------------------------------------------------------------------------------------------
# One writer per run folder

HOLD_LOCK = """
    import sys, time
    from tinydiff.checkpoint import RunLock
    with RunLock(sys.argv[1]):
        print("READY", flush=True)
        time.sleep(120)
"""


def test_second_writer_is_refused_with_the_holders_pid_until_it_is_killed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--out", out, "--steps", 2, *TINY) == 0
    holder = child(HOLD_LOCK, out)
    try:
        with pytest.raises(RunLocked, match=f"being written by process {holder.pid} "):
            with RunLock(out):
                pass
        capsys.readouterr()
        assert run("train", "--out", out, "--resume", "--steps", 4, *TINY) == 1
        err = capsys.readouterr().err
        assert f"being written by process {holder.pid}" in err, err
        assert load_checkpoint(str(out))["step"] == 2             # the refused one wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)                       # no clean-up code runs
        holder.wait()
    assert run("train", "--out", out, "--resume", "--steps", 4, *TINY) == 0   # the lock died with it
    assert load_checkpoint(str(out))["step"] == 4
    with RunLock(out):                                           # and is free again after train()
        pass


def test_reader_keeps_its_checkpoint_while_the_writer_replaces_it(tmp_path, small_run):
    """keep=1 removes the previous folder after the manifest swap, but not while a reader holds it."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    model = runs.model_from_config(load_checkpoint(str(out))["config"])
    with checkpoint.reading(str(out)):
        info = load_checkpoint(str(out))                          # the reader finds step 4 ...
        assert info["step"] == 4
        save_checkpoint(str(out), model, None, 5)                 # ... the trainer saves step 5
        save_checkpoint(str(out), model, None, 6)                 # ... and 6
        assert load_checkpoint(str(out))["step"] == 6
        checkpoint.load_weights(model, os.path.join(info["dir"], "ema.safetensors"))   # still all there
        load_checkpoint(str(out), step=None)
    steps = sorted(d for d in os.listdir(out) if d.startswith("step-"))
    assert steps == ["step-00000004", "step-00000005", "step-00000006"]
    save_checkpoint(str(out), model, None, 7)                     # no reader now: old ones go
    assert sorted(d for d in os.listdir(out) if d.startswith("step-")) == ["step-00000007"]


READ_IN_A_LOOP = """
    import sys
    from tinydiff import runs
    print("READY", flush=True)
    for i in range(int(sys.argv[2])):
        model, schedule, cfg = runs.load_run(sys.argv[1])          # checks every file's sha256
    print("DONE", flush=True)
"""


def test_sample_reads_a_run_being_trained(tmp_path, small_run):
    """A reader process loading the run again and again while this process saves 30 checkpoints."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    cfg = load_checkpoint(str(out))["config"]
    model = runs.model_from_config(cfg)
    ema = optim.EMA(model, decay=0.9)
    reader = child(READ_IN_A_LOOP, out, 40)
    step = 5
    while reader.poll() is None and step < 200:
        save_checkpoint(str(out), model, None, step, ema=ema, config=cfg)
        step += 1
    rest = reader.stdout.read()
    assert reader.wait() == 0 and "DONE" in rest, rest
    assert step > 6, "the reader finished before the writer saved twice: the test saw no overlap"


# ---------------------------------------------------------------------------------------------
# A full disk, or a failing one

def failing_writes(monkeypatch, code, where, name=None, after=0):
    """Make the checkpoint module's writes of the file `name` (any file when None) fail with
    `code`, all but the first `after` of them: `write` writes half of the bytes and then fails,
    as a disk that fills up does; `fsync` fails on fsync (where a delayed write error shows);
    `replace` fails on the rename."""
    real_open, real_fsync, real_replace = open, os.fsync, os.replace
    hits = []

    def hit(path):
        if name is None or os.path.basename(str(path)).startswith(name + ".tmp"):
            hits.append(path)
            return len(hits) > after
        return False
    error = OSError(code, os.strerror(code))

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise error

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def bad_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWritten(f) if "x" in mode and hit(path) else f

    opened = {}

    def remember_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        opened[f.fileno()] = str(path)
        return f

    def bad_fsync(fd):
        if fd in opened and hit(opened.pop(fd)):          # (pop: the fd number is reused later)
            raise error
        real_fsync(fd)

    def bad_replace(src, dst):
        if hit(src):
            raise error
        real_replace(src, dst)

    if where == "write":
        monkeypatch.setattr(checkpoint, "open", bad_open, raising=False)
    elif where == "fsync":
        monkeypatch.setattr(checkpoint, "open", remember_open, raising=False)
        monkeypatch.setattr(os, "fsync", bad_fsync)
    else:
        monkeypatch.setattr(os, "replace", bad_replace)


def no_temporary_files(folder):
    return [f for _, _, fs in os.walk(folder) for f in fs if ".tmp" in f] == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("where, name, after", [   # after: the writes of that name in step 2's save
    ("write", "train_state.safetensors", 1), ("fsync", "model.safetensors", 2), ("replace", "checkpoint.json", 1)])
def test_a_failing_checkpoint_write_stops_training_and_keeps_the_previous(tmp_path, small_run, monkeypatch,
                                                                          capsys, code, where, name, after):
    out = tmp_path / "run"
    failing_writes(monkeypatch, code, where, name, after)        # the save at step 4 fails
    capsys.readouterr()
    assert run("train", "--out", out, "--steps", 4, "--checkpoint-every", 2, *TINY) == 1
    err = capsys.readouterr().err
    folder = "checkpoint.json" if name == "checkpoint.json" else os.path.join("step-00000004", name)
    assert f"{os.path.join(out, folder)}: not written ({os.strerror(code)})" in err, err
    assert "the checkpoint of step 4 was not saved" in err and "checkpoint of step 2 is intact" in err, err
    monkeypatch.undo()
    assert load_checkpoint(str(out))["step"] == 2
    assert sorted(d for d in os.listdir(out) if d.startswith("step-")) == ["step-00000002"]
    assert no_temporary_files(out)
    # the disk has room again: resume, and end exactly where the uninterrupted run ends
    assert run("train", "--out", out, "--resume", "--steps", 4, "--checkpoint-every", 2, *TINY) == 0
    assert_same_run(out, small_run)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("name", ["samples.npz", "samples.png", "denoising.gif"])
def test_a_failing_sample_write_names_the_file_and_keeps_the_old_one(tmp_path, small_run, monkeypatch,
                                                                     capsys, code, name):
    out = tmp_path / "samples"
    argv = ["sample", "--checkpoint", small_run, "--steps", 2, "--n", 2, "--gif", "--out", out]
    assert run(*argv) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    failing_writes(monkeypatch, code, "write", name)
    capsys.readouterr()
    assert run(*argv, "--seed", 1) == 1
    err = capsys.readouterr().err
    assert f"{os.path.join(out, name)}: not written ({os.strerror(code)})" in err, err
    assert (out / name).read_bytes() == before[name]               # the old file, whole
    assert no_temporary_files(out)


def test_write_atomic_refuses_without_touching_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    checkpoint.write_atomic(str(path), b"old")
    failing_writes(monkeypatch, errno.ENOSPC, "write")
    with pytest.raises(WriteError, match="f.bin: not written .No space left on device.") as info:
        checkpoint.write_atomic(str(path), b"new content")
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


# ---------------------------------------------------------------------------------------------
# The soak: SIGKILL at several moments, resume each time, end bit for bit where the
# uninterrupted run ends

# The child: `tinydiff train`, paused (then killed by the test) at the moment SOAK_PAUSE names:
#   "step N"           after its N-th optimizer step
#   "writing F N"      in the N-th write of a file named F, half of it on disk (a .tmp file)
#   "wrote F N"        just after the N-th write of F (e.g. checkpoint.json: the new checkpoint
#                      is current, the old folder not yet removed)
SOAK_CHILD = """
    import os, sys, time
    from tinydiff import checkpoint, cli, optim

    kind, *rest = os.environ["SOAK_PAUSE"].split()
    count = {"n": 0}

    def pause():
        print("READY", flush=True)
        time.sleep(600)

    if kind == "step":
        real_step = optim.Adam.step
        def step(self):
            real_step(self)
            count["n"] += 1
            if count["n"] == int(rest[0]):
                pause()
        optim.Adam.step = step
    else:
        name, nth = rest[0], int(rest[1])
        real_write = checkpoint.write_atomic
        def write_atomic(path, data):
            if os.path.relpath(path, sys.argv[sys.argv.index("--out") + 1]).endswith(name):
                count["n"] += 1
                if count["n"] == nth and kind == "writing":
                    with open(f"{path}.tmp-{os.getpid()}-soak", "xb") as f:
                        f.write(data[:len(data) // 2])
                    pause()
                real_write(path, data)
                if count["n"] == nth:
                    pause()
                return
            real_write(path, data)
        checkpoint.write_atomic = write_atomic
    sys.exit(cli.main(sys.argv[1:]))
"""

SOAK_ARGS = ["--steps", 12, "--checkpoint-every", 3, *TINY]


def train_until_killed(out, pause, resume):
    argv = ["train", "--out", out, *SOAK_ARGS] + (["--resume"] if resume else [])
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SOAK_CHILD), *map(str, argv)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "SOAK_PAUSE": pause})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "READY":
            proc.send_signal(signal.SIGKILL)
            break
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"{pause}: the child ended ({rc}) before that moment:\n{''.join(lines)}"


def test_soak_sigkill_at_several_moments_then_resume_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    run_ = subprocess.run([sys.executable, "-m", "tinydiff", "train", "--out", str(reference),
                           *map(str, SOAK_ARGS)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True)
    assert run_.returncode == 0, run_.stderr

    # 12 steps, checkpoints at 3, 6, 9, 12; each save writes step-N/model.safetensors,
    # train_state.safetensors, train_state.json, ema.safetensors, checkpoint.json, then the run's
    # model.safetensors. The moments (seeded: the same on every run) and where each run resumes:
    rng = random.Random(16)
    moments = [
        f"writing model.safetensors {rng.randint(2, 3)}",      # in the run's weights (2) or step 6's (3): from 3
        f"step {rng.randint(1, 2)}",                           # between two checkpoints: from 3
        "wrote checkpoint.json 1",                             # step 6 current, step 3 not yet removed: from 6
        "writing train_state.json 2",                          # in step 12's: from 9
        "writing checkpoint.json 1",                           # in step 12's manifest: from 9
        f"step {rng.randint(1, 2)}",                           # step 10 or 11: from 9
    ]
    out = tmp_path / "killed"
    steps_seen = []
    for i, moment in enumerate(moments):
        train_until_killed(out, moment, resume=i > 0)
        steps_seen.append(load_checkpoint(str(out))["step"])     # always one whole checkpoint
    # the last resume in a fresh process too, as the reference ran: this process's earlier tests may
    # have left kernel settings that round differently (a conv version, BLAS threads)
    last = subprocess.run([sys.executable, "-m", "tinydiff", "train", "--out", str(out), "--resume",
                           *map(str, SOAK_ARGS)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True)
    assert last.returncode == 0, last.stderr
    print("checkpoint steps after each kill:", steps_seen)
    assert steps_seen == [3, 3, 6, 9, 9, 9]
    assert_same_run(out, reference)
    assert no_temporary_files(out)
    folders = [d for d in os.listdir(out) if d.startswith("step-")]   # the debris of killed saves is gone
    assert folders == [os.path.basename(load_checkpoint(str(out))["dir"])], folders
