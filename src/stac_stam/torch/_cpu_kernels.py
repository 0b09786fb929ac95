"""The multi-tensor CPU kernels in ``_cpu_kernels.c``: loading the library and calling it.

The library is a plain shared object called through ctypes (no Python or
torch headers). An installed package carries it, built at install time as the
extension ``stac_stam.torch._cpu_kernels_lib`` (one build for every x86-64
CPU: its loops pick AVX-512, AVX2 or the baseline at load time). A source
checkout builds it with the system's C compiler (``$CC``, else ``cc``) into
``~/.cache/stac-stam`` (``$XDG_CACHE_HOME``), once per source and flags, in
about a second: started in the background by the first optimizer's
constructor, so the first step finds it done or under way. Where neither is
possible the optimizers run their torch code instead, after one warning.
"""

import array
import ctypes
import hashlib
import importlib.machinery
import operator
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import torch

_SOURCE = pathlib.Path(__file__).with_name("_cpu_kernels.c")
_PACKAGED = [_SOURCE.with_name("_cpu_kernels_lib" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
# -ffp-contract=off: no fused multiply-add, so an update rounds as the torch code's float32 ops do. pyproject.toml
# builds the packaged library with the same flags.
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
_library = None  # the loaded library; False once it could not be loaded or built
_building = None  # the build prepare() started, until _load takes it


class _Build:
    """The library built with the system's C compiler into the cache, or found there: the compiler starts at
    construction and runs in the background; ``result()`` waits for it and puts the library in place (one
    rename: no half-written library)."""

    def __init__(self):
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler found (set CC)")
        flags = [*FLAGS, "-shared", "-fPIC"]
        key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "stac-stam"
        self.compiler, self.built, self.process = compiler, cache / f"cpu_kernels_{key}.so", None
        if not self.built.exists():
            cache.mkdir(parents=True, exist_ok=True)
            self.scratch = tempfile.TemporaryDirectory(dir=cache)
            self.output = pathlib.Path(self.scratch.name) / self.built.name
            try:
                self.process = subprocess.Popen([compiler, *flags, str(_SOURCE), "-o", str(self.output)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            except OSError:
                self.scratch.cleanup()
                raise

    def result(self):
        if self.process is not None:
            try:
                _, errors = self.process.communicate()
                if self.process.returncode:
                    raise OSError(f"{self.compiler} failed: {errors.strip()[-2000:]}")
                os.replace(self.output, self.built)
            finally:
                self.process = None
                self.scratch.cleanup()
        return self.built


def _build():
    """The library's path in the cache, built there first if it is not."""
    return _Build().result()


def _packaged():
    """The library built at install time, unless it is older than the source (an editable install whose C file
    was edited)."""
    return next((path for path in _PACKAGED if path.exists() and path.stat().st_mtime >= _SOURCE.stat().st_mtime),
                None)


def prepare():
    """Load the library, or where it must be built first start the build in the background: an optimizer's
    constructor calls this, so its first step finds the library loaded, or its build (~1 s) done or under
    way."""
    global _building
    if _library is not None or _building is not None:
        return
    if _packaged() is None:
        try:
            _building = _Build()
        except OSError:
            return  # _load tries again, and warns
        if _building.process is not None:
            return
    _load()


def _load():
    global _library, _building
    if _library is None:
        try:
            _library = ctypes.CDLL(str(_packaged() or (_building or _Build()).result()))
        except OSError as error:
            warnings.warn(f"stac-stam cannot build its CPU kernels ({error}); its optimizers run their torch "
                          f"code instead", RuntimeWarning, stacklevel=4)
            _library = False
        finally:
            _building = None
    return _library or None


_PLAIN = {torch.Tensor, torch.nn.Parameter}
_IS_CPU = operator.attrgetter("is_cpu")


def serves(tensors):
    """Whether the C kernels can read and write every tensor of ``tensors`` through its data pointer: contiguous
    plain CPU tensors (a subclass, such as a DTensor, reaches its memory only through torch's dispatcher).
    Checked with builtins over the list (at C speed): a step of a 200-tensor model checks ~800 tensors."""
    return (set(map(type, tensors)) <= _PLAIN and all(map(_IS_CPU, tensors))
            and all(map(torch.Tensor.is_contiguous, tensors)))


def available():
    return _load() is not None


def pointers(tensors):
    """The data pointers of ``tensors`` as a C array (``array.array``: built at C speed, ~4x faster than a
    ctypes array for hundreds of tensors)."""
    return array.array("Q", map(torch.Tensor.data_ptr, tensors))


def arrays(tensor_lists):
    """``run``'s arrays for the tensor lists ``tensor_lists``: the element counts, then each list's pointers."""
    return [array.array("q", map(torch.Tensor.numel, tensor_lists[0])), *map(pointers, tensor_lists)]


def run(name, numels_and_pointers, vectors=(), numbers=()):
    """``name(n, numels, *tensor_lists, *vectors, *numbers, threads)`` over n tensors: ``numels_and_pointers``
    the element counts and each tensor list's data pointers (``arrays``), each vector (a contiguous CPU tensor
    of one value per tensor, or an output; a ``ctypes.c_double`` output of one number) by its address, each
    number as a C float (a ``ctypes.c_double`` as it is)."""
    numels = numels_and_pointers[0]
    # The arrays and the vectors' tensors stay referenced through the call.
    arguments = [ctypes.c_void_p(values.buffer_info()[0]) for values in numels_and_pointers]
    arguments += [ctypes.byref(vector) if isinstance(vector, ctypes.c_double) else ctypes.c_void_p(vector.data_ptr())
                  for vector in vectors]
    numbers = [number if isinstance(number, ctypes.c_double) else ctypes.c_float(number) for number in numbers]
    if getattr(_library, name)(len(numels), *arguments, *numbers, torch.get_num_threads()):
        raise MemoryError(f"{name}: out of memory for its chunk table")


class StatisticsTable:
    """One parameter group's per-tensor 0-d state entries ``keys`` as views into one float32 matrix, row per
    key and column per tensor, so a step reads them as vectors and stores them with one copy (gathered,
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
        if not all(type(t) is torch.Tensor and t.dtype is torch.float32 and t.is_cpu and t.dim() == 0
                   for t in entries):
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
