"""Each demo runs end to end at a tiny size, writes valid pictures, and computes what it says.

The demos run as the README shows them, `python demos/NN_name.py ...`, in a subprocess. Demo 02
trains one tiny run (module fixture) that demos 04-06 sample from with --checkpoint; demo 03
runs with --tiny alone, so the path that trains its own throwaway model is tested too.
What a demo computes is checked in what it writes: its printed numbers against the formulas
by hand (01), its image grids tile by tile against the same samples drawn here with the
library (03, 04), its score tables against a row scored here (05) and against each other (06).
"""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = os.path.join(ROOT, "demos")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(name, *args, ok=True):
    env = dict(os.environ)
    # On a busy machine, OpenMP's and OpenBLAS's spinning worker threads make tiny ops 10-50x slower;
    # the demos' results do not depend on threads, so the test runs them single-minded.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(DEMOS, name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if not ok:
        return proc
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def import_demo(module_name, file_name):
    """A demo as a module (for its constants), with demos/ on the path for its `_common` import."""
    sys.path.insert(0, DEMOS)
    try:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(DEMOS, file_name))
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
    finally:
        sys.path.remove(DEMOS)
    return demo


def assert_png(path):
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= 16 and img.size[1] >= 16, (path, img.size)


def assert_gif(path, min_frames=2):
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(6) in (b"GIF87a", b"GIF89a"), f"{path} is not a GIF"
    with Image.open(path) as img:
        assert img.n_frames >= min_frames, (path, img.n_frames)


def read_grid(path_or_image, ncol, h=16, pad=1, scale=4):
    """The tiles of a picture written by pictures.image_grid: (rows, ncol, h, h) gray values in [0, 1]."""
    from PIL import Image
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    gray = np.asarray(img.convert("RGB"))[::scale, ::scale, 0] / 255.0     # one value per drawn pixel
    nrow = (gray.shape[0] - pad) // (h + pad)
    return np.stack([[gray[pad + r * (h + pad):][:h, pad + c * (h + pad):][:, :h] for c in range(ncol)]
                     for r in range(nrow)])


def as_drawn(x):
    """What image_grid draws for samples x in [-1, 1]: (x + 1) / 2 clipped, in 1/255 steps."""
    return np.floor(np.clip((np.asarray(x, np.float64) + 1) / 2, 0, 1) * 255 + 0.5)[:, 0] / 255


def assert_tiles(tiles, x, what):
    """Tiles (N, h, w) of a picture show the samples x (N, 1, h, w): at most one gray level off
    (the demo ran in another process, whose BLAS may sum in another order)."""
    diff = np.abs(tiles - as_drawn(x))
    assert diff.max() <= 1 / 255 + 1e-9 and diff.mean() < 1e-3, f"{what}: largest difference {diff.max() * 255:.0f}/255"


def tiny_model(run):
    from tinydiff import runs
    model, schedule, cfg = runs.load_run(str(run))
    assert cfg["model"] == "contextunet", cfg["model"]       # the contexts below are one-hot vectors
    return model, schedule, cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo02") / "run"
    out = run_demo("02_train_digits.py", "--tiny", "--out", run)
    assert "conditional accuracy" in out and "Frechet distance" in out      # it scored its samples
    return run


def test_01_forward_process(tmp_path):
    out = run_demo("01_forward_process.py", "--out", tmp_path)
    for name in ("noising.png", "log_snr.png"):
        assert_png(tmp_path / name)
    # the noise levels it prints, against the schedules written out by hand (T = 500)
    T, u = 500, np.arange(501) / 500                                         # u = t / T

    def from_alpha_bar(f):                                                   # beta_t capped at 0.999
        return np.cumprod(1 - np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999))

    def cos(u):                                                              # improved DDPM eq. 17
        return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

    def sig(z):                                                              # Chen 2023 Alg. 1
        return 1 / (1 + np.exp(-z))
    expected = {"linear": np.cumprod(1 - np.linspace(1e-4, 0.02, T)),        # DDPM Sec. 4
                "cosine": from_alpha_bar(lambda u: cos(u) / cos(0.0)),
                "sigmoid": from_alpha_bar(lambda u: np.clip((sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3)), 1e-9, 1))}
    pattern = r"(\w+)\s+alpha_bar_T = ([-+.\de]+), log SNR from ([-+.\d]+) to ([-+.\d]+)"
    printed = {m[0]: tuple(map(float, m[1:])) for m in re.findall(pattern, out)}
    assert sorted(printed) == sorted(expected), out
    for name, ab in expected.items():
        ab_T, snr_0, snr_T = printed[name]
        log_snr = np.log(ab / (1 - ab))
        assert ab_T == pytest.approx(ab[-1], rel=5e-3), name                 # printed with 3 digits
        assert snr_0 == pytest.approx(log_snr[0], abs=0.051) and snr_T == pytest.approx(log_snr[-1], abs=0.051), name
        assert snr_0 > 0 > snr_T, name                                       # from mostly signal to mostly noise


