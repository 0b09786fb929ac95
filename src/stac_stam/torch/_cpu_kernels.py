"""Hand-written multi-tensor CPU kernels (``_cpu_kernels.c``) for STAM and STAMLite, compiled on first use.

On the CPU a ``torch.compile``d kernel costs ~40 us per call and our
per-tensor dispatch ~30-60 us more, so a model of hundreds of tensors pays
more for calls than for memory traffic (STAM on a 195-tensor stack took 3.5x
fused AdamW). These kernels take a whole parameter group in one call, as
torch's fused AdamW does. They serve float32 CPU tensors; everything else
(CUDA, 16-bit tensors, a ``torch.compile``d training step) runs the Python
kernels. The library is built with the system's C compiler (``$CC``, else
``cc``; ``torch.compile`` on the CPU needs one too) into
``~/.cache/stac-stam`` (``$XDG_CACHE_HOME``), once per source and flags;
where it cannot be built the Python kernels run, after one warning.
"""

import array
import ctypes
import hashlib
import operator
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import torch

_SOURCE = pathlib.Path(__file__).with_name("_cpu_kernels.c")
# -ffp-contract=off: no fused multiply-add, so an update rounds as the Python kernel's float32 ops do.
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_VECTOR_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
                 "AVX2": ["-mavx2", "-mfma"]}
_library = None  # the loaded library; False once it could not be built


def _build():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    flags = _FLAGS + _VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "stac-stam"
    built = cache / f"cpu_kernels_{key}.so"
    if not built.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:  # then one rename: no half-written library
            output = pathlib.Path(scratch) / built.name
            result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(output)], capture_output=True,
                                    text=True)
            if result.returncode:
                raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
            os.replace(output, built)
    return ctypes.CDLL(str(built))


def _load():
    global _library
    if _library is None:
        try:
            _library = _build()
        except OSError as error:
            warnings.warn(f"stac-stam cannot build its CPU kernels ({error}); STAM and STAMLite run their "
                          f"per-tensor kernels instead", RuntimeWarning, stacklevel=4)
            _library = False
    return _library or None


def choose(fused, tensor_lists, table, states):
    """The kernels a step of one parameter group runs, and the statistics matrix they read and write.

    ``("cpu", matrix)`` (these kernels, one call for the group) when ``fused``, outside a ``torch.compile``
    trace, every tensor in ``tensor_lists`` is a contiguous float32 CPU tensor, the i-th tensors of all lists
    have one size, ``table.bind(states)`` gives a matrix (every 0-d state entry it holds is a float32 CPU
    number) and the library is built; else ``("compiled", None)`` with ``fused`` (TensorKernel's compiled
    forms, which raise on mismatched sizes), else ``("op_by_op", None)``."""
    if not fused:
        return "op_by_op", None
    numels = list(map(torch.Tensor.numel, tensor_lists[0]))
    takes = (not torch.compiler.is_compiling()
             and all(t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()
                     for tensors in tensor_lists for t in tensors)
             and all(list(map(torch.Tensor.numel, tensors)) == numels for tensors in tensor_lists[1:])
             and _load() is not None)
    matrix = table.bind(states) if takes else None
    return ("compiled", None) if matrix is None else ("cpu", matrix)


def run(name, tensor_lists, vectors=(), numbers=()):
    """``name(n, numels, *tensor_lists, *vectors, *numbers, threads)`` over n tensors: each tensor list as an
    array of data pointers, each vector (a contiguous tensor of one value per tensor, or an output) by its data
    pointer, each number as a C float."""
    # array.array, not a ctypes array: built at C speed (~4x faster for hundreds of tensors).
    arrays = [array.array("Q", map(torch.Tensor.data_ptr, tensors)) for tensors in tensor_lists]
    arrays.append(array.array("q", map(torch.Tensor.numel, tensor_lists[0])))
    # The arrays and the vectors' tensors stay referenced through the call.
    numels, *pointers = [ctypes.c_void_p(values.buffer_info()[0]) for values in arrays[-1:] + arrays[:-1]]
    vector_pointers = [ctypes.c_void_p(vector.data_ptr()) for vector in vectors]
    if getattr(_library, name)(len(tensor_lists[0]), numels, *pointers, *vector_pointers,
                               *map(ctypes.c_float, numbers), torch.get_num_threads()):
        raise MemoryError(f"{name}: out of memory for its chunk table")


class StatisticsTable:
    """One parameter group's per-tensor 0-d state entries ``keys`` as views into one float32 matrix, row per
    key and column per tensor, so the C path reads them as vectors and stores them with one copy (gathered,
    scattered and checked one by one they took ~1 ms of a 7 ms STAMLite step on a 195-tensor model).

    ``bind(states)`` returns the matrix. While the entries are the views it made (one identity test per
    entry, at C speed) it costs nothing; otherwise (a new parameter, ``load_state_dict``, an entry replaced by
    the user) it makes a new matrix from the entries' values and puts its views in their place. The values
    never change, so a step that is then skipped still leaves the state as it was."""

    def __init__(self, keys):
        self.keys = keys
        self.matrix = None
        self.entries = []  # the views, key by key, as the states hold them

    def bind(self, states):
        """The matrix whose ``[k, i]`` is ``states[i][keys[k]]``; None unless every entry is a float32 CPU 0-d
        tensor."""
        entries = [state[key] for key in self.keys for state in states]
        if len(entries) == len(self.entries) and all(map(operator.is_, entries, self.entries)):
            return self.matrix
        if not all(t.dtype is torch.float32 and t.is_cpu and t.dim() == 0 for t in entries):
            return None
        self.matrix = torch.stack(entries).view(len(self.keys), len(states))
        self.entries = list(self.matrix.view(-1).unbind())
        for row, key in enumerate(self.keys):
            for state, view in zip(states, self.entries[row * len(states):(row + 1) * len(states)]):
                state[key] = view
        return self.matrix


def statistics_table(optimizer, group, keys):
    """``optimizer``'s StatisticsTable for its parameter group ``group``, made on first use (not pickled: torch's
    ``Optimizer.__getstate__`` keeps only defaults, state and param_groups)."""
    tables = optimizer.__dict__.setdefault("_statistics_tables", {})
    return tables.setdefault(id(group), StatisticsTable(keys))


def group_statistics(moments, tensor_lists, rule, saved, scalars):
    """Phase one of a step for a whole group, changing nothing: the C kernel ``moments`` sums two numbers per
    tensor (in float64: finite exactly when every value read is); their means and the saved per-tensor
    numbers (``saved``: name -> vector, rows of the StatisticsTable matrix) go through ``rule(mean_a, mean_b,
    **saved, **scalars)`` once, as vectors. Returns ``([finite], rule's vectors)``."""
    sums = torch.empty(len(tensor_lists[0]), 2, dtype=torch.float64)
    run(moments, tensor_lists, [sums])
    numels = torch.tensor(list(map(torch.Tensor.numel, tensor_lists[0])), dtype=torch.float64)
    means = (sums / numels[:, None]).float()
    return [sums.isfinite().all()], rule(means[:, 0], means[:, 1], **saved, **scalars)


def store_statistics(matrix, statistics):
    """Copy the first ``len(matrix)`` vectors of ``statistics`` (one value per tensor) into the rows of
    ``matrix``, in one copy."""
    matrix.copy_(torch.stack(statistics[:len(matrix)]))
