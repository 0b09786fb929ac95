"""The C kernels (``_cpu_kernels.c``) against the torch code they stand in for: every update bit for bit, the
read's sums against float64, on any thread count; the library's build, cache and fallback. Whole optimizer
steps on each path are held to each other in test_torch_parity.py."""

import os
import warnings

import pytest
import torch

from stac_stam.torch import _cpu_kernels, stac, stam, stam_lite
from stac_stam.torch._kernels import GroupTensors, read_finite, read_sums, update

# Around the kernels' chunk of 16384 elements, and the empty, 0-d and one-element cases.
SHAPES = ((0,), (), (1,), (7,), (16383,), (16384,), (16385,), (200, 200))
BIG = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True)
def library():
    if not _cpu_kernels.available():
        pytest.skip("no C compiler to build the CPU kernels")


def tensors(seed, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=generator)).to(dtype) for shape in SHAPES]


def per_tensor(low, high, seed):
    return low + (high - low) * torch.rand(len(SHAPES), generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64)


def both_paths(lists, bf16_lists=()):
    """The same tensors twice: a group on the C path and a copy on the per-tensor torch path."""
    c_group = GroupTensors(True, lists, bf16_lists)
    torch_group = GroupTensors(False, {name: [t.clone() for t in ts] for name, ts in lists.items()}, bf16_lists)
    assert (c_group.path, torch_group.path) == ("cpu", "per_tensor")
    return c_group, torch_group


def assert_same_bits(c_group, torch_group):
    for name, values in c_group.lists.items():
        for a, b in zip(values, torch_group.lists[name]):
            assert torch.equal(a, b), name


UPDATES = {
    "sign_step": (stac._sign_step, ["params", "grads", "momenta"], lambda: dict(lr=per_tensor(1e-4, 1e-2, 3)),
                  dict(decay=1 - 1e-4, sign_momentum=0.9, grad_weight=-0.1, interpolation=0.8,
                       interpolation_grad_weight=-0.2, bound=BIG)),
    "plain_sign_step": (stac._sign_step, ["params", "grads"], dict, dict(lr=3e-3, decay=1 - 1e-4)),
    "stam_lite_step": (stam_lite._stam_lite_step, ["params", "grads", "mus"],
                       lambda: dict(beta1=per_tensor(0.7, 0.9, 3), step_size=per_tensor(1e-4, 1e-2, 4)),
                       dict(decay=1 - 1e-4, bound=BIG)),
    "stam_step": (stam._stam_step, ["params", "grads", "mus", "nus"],
                  lambda: dict(beta1=per_tensor(0.7, 0.9, 3), step_size=per_tensor(1e-4, 1e-2, 4),
                               bias_correction2=per_tensor(1e-3, 1.0, 5)),
                  dict(decay=1 - 1e-4, b2=0.999, one_minus_b2=1 - 0.999, eps=1e-8, bound=BIG)),
}


@pytest.mark.parametrize("kernel, state_dtype", [(kernel, torch.float32) for kernel in UPDATES]
                         + [("sign_step", torch.bfloat16), ("stam_lite_step", torch.bfloat16)])
def test_each_update_is_the_torch_update_bit_for_bit(kernel, state_dtype):
    torch_update, names, vectors, numbers = UPDATES[kernel]
    lists = dict(params=tensors(0), grads=tensors(1))
    for index, name in enumerate(names[2:]):
        values = tensors(2 + index, 0.1)
        lists[name] = [v.square() for v in values] if name == "nus" else [v.to(state_dtype) for v in values]
    if "bound" in numbers:
        numbers = dict(numbers, bound=torch.finfo(state_dtype).max)
    c_group, torch_group = both_paths(lists, bf16_lists=names[2:])
    for group in (c_group, torch_group):
        update(group, kernel, torch_update, names, vectors(), numbers)
    assert_same_bits(c_group, torch_group)
    assert not all(torch.equal(a, b) for a, b in zip(c_group.lists["params"], tensors(0)))  # it did update


def test_an_update_takes_one_number_for_every_tensor_whatever_torchs_default_dtype():
    # The one number (STAC's lr without the "snr" scale) reaches the C kernel as float32 values even where
    # torch's default dtype is float64 (its per-tensor vector was once made in the default dtype).
    lists = dict(params=tensors(0), grads=tensors(1), momenta=tensors(2, 0.1))
    c_group, torch_group = both_paths(lists)
    numbers = dict(UPDATES["sign_step"][3])
    torch.set_default_dtype(torch.float64)
    try:
        for group in (c_group, torch_group):
            update(group, "sign_step", stac._sign_step, ["params", "grads", "momenta"], dict(lr=3e-3), numbers)
    finally:
        torch.set_default_dtype(torch.float32)
    assert_same_bits(c_group, torch_group)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_a_momentum_that_would_overflow_stays_at_its_dtypes_largest_value(state_dtype):
    # beta m + (1 - beta) g of values near float32's largest may round past it; here it is 1.1 times it. Inf there
    # would make the "snr" scale Inf / Inf and STAM's mu / nu Inf / Inf: a NaN parameter from finite inputs.
    largest = torch.finfo(state_dtype).max
    lists = dict(params=[torch.zeros(40000)], grads=[torch.full((40000,), BIG)],
                 momenta=[torch.full((40000,), largest, dtype=state_dtype)])
    c_group, torch_group = both_paths(lists, bf16_lists=["momenta"])
    numbers = dict(decay=1.0, sign_momentum=0.5, grad_weight=0.6, interpolation=0.5, interpolation_grad_weight=0.6,
                   bound=largest)
    for group in (c_group, torch_group):
        update(group, "sign_step", stac._sign_step, ["params", "grads", "momenta"], dict(lr=1e-3), numbers)
    assert_same_bits(c_group, torch_group)
    assert torch.equal(c_group.lists["momenta"][0], torch.full((40000,), largest, dtype=state_dtype))