def test_02_train_digits(tiny_run):
    for name in ("loss.png", "samples.png", "eval_samples.png"):
        assert_png(tiny_run / name)
    assert (tiny_run / "model.safetensors").stat().st_size > 0 and (tiny_run / "checkpoint.json").exists()
    again = run_demo("02_train_digits.py", "--tiny", "--out", tiny_run, ok=False)   # never overwrites a run
    assert again.returncode != 0 and "already holds a training run" in again.stderr
    assert "Traceback" not in again.stderr


def test_02_config_is_the_default_training_run():
    """The README's quick start (demo 02) and `tinydiff train` with no flags train the same model."""
    from tinydiff import config
    demo = import_demo("demo02", "02_train_digits.py")
    for key, value in demo.CONFIG.items():
        assert config.DEFAULTS[key] == value, f"demo 02 CONFIG[{key!r}] = {value!r}, config.DEFAULTS has {config.DEFAULTS[key]!r}"


def test_03_sampling_trains_its_own_tiny_model(tmp_path):
    from PIL import Image, ImageSequence
    from tinydiff.samplers import ddpm_sample
    from tinydiff.tensor import no_grad
    out = run_demo("03_sampling.py", "--tiny", "--out", tmp_path)
    assert "without the added noise" in out
    assert_png(tmp_path / "ddpm_grid.png")
    assert_png(tmp_path / "ablation.png")
    assert_gif(tmp_path / "denoising.gif", min_frames=5)
    assert (tmp_path / "tiny_run" / "model.safetensors").exists()
    # what it drew: DDPM from x_T (seed 0), one digit per row; the same x_T without the added noise
    model, schedule, cfg = tiny_model(tmp_path / "tiny_run")
    labels = np.arange(cfg["num_classes"])
    context = np.eye(cfg["num_classes"], dtype=np.float32)[labels]
    x_T = np.random.default_rng(0).standard_normal((len(labels), 1, 16, 16)).astype(np.float32)
    with no_grad():
        x0 = ddpm_sample(model, schedule, x_T.shape, context, seed=0, x_T=x_T, objective=cfg["objective"])
        x0_no_noise = ddpm_sample(model, schedule, x_T.shape, context, seed=0, x_T=x_T,
                                  objective=cfg["objective"], noise_free=True)
    assert_tiles(read_grid(tmp_path / "ddpm_grid.png", ncol=1)[:, 0], x0, "ddpm_grid.png")
    with Image.open(tmp_path / "denoising.gif") as gif:
        frames = [read_grid(f, ncol=1)[:, 0] for f in ImageSequence.Iterator(gif)]
    assert len(frames) == schedule.T + 1                      # x_T, then every step (T // 40 < 1)
    assert_tiles(frames[0], x_T, "the GIF's first frame (x_T)")
    assert_tiles(frames[-1], x0, "the GIF's last frame (x_0)")
    ablation = read_grid(tmp_path / "ablation.png", ncol=len(labels))
    assert_tiles(ablation[0], x0, "ablation.png, top row")
    assert_tiles(ablation[1], x0_no_noise, "ablation.png, bottom row")
    assert np.abs(as_drawn(x0) - as_drawn(x0_no_noise)).mean() > 0.02       # the added noise matters


