"""The C kernels STAM and STAMLite run on float32 CPU tensors: their Python kernels' float32 arithmetic, each
operation rounded once; float64 moments; a clean fallback where no compiler is found. Whole optimizer steps on
these kernels are held to the op-by-op path in test_torch_parity.py."""

import warnings

import numpy as np
import pytest
import torch

from stac_stam.torch import _cpu_kernels

# Around the kernels' chunk of 16384 elements, and the empty and one-element cases.
SIZES = (0, 1, 7, 16383, 16384, 16385, 40000)


@pytest.fixture(autouse=True)
def library():
    if _cpu_kernels._load() is None:
        pytest.skip("no C compiler to build the CPU kernels")


def tensors(seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(size, generator=generator) for size in SIZES]


def per_tensor(low, high, seed):
    return low + (high - low) * torch.rand(len(SIZES), generator=torch.Generator().manual_seed(seed))


def test_stam_lite_update_is_the_python_kernels_float32_arithmetic_rounded_op_by_op():
    params, grads, mus = tensors(0), tensors(1), tensors(2, 0.1)
    beta1, step_size, decay = per_tensor(0.7, 0.9, 3), per_tensor(1e-4, 1e-2, 4), 1 - 1e-3 * 0.01
    # numpy rounds each float32 operation once, as the C kernel must (torch's vectorized CPU loops may differ
    # from that by an ulp).
    expected = [[], []]
    for i, (param, grad, mu) in enumerate(zip(params, grads, mus)):
        b1, lr = np.float32(beta1[i].item()), np.float32(step_size[i].item())
        new_mu = b1 * mu.numpy() + (np.float32(1) - b1) * grad.numpy()
        expected[0].append(param.numpy() * np.float32(decay) - new_mu * lr)
        expected[1].append(new_mu)
    _cpu_kernels.run("stam_lite_step", [params, grads, mus], [beta1, step_size], [decay])
    assert all(np.array_equal(t.numpy(), e) for ts, es in zip((params, mus), expected) for t, e in zip(ts, es))


def test_stam_update_is_the_python_kernels_float32_arithmetic_rounded_op_by_op():
    params, grads, mus, nus = tensors(0), tensors(1), tensors(2, 0.1), [t.square() for t in tensors(3, 0.1)]
    beta1, step_size, correction = per_tensor(0.7, 0.9, 4), per_tensor(1e-4, 1e-2, 5), per_tensor(1e-3, 1.0, 6)
    decay, b2, eps = 1 - 1e-3 * 0.01, 0.999, 1e-8
    f = np.float32
    expected = [[], [], []]
    for i, (param, grad, mu, nu) in enumerate(zip(params, grads, mus, nus)):
        b1, lr, g = f(beta1[i].item()), f(step_size[i].item()), grad.numpy()
        new_mu = b1 * mu.numpy() + (f(1) - b1) * g
        new_nu = f(b2) * nu.numpy() + f(1 - b2) * g * g
        denominator = np.sqrt(new_nu / f(correction[i].item())) + f(eps)
        expected[0].append(param.numpy() * f(decay) - lr * new_mu / denominator)
        expected[1].append(new_mu)
        expected[2].append(new_nu)
    _cpu_kernels.run("stam_step", [params, grads, mus, nus], [beta1, step_size, correction],
                     [decay, b2, 1 - b2, eps])
    assert all(np.array_equal(t.numpy(), e) for ts, es in zip((params, mus, nus), expected) for t, e in zip(ts, es))


def moments(name, *tensor_lists):
    sums = torch.empty(len(tensor_lists[0]), 2, dtype=torch.float64)
    _cpu_kernels.run(name, list(tensor_lists), [sums])
    return sums


def test_moments_are_float64_sums_with_the_same_bits_on_any_thread_count():
    grads, mus = tensors(0, 3.0), tensors(1)
    residuals = [g.double() - m.double() for g, m in zip(grads, mus)]
    expected = {"stam_lite_moments": [(g.double().sum(), g.double().square().sum()) for g in grads],
                "stam_moments": [(r.square().sum(), r.abs().sum()) for r in residuals]}
    threads = torch.get_num_threads()
    for name, inputs in (("stam_lite_moments", [grads]), ("stam_moments", [grads, mus])):
        sums = moments(name, *inputs)
        torch.testing.assert_close(sums, torch.tensor(expected[name], dtype=torch.float64), rtol=1e-12, atol=1e-9)
        try:
            torch.set_num_threads(1)
            assert torch.equal(moments(name, *inputs), sums)
        finally:
            torch.set_num_threads(threads)


