"""Train the digits classifier that `tinydiff eval` scores samples with, and ship its weights.

    python scripts/train_digits_classifier.py                 # ~1 minute on a 2-core CPU
    python scripts/train_digits_classifier.py --out /tmp/c.safetensors --epochs 2   # a quick look

It trains `tinydiff.evaluate.DigitsClassifier` (two 3x3 conv + max-pool stages, a 64-unit
feature layer, 10 logits) with tinydiff's own autograd and Adam, on the TRAIN split of the
embedded digits only (`tinydiff.data`'s fixed split), so that the TEST digits, which the
evaluation uses as its reference, were never seen by the classifier nor by the diffusion model.

Light augmentation makes it robust to the small imperfections of generated digits: each
training image is shifted by up to MAX_SHIFT pixels (the border filled with the background,
-1) and gets a little Gaussian pixel noise. The run is seeded: the same command writes the
same weights (on the same machine and kernels). It prints the held-out test accuracy, which
must reach at least 97%, and saves the weights with their recipe in the file's metadata.
"""
import argparse
import time

import numpy as np

import tinydiff
from tinydiff.checkpoint import save_weights
from tinydiff import functional as F
from tinydiff.evaluate import CLASSIFIER_FILE, DigitsClassifier, classify, real_digits
from tinydiff.optim import Adam, cosine_with_warmup
from tinydiff.tensor import Tensor

EPOCHS = 30
BATCH_SIZE = 64
LR = 2e-3
MAX_SHIFT = 2            # pixels, each direction
PIXEL_NOISE = 0.05       # std of Gaussian noise added to the [-1, 1] pixels
SEED = 0
MIN_TEST_ACCURACY = 0.97


def augment(x, rng):
    """Shift each image (B, 1, 16, 16) by a random (dy, dx) in [-MAX_SHIFT, MAX_SHIFT], add noise."""
    b, _, h, w = x.shape
    s = MAX_SHIFT
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)   # background is -1
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
    out = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return (out + PIXEL_NOISE * rng.standard_normal(out.shape)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", default=CLASSIFIER_FILE, help="where to write the weights")
    args = parser.parse_args(argv)

    tinydiff.manual_seed(args.seed)                      # the initial weights
    rng = np.random.default_rng(args.seed)               # shuffling and augmentation
    train_x, train_y, test_x, test_y = real_digits()     # images in [0, 1]
    train_x = train_x * 2 - 1                            # the classifier reads [-1, 1]
    print(f"train {len(train_x)} digits, test {len(test_x)} digits (held out)")

    model = DigitsClassifier()
    optimizer = Adam(model.parameters(), lr=LR)
    steps_per_epoch = int(np.ceil(len(train_x) / BATCH_SIZE))
    total = args.epochs * steps_per_epoch
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        losses = []
        for i in range(0, len(order), BATCH_SIZE):
            idx = order[i:i + BATCH_SIZE]
            x = Tensor(augment(train_x[idx], rng))                       # (B, 1, 16, 16)
            loss = F.cross_entropy(model(x), train_y[idx].astype(np.int64))
            optimizer.lr = cosine_with_warmup(step, total, LR)             # cosine decay to 0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        model.eval()
        acc = (classify(model, test_x)[0].argmax(axis=1) == test_y).mean()
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {np.mean(losses):.4f}  test accuracy {acc:.2%}"
              f"  ({time.time() - start:.0f} s)")

    if acc < MIN_TEST_ACCURACY:
        raise SystemExit(f"test accuracy {acc:.2%} is below {MIN_TEST_ACCURACY:.0%}: weights not written")
    recipe = {"script": "scripts/train_digits_classifier.py", "seed": str(args.seed),
              "epochs": str(args.epochs), "batch_size": str(BATCH_SIZE), "lr": str(LR),
              "max_shift": str(MAX_SHIFT), "pixel_noise": str(PIXEL_NOISE),
              "train_digits": str(len(train_x)), "test_digits": str(len(test_x)),
              "test_accuracy": f"{acc:.4f}"}
    save_weights(model, args.out, metadata=recipe)
    print(f"wrote {args.out} (test accuracy {acc:.2%})")


if __name__ == "__main__":
    main()