def test_04_context(tmp_path, tiny_run):
    from tinydiff.samplers import ddim_sample
    from tinydiff.tensor import no_grad
    demo = import_demo("demo04", "04_context.py")                         # its constants
    run_demo("04_context.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    assert_png(tmp_path / "context_grid.png")
    assert_png(tmp_path / "mixed_context.png")
    # DDIM (eta 0) of one-hot contexts, 2 per digit, then 2 null contexts; seed SEED
    model, schedule, cfg = tiny_model(tiny_run)
    k, steps, eye = cfg["num_classes"], min(demo.DDIM_STEPS, schedule.T), np.eye(cfg["num_classes"], dtype=np.float32)
    contexts = np.concatenate([eye[np.repeat(np.arange(k), 2)], np.zeros((2, k), np.float32)])
    with no_grad():
        x = ddim_sample(model, schedule, (len(contexts), 1, 16, 16), contexts, steps=steps, eta=0.0,
                        seed=demo.SEED, objective=cfg["objective"])
    assert_tiles(read_grid(tmp_path / "context_grid.png", ncol=2).reshape(-1, 16, 16), x, "context_grid.png")
    # mixed contexts (1 - w) one_hot(a) + w one_hot(b): every tile from the same x_T, drawn with SEED + 1
    x_T = np.random.default_rng(demo.SEED + 1).standard_normal((1, 1, 16, 16)).astype(np.float32)
    weights = np.array(demo.MIX_WEIGHTS, np.float32)[:, None]
    mixed = read_grid(tmp_path / "mixed_context.png", ncol=len(weights))
    assert len(mixed) == 2                                                # --tiny: the first two pairs
    for (a, b), tiles in zip(demo.PAIRS, mixed):
        with no_grad():
            x = ddim_sample(model, schedule, (len(weights), 1, 16, 16), (1 - weights) * eye[a] + weights * eye[b],
                            steps=steps, eta=0.0, x_T=np.repeat(x_T, len(weights), axis=0), objective=cfg["objective"])
        assert_tiles(tiles, x, f"mixed_context.png, pair {(a, b)}")


def read_table(text, first_column):
    """The rows of a markdown table whose first cell starts with `first_column`, as lists of cells."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| " + first_column)]


def test_05_fast_sampling(tmp_path, tiny_run):
    from tinydiff import evaluate
    from tinydiff.samplers import ddim_sample
    from tinydiff.tensor import no_grad
    run_demo("05_fast_sampling.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    assert_png(tmp_path / "fast_sampling.png")
    table = (tmp_path / "fast_sampling.md").read_text()
    rows = read_table(table, "DD")
    assert [(r[0], int(r[1])) for r in rows] == [("DDIM", 2), ("DDPM (eta=1)", 2), ("DDIM", 5), ("DDPM (eta=1)", 5),
                                                 ("DDIM", 20), ("DDPM (Alg. 2)", 20)], table
    # columns: sampler, steps, time, ms / image, accuracy, Frechet, floor, ratio
    assert len({r[6] for r in rows}) == 1, "the real-data floor depends on the data only"
    for r in rows:
        assert float(r[7].rstrip("x")) == pytest.approx(float(r[5]) / float(r[6]), abs=0.006), r
    # its first row, scored here: DDIM-2 (eta 0, seed 0), 2 samples per digit
    model, schedule, cfg = tiny_model(tiny_run)
    labels = np.repeat(np.arange(cfg["num_classes"]), 2)
    with no_grad():
        x = ddim_sample(model, schedule, (len(labels), 1, 16, 16), np.eye(cfg["num_classes"], dtype=np.float32)[labels],
                        steps=2, eta=0.0, seed=0, objective=cfg["objective"])
    score = evaluate.evaluate(np.clip((x + 1) / 2, 0, 1), labels)
    assert rows[0][4:7] == [f"{score['accuracy']:.1%}", f"{score['frechet']:.2f}", f"{score['floor']:.2f}"], (rows[0], score)

    # the second table: every sampler at NFE budgets 2 and 4, guidance off and at 2; each row's NFE is
    # the most its sampler's steps can cost within the budget (Heun 2 steps - 1, guidance doubles)
    from tinydiff.samplers import dpm_solver_sample, nfe
    assert_png(tmp_path / "quality_per_nfe.png")
    table = (tmp_path / "quality_per_nfe.md").read_text()
    names = ("ddim", "ddim eta=1", "dpm++2m", "dpm++2m-sde", "heun", "euler")
    rows = [r for r in read_table(table, "") if r[0] in names]
    assert [(r[0], r[1]) for r in rows[::2]] == [(name, g) for g in ("1", "2") for name in names], table
    for (name, guidance, steps, cost, *_), budget in zip(rows, [2, 4] * 12):
        steps, cost, guided = int(steps), int(cost), guidance != "1"
        assert cost == nfe(name.split()[0], steps, guided) <= budget < nfe(name.split()[0], steps + 1, guided), (name, guidance, steps)
    # one row scored here: DPM-Solver++ 2M, 2 steps, guidance 2 (4 NFE), seed 0
    row = [r for r in rows if r[:4] == ["dpm++2m", "2", "2", "4"]][0]
    with no_grad():
        x = dpm_solver_sample(model, schedule, (len(labels), 1, 16, 16), np.eye(cfg["num_classes"], dtype=np.float32)[labels],
                              steps=2, seed=0, objective=cfg["objective"], guidance_scale=2.0)
    score = evaluate.evaluate(np.clip((x + 1) / 2, 0, 1), labels)
    assert row[5:8] == [f"{score['accuracy']:.1%}", f"{score['frechet']:.2f}", f"{score['floor']:.2f}"], (row, score)


def test_06_guidance(tmp_path, tiny_run):
    run_demo("06_guidance.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    for name in ("guidance_sweep.png", "cfg_grid.png", "classifier_grid.png"):
        assert_png(tmp_path / name)
    text = (tmp_path / "guidance.md").read_text()
    cfg_part, classifier_part = text.split("**Classifier guidance")
    cfg_rows = [r for r in read_table(cfg_part, "") if r[0][:1].isdigit()]
    clf_rows = [r for r in read_table(classifier_part, "") if r[0][:1].isdigit()]
    assert [float(r[0]) for r in cfg_rows] == [0, 1, 2, 3, 5] and [float(r[0]) for r in clf_rows] == [0, 3, 10, 30], text
    # scale 0 is the unconditional model both ways (eps_uncond + 0 (eps_cond - eps_uncond), and no
    # classifier gradient), from the same noise: the same images, so the same scores
    assert cfg_rows[0][2:] == clf_rows[0][2:], (cfg_rows[0], clf_rows[0])
    cfg_grid = read_grid(tmp_path / "cfg_grid.png", ncol=10)               # one row per scale
    clf_grid = read_grid(tmp_path / "classifier_grid.png", ncol=10)
    assert cfg_grid.shape[0] == 5 and clf_grid.shape[0] == 4
    assert np.abs(cfg_grid[0] - clf_grid[0]).max() <= 1 / 255 + 1e-9
    # classifier guidance moves the samples away from the unconditional ones, more with a larger s
    moved = [np.abs(row - clf_grid[0]).mean() for row in clf_grid[1:]]
    assert 0 < moved[0] < moved[1] < moved[2], moved


def test_07_kernels(tmp_path):
    run_demo("07_kernels.py", "--tiny", "--out", tmp_path)
    assert_png(tmp_path / "kernels.png")
    rows = [line.split("|") for line in (tmp_path / "kernels.md").read_text().splitlines()
            if line.startswith("| NumPy") or line.startswith("| C++")]
    assert rows and rows[0][1].strip().startswith("NumPy reference")
    for row in rows:                     # every implementation computes the reference's gradients
        assert float(row[-2]) < 1e-4, row


def test_08_text_prompts(tmp_path):
    from tinydiff import evaluate, runs
    from tinydiff.captions import parse_prompt
    from tinydiff.samplers import TEXT_SAMPLING, ddim_sample
    from tinydiff.tensor import no_grad
    demo = import_demo("demo08", "08_text_prompts.py")                    # its constants
    out = run_demo("08_text_prompts.py", "--tiny", "--out", tmp_path)
    assert "unknown word 'sparkly'" in out                                # the tokenizer's warning, shown
    for name in ("prompts.png", "guidance.png"):
        assert_png(tmp_path / name)
    model, schedule, cfg = runs.load_run(str(tmp_path / "tiny_text_run"))
    assert cfg["text"] and cfg["model"] == "text_unet"
    steps = min(TEXT_SAMPLING["steps"], schedule.T)

    def draw(prompt, n, s):                 # what the demo says it draws: DDIM eta 0 from seed SEED
        with no_grad():
            return ddim_sample(model, schedule, (n, 1, 16, 16), model.context([prompt] * n), steps=steps, eta=0.0,
                               seed=demo.SEED, objective=cfg["objective"], guidance_scale=s)
    # one row per prompt, the same noise in every row (--tiny: 2 columns)
    grid = read_grid(tmp_path / "prompts.png", ncol=2)
    assert grid.shape[0] == len(demo.PROMPTS)
    for prompt, tiles in zip(demo.PROMPTS, grid):
        assert_tiles(tiles, draw(prompt, 2, TEXT_SAMPLING["guidance"]), f"prompts.png, {prompt!r}")
    guided = read_grid(tmp_path / "guidance.png", ncol=2)
    assert guided.shape[0] == len(demo.SCALES)
    assert_tiles(guided[-1], draw(demo.GUIDED_PROMPT, 2, demo.SCALES[-1]), "guidance.png, last row")
    # the sweep's table: one row per scale; its first row scored here
    text = (tmp_path / "fidelity.md").read_text()
    rows = [r for r in read_table(text, "") if r[0][:1].isdigit()]
    assert [float(r[0]) for r in rows] == demo.SCALES, text
    prompts = np.repeat(np.array(demo.FIDELITY_PROMPTS), 2)
    labels = np.array([parse_prompt(p)[0] for p in prompts])
    images = np.concatenate([np.clip((draw(p, 2, demo.SCALES[0]) + 1) / 2, 0, 1) for p in demo.FIDELITY_PROMPTS])
    r = evaluate.prompt_fidelity(images, labels, prompts)
    o, h = r["overall"], r["held_out"]
    assert rows[0][1:] == [f"{v:.1%}" for v in (o["accuracy"], o["weight"], o["slant"],
                                                 h["accuracy"], h["weight"], h["slant"])], (rows[0], r)
    assert "'a thick 3'  (held out)" in text and "class-only prompts, pooled" in text