READS = {
    "stam_lite_moments": (stam_lite._stam_lite_sums, ["grads"], (),
                          lambda g: (g.double().sum(), g.double().square().sum())),
    "stam_moments": (stam._stam_sums, ["grads", "mus"], (),
                     lambda g, mu: ((g.double() - mu.double()).square().sum(), (g.double() - mu.double()).abs().sum())),
    "snr_moments": (stac._snr_sums, ["grads", "momenta"], (0.9, -0.1, BIG),
                    lambda g, m: (g.double().square().sum(), (m * 0.9 + g * -0.1).double().abs().sum())),
}


@pytest.mark.parametrize("kernel", list(READS))
def test_reads_are_float64_sums_with_the_same_bits_on_any_thread_count(kernel):
    torch_sums, names, numbers, expected = READS[kernel]
    lists = {"params": tensors(9), "grads": tensors(0, 3.0), **{name: tensors(1) for name in names[1:]}}
    c_group, torch_group = both_paths(lists)
    sums = read_sums(c_group, kernel, names, torch_sums, numbers).sums
    reference = torch.tensor([[float(s) for s in expected(*ts)] for ts in zip(*[lists[n] for n in names])],
                             dtype=torch.float64)
    # STAMLite's and the "snr" sums add float32 blocks of 256 values in double: float32's precision.
    tolerance = 1e-12 if kernel == "stam_moments" else 1e-6
    torch.testing.assert_close(sums, reference, rtol=tolerance, atol=1e-9 if kernel == "stam_moments" else 1e-4)
    torch.testing.assert_close(read_sums(torch_group, kernel, names, torch_sums, numbers).sums, reference,
                               rtol=1e-12, atol=1e-9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(read_sums(c_group, kernel, names, torch_sums, numbers).sums, sums)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", [True, False], ids=["cpu", "per_tensor"])
def test_a_read_is_finite_exactly_when_every_value_is(path):
    huge = torch.full((40000,), BIG)  # finite; its float32 sum and square overflow
    group = GroupTensors(path, dict(grads=[huge, -huge]))
    assert not read_finite(group).nonfinite
    read = read_sums(group, "stam_lite_moments", ["grads"], stam_lite._stam_lite_sums)
    assert not read.nonfinite
    torch.testing.assert_close(read.means()[1], torch.full((2,), BIG * BIG, dtype=torch.float64), rtol=1e-12, atol=0)
    # The C reads go in chunks of 16384 values, the finiteness read's chunk 256 values at a time, then one by
    # one: a bad value in the first or a later chunk, first or last in a block, in the vectors' body or in the
    # tail, or in a tensor shorter than one block.
    for size, index in ((40000, -1), (40000, 0), (40000, 255), (40000, 16383), (40000, 20000), (40013, -1),
                        (40013, -14), (255, 254), (31, 30), (1, 0)):
        for bad in (float("nan"), float("inf"), float("-inf")):
            grad = torch.ones(size)
            grad[index] = bad
            group = GroupTensors(path, dict(grads=[torch.ones(3), grad, torch.zeros(0)]))
            assert read_finite(group).nonfinite, (size, index, bad)
            for kernel, (torch_sums, names, numbers, _) in READS.items():  # the statistics reads' own verdicts
                others = {name: [torch.ones(3), torch.ones(size), torch.zeros(0)] for name in names[1:]}
                read = read_sums(GroupTensors(path, dict(group.lists, **others)), kernel, names, torch_sums, numbers)
                assert read.nonfinite, (kernel, size, index, bad)
        grad[index] = BIG  # the largest finite value is finite
        assert not read_finite(GroupTensors(path, dict(grads=[grad]))).nonfinite, (size, index)
        for kernel, (torch_sums, names, numbers, _) in READS.items():
            lists = dict(grads=[grad], **{name: [torch.ones(size)] for name in names[1:]})
            assert not read_sums(GroupTensors(path, lists), kernel, names, torch_sums, numbers).nonfinite, kernel


def test_the_c_path_takes_only_plain_contiguous_float32_cpu_tensors_and_bf16_state_where_allowed():
    good = [torch.zeros(3), torch.zeros(2, 2)]
    assert GroupTensors(True, dict(params=good, grads=good)).path == "cpu"
    assert GroupTensors(False, dict(params=good, grads=good)).path == "per_tensor"
    bf16 = [t.bfloat16() for t in good]
    assert GroupTensors(True, dict(params=good, grads=good, mus=bf16), bf16_lists=["mus"]).path == "cpu"
    for lists in (dict(params=good, grads=good, mus=bf16), dict(params=good, grads=[good[0], good[1].double()]),
                  dict(params=good, grads=[good[0], torch.zeros(2, 2).t()]),
                  dict(params=good, grads=[good[0], torch.zeros(2, 2).as_subclass(SubclassOfTensor)])):
        assert GroupTensors(True, lists, bf16_lists=()).path == "foreach", lists


class SubclassOfTensor(torch.Tensor):
    pass


def test_the_statistics_table_holds_the_states_numbers_as_views_of_one_matrix():
    states = [dict(beta1=torch.tensor(0.5 + i), step=torch.tensor(10.0 * i)) for i in range(3)]
    table = _cpu_kernels.StatisticsTable(("beta1", "step"))
    matrix = table.bind(states)
    assert torch.equal(matrix, torch.tensor([[0.5, 1.5, 2.5], [0.0, 10.0, 20.0]]))
    matrix.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))  # what a step's store does
    assert [state["step"].item() for state in states] == [4.0, 5.0, 6.0]
    states[1]["step"].fill_(7.0)  # an entry changed in place stays a view
    assert table.bind(states) is matrix and matrix[1, 1] == 7.0
    states[2]["beta1"] = torch.tensor(9.0)  # replaced, as load_state_dict or a user would
    matrix = table.bind(states)
    assert matrix[0].tolist() == [1.0, 2.0, 9.0]
    states[0]["step"] = torch.tensor(1.0, dtype=torch.float64)
    assert _cpu_kernels.StatisticsTable(("step",)).bind(states) is None  # not the C kernels' numbers


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _cpu_kernels._build()
    built = list((tmp_path / "stac-stam").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    modified = built[0].stat().st_mtime_ns
    _cpu_kernels._build()
    assert list((tmp_path / "stac-stam").iterdir()) == built and built[0].stat().st_mtime_ns == modified


def test_a_packaged_library_is_loaded_without_a_compiler_unless_the_source_is_newer(monkeypatch, tmp_path):
    packaged = tmp_path / "packaged.so"
    packaged.write_bytes(_cpu_kernels._build().read_bytes())  # stands in for the one built at install time
    monkeypatch.setattr(_cpu_kernels, "_PACKAGED", [tmp_path / "missing.so", packaged])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cpu_kernels.available()
    source_time = _cpu_kernels._SOURCE.stat().st_mtime
    os.utime(packaged, (source_time - 10, source_time - 10))  # built before the source was edited
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    with pytest.warns(RuntimeWarning, match="no-such-cc"):  # not loaded: a build is tried, and fails here
        assert not _cpu_kernels.available()


def test_without_a_library_the_torch_code_runs_after_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels, "_PACKAGED", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lists = dict(params=[torch.zeros(3)], grads=[torch.zeros(3)])
    with pytest.warns(RuntimeWarning, match="cannot build its CPU kernels"):
        assert GroupTensors(True, lists).path == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert GroupTensors(True, lists).path == "foreach"


@pytest.mark.parametrize("scale", [1e-22, 1e17, 0.0])
def test_the_float32_blocks_of_a_read_fall_back_to_float64_where_squares_leave_float32s_normal_range(scale):
    # Squares of 1e-22 are far below float32's smallest normal (1.2e-38): in float32 they lose their digits.
    grads = [scale * torch.randn(40000, generator=torch.Generator().manual_seed(0))]
    sums = read_sums(GroupTensors(True, dict(grads=grads)), "stam_lite_moments", ["grads"],
                     stam_lite._stam_lite_sums).sums[0]
    g = grads[0].double()
    torch.testing.assert_close(sums, torch.stack([g.sum(), g.square().sum()]), rtol=1e-6, atol=0)


def test_the_constructor_starts_the_build_and_the_first_step_waits_for_it(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels, "_building", None)
    monkeypatch.setattr(_cpu_kernels, "_PACKAGED", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = stam.STAM([param])
    assert _cpu_kernels._building.process is not None and not _cpu_kernels._library  # compiling, not loaded
    param.grad = torch.full((3,), 0.5)
    optimizer.step()
    assert _cpu_kernels._building is None and _cpu_kernels._library._name.startswith(str(tmp_path))
    assert param.tolist() != [1.0, 1.0, 1.0]
    # As in a new process (no library loaded) with the build cached: the constructor loads it, nothing builds.
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels.subprocess, "Popen", lambda *args, **kwargs: pytest.fail("compiled again"))
    stam.STAM([param])
    assert _cpu_kernels._library._name.startswith(str(tmp_path)) and _cpu_kernels._building is None
