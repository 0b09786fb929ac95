"""The protocol every optimizer gets, and the statistics the report draws from its runs.

Tuning: a learning-rate sweep over the optimizer's grid of 3 rates on seed 0,
scored by final validation loss and extended by one rung of the ladder 1e-5,
3e-5, 1e-4, ..., 0.3, 1 past an edge that wins or comes within 1% of the
winner (at most twice), so the best rate is never the grid's limit and a flat
top, where one seed cannot tell two rates apart, is searched past; then the
task's seeds at the best rate. Within
a seed every optimizer sees the same initialization, data order and batch
schedule. The learning rate warms up linearly over the first 5% of the steps,
then decays to zero along a cosine.

Statistics: a mean over seeds carries its standard error (sample standard
deviation / sqrt(seeds)). A gap between two optimizers is paired by seed: seed
s gives both the same initialization, data order and batch schedule, so the
gap's standard error is that of the mean of the per-seed differences (sample
standard deviation of the differences / sqrt(seeds both finished)), which
leaves out the seed-to-seed spread the two share; without two such seeds it is
the standard error of a difference of independent means. A gap within 2
standard errors is a tie. A task discriminates when its best and worst
optimizers (by mean) differ by more than 5 standard errors of their gap.
"""

import math

LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
MAX_EXTENSIONS = 2
PLATEAU = 0.01  # an edge within this fraction of the winner's loss is extended past, as a winning edge is
WARMUP_FRACTION = 0.05
TIE_SE = 2.0  # a gap within this many standard errors is a tie
DISCRIMINATION_SE = 5.0  # a task discriminates when its best and worst optimizers differ by more than this


def lr_factor(step, steps):
    """The learning rate at ``step`` (from 0) of ``steps``, as a fraction of the peak: warmup, then cosine."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _score(run):
    return run["val_loss"] if run.get("val_loss") is not None else math.inf


def tune(grid, seeds, known_lr=None):
    """The protocol as a generator: it yields lists of ``(lr, seed)`` runs, is sent their results (dicts with
    ``val_loss``, ``None`` when the run diverged, or ``error`` when it failed) in the same order, and returns
    ``(best_lr, sweep, runs)``: the sweep's ``{lr: result}`` on seed 0 and the results of every seed at the best
    rate. With ``known_lr`` there is no sweep; when every run of the sweep fails, no seeds are run."""
    if known_lr is not None:
        return known_lr, {}, (yield [(known_lr, seed) for seed in range(seeds)])
    grid = sorted(grid)
    sweep = dict(zip(grid, (yield [(lr, 0) for lr in grid])))
    if all("error" in run for run in sweep.values()):  # the optimizer cannot run here: no rate will help
        return None, sweep, []
    for _ in range(MAX_EXTENSIONS):
        best = min(grid, key=lambda lr: _score(sweep[lr]))
        top = _score(sweep[best])

        def on_top(lr):
            return lr == best or (math.isfinite(_score(sweep[lr])) and _score(sweep[lr]) <= top * (1 + PLATEAU))

        low, high = LR_LADDER.index(grid[0]), LR_LADDER.index(grid[-1])
        beyond = ([LR_LADDER[low - 1]] if on_top(grid[0]) and low > 0 else []) + \
                 ([LR_LADDER[high + 1]] if on_top(grid[-1]) and high + 1 < len(LR_LADDER) else [])
        if not beyond:
            break
        sweep.update(zip(beyond, (yield [(lr, 0) for lr in beyond])))
        grid = sorted(sweep)
    best = min(grid, key=lambda lr: _score(sweep[lr]))
    others = (yield [(best, seed) for seed in range(1, seeds)]) if seeds > 1 else []
    return best, sweep, [sweep[best], *others]


def run_serially(generator, train_one):
    """Drive ``tune``'s generator by calling ``train_one(lr, seed)`` for every run it asks for, in order."""
    try:
        requests = next(generator)
        while True:
            requests = generator.send([train_one(lr, seed) for lr, seed in requests])
    except StopIteration as done:
        return done.value


def mean_and_se(values):
    """Mean and standard error of the finite values (SE None with fewer than 2)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def paired(entry, reference):
    """The per-seed losses both entries finished (``val_loss_seeds`` names the seed of each of ``val_losses``):
    ``(entry's, reference's)`` in seed order, or None with fewer than 2 such seeds."""
    def by_seed(e):
        return {seed: loss for seed, loss in zip(e.get("val_loss_seeds") or [], e.get("val_losses") or [])
                if loss is not None and math.isfinite(loss)}
    mine, theirs = by_seed(entry), by_seed(reference)
    common = sorted(mine.keys() & theirs.keys())
    if len(common) < 2:
        return None
    return [mine[s] for s in common], [theirs[s] for s in common]


def difference_se(entry, reference):
    """Standard error of ``entry``'s mean minus ``reference``'s: paired by seed where both have 2 seeds in common,
    else as independent means; None without it."""
    both = paired(entry, reference)
    if both is not None:
        return mean_and_se([a - b for a, b in zip(*both)])[1]
    if entry.get("se") is None or reference.get("se") is None:
        return None
    return math.hypot(entry["se"], reference["se"])


def relative_gap(entry, reference):
    """``(gap, se)``: entry's mean / reference's mean - 1 and its standard error (``difference_se`` relative to the
    reference's mean); ``(None, None)`` when either has no mean, se None when the difference has no SE."""
    if entry.get("mean") is None or not reference.get("mean"):
        return None, None
    se = difference_se(entry, reference)
    return entry["mean"] / reference["mean"] - 1, None if se is None else se / abs(reference["mean"])


def verdict(gap, se):
    """``"tie"`` when the gap is within ``TIE_SE`` standard errors, else ``"better"`` (lower loss) or ``"worse"``;
    None without a standard error."""
    if gap is None or se is None:  # one seed cannot tell a gap from noise
        return None
    if abs(gap) <= TIE_SE * se:
        return "tie"
    return "better" if gap < 0 else "worse"


def discrimination(entries):
    """The task's check: its best and worst optimizers (by mean, over those with a standard error) differ by more
    than ``DISCRIMINATION_SE`` standard errors of their gap (``difference_se``)."""
    ranked = sorted((e["mean"], name) for name, e in entries.items()
                    if e.get("mean") is not None and e.get("se") is not None)
    if len(ranked) < 2:
        return None
    (best, best_name), (worst, worst_name) = ranked[0], ranked[-1]
    spread = difference_se(entries[worst_name], entries[best_name])
    ratio = (worst - best) / spread if spread else math.inf
    return {"best": best_name, "worst": worst_name, "gap": worst - best, "se": spread,
            "standard_errors": ratio, "passes": ratio > DISCRIMINATION_SE}


def resolution(entries, reference):
    """The smallest relative gap against ``reference`` a tie cannot hide at these seeds: ``TIE_SE`` times the
    median standard error of the other optimizers' relative gaps to it (None without any)."""
    ses = sorted(se for name, entry in entries.items() if name != reference
                 for se in [relative_gap(entry, entries[reference])[1]] if se is not None)
    if not ses:
        return None
    middle = len(ses) // 2
    return TIE_SE * (ses[middle] if len(ses) % 2 else 0.5 * (ses[middle - 1] + ses[middle]))