def test_the_sums_are_finite_exactly_when_every_value_is():
    huge = torch.full((40000,), 3e38)  # finite; its float32 sum and square overflow
    assert moments("stam_lite_moments", [huge]).isfinite().all()
    assert moments("stam_moments", [huge], [-huge]).isfinite().all()
    for bad in (float("nan"), float("inf"), float("-inf")):
        grad = torch.ones(40000)
        grad[-1] = bad
        assert not moments("stam_lite_moments", [grad]).isfinite().all(), bad
        assert not moments("stam_moments", [grad], [torch.zeros(40000)]).isfinite().all(), bad


KEYS = ("beta1", "step")


def states_of(count, dtype=torch.float32):
    return [dict(beta1=torch.tensor(0.5 + i, dtype=dtype), step=torch.tensor(10.0 * i, dtype=dtype))
            for i in range(count)]


def test_the_statistics_table_holds_the_states_numbers_as_views_of_one_matrix():
    states = states_of(3)
    table = _cpu_kernels.StatisticsTable(KEYS)
    matrix = table.bind(states)
    assert torch.equal(matrix, torch.tensor([[0.5, 1.5, 2.5], [0.0, 10.0, 20.0]]))
    matrix.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))  # what a step's store does
    assert [state["beta1"].item() for state in states] == [1.0, 2.0, 3.0]
    assert [state["step"].item() for state in states] == [4.0, 5.0, 6.0]
    states[1]["step"].fill_(7.0)  # an entry changed in place stays a view
    assert table.bind(states) is matrix and matrix[1, 1] == 7.0


def test_the_statistics_table_takes_in_entries_replaced_since_the_last_step():
    states = states_of(3)
    table = _cpu_kernels.StatisticsTable(KEYS)
    first = table.bind(states)
    states[2]["beta1"] = torch.tensor(9.0)  # as load_state_dict or a user would
    matrix = table.bind(states)
    assert matrix is not first and matrix[0].tolist() == [0.5, 1.5, 9.0]
    matrix[0, 2] = 8.0
    assert states[2]["beta1"].item() == 8.0
    more = states + states_of(1)  # a parameter joins the group
    assert table.bind(more).shape == (2, 4)


def test_the_statistics_table_refuses_numbers_the_c_kernels_cannot_take():
    for states in (states_of(2, torch.float64), states_of(2, torch.bfloat16)):
        values = [state["beta1"] for state in states]
        assert _cpu_kernels.StatisticsTable(KEYS).bind(states) is None
        assert all(state["beta1"] is value for state, value in zip(states, values))  # left as they were


def test_choose_takes_only_contiguous_float32_cpu_tensors_of_matching_sizes():
    good = [torch.zeros(3), torch.zeros(2, 2)]
    kernels, matrix = _cpu_kernels.choose(True, [good, good], _cpu_kernels.StatisticsTable(KEYS), states_of(2))
    assert kernels == "cpu" and matrix.shape == (2, 2)
    assert _cpu_kernels.choose(False, [good], _cpu_kernels.StatisticsTable(KEYS), states_of(2)) == ("op_by_op", None)
    bad_lists = ([good[:1] + [torch.zeros(4, dtype=torch.float64)]], [good[:1] + [torch.zeros(2, 2).t()]],
                 [good, [torch.zeros(3), torch.zeros(5)]])
    for tensor_lists in bad_lists:
        assert _cpu_kernels.choose(True, tensor_lists, _cpu_kernels.StatisticsTable(KEYS), states_of(2)) \
            == ("compiled", None)
    assert _cpu_kernels.choose(True, [good], _cpu_kernels.StatisticsTable(KEYS), states_of(2, torch.bfloat16)) \
        == ("compiled", None)


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _cpu_kernels._build()
    built = list((tmp_path / "stac-stam").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    modified = built[0].stat().st_mtime_ns
    _cpu_kernels._build()
    assert list((tmp_path / "stac-stam").iterdir()) == built and built[0].stat().st_mtime_ns == modified


def test_without_a_compiler_the_python_kernels_run_after_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="cannot build its CPU kernels"):
        assert _cpu_kernels.choose(True, [[torch.zeros(3)]], _cpu_kernels.StatisticsTable(KEYS), states_of(1)) \
            == ("compiled", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call: no warning
        assert _cpu_kernels.choose(True, [[torch.zeros(3)]], _cpu_kernels.StatisticsTable(KEYS), states_of(1)) \
            == ("compiled", None)
