"""The kernel layer every PyTorch optimizer of the library runs on: per parameter group, a read phase and an
update phase, each one call over all the group's tensors.

- The **read** changes nothing: it finds whether every gradient is finite and, for optimizers with per-tensor
  statistics (STAM's residual moments, STAMLite's gradient moments, STAC's "snr" scale), two sums per tensor,
  in float64, so no sum of float32 values overflows. It returns a ``Read``.
- ``all_finite(reads)`` makes the step's one decision: under FSDP2 (DTensor parameters) the sums, which cover
  this process's shard, are added over each tensor's mesh, and a non-finite value on any process skips the
  step on every process; one collective per mesh for the whole step.
- The **update** changes the parameters and their state, elementwise, with per-tensor numbers (vectors) that
  the optimizer's rule computed from the read's means, and shared numbers.

Paths (``GroupTensors.path``), chosen per group:

- ``"cpu"``: the C kernels of ``_cpu_kernels.c``, one call per phase for the whole group: float32 parameters
  and gradients, float32 or (where the optimizer allows) bfloat16 state, contiguous CPU tensors (a DTensor's
  local shard qualifies), with ``fused`` (the default) outside a ``torch.compile`` trace.
- ``"foreach"``: otherwise with ``fused``, the optimizer's torch update over lists (``torch._foreach_*``),
  one list per device and dtype.
- ``"per_tensor"``: ``fused=False``: the same torch update, op by op, one tensor at a time.

The two implementations of each update (C and torch) are held to each other bit for bit by the tests: both
round every float32 operation once, in the same order. A DTensor is only ever touched through its local
tensor, never through a raw pointer of the subclass.
"""

import array
import ctypes
import itertools
import operator
import sys

import torch

from stac_stam.torch import _cpu_kernels


_DTYPE = operator.attrgetter("dtype")


def dtensor_type():
    """``torch.distributed.tensor.DTensor`` if that module is loaded (no DTensor exists before it is)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def wide_dtype(device):
    """The dtype of sums and per-tensor rules on ``device``."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def compute_dtype(tensor):
    """The dtype updates and statistics of ``tensor`` are computed in: float32, or float64 for float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


class GroupTensors:
    """One parameter group's tensors for one step, as the kernels take them.

    ``lists`` maps names to lists of tensors, one per parameter, the first
    list the parameters: their gradients and their state tensors of the
    parameter's shape. A DTensor enters as its local shard; ``shapes`` and
    ``numels`` are the whole tensors' and ``shard_meshes[i]`` the mesh and
    the mesh dimensions parameter i is sharded over (None for a plain tensor).
    ``bf16_lists`` names the lists the C kernels also take in bfloat16, ``int8_lists`` those they take in int8
    only.
    """

    def __init__(self, fused, lists, bf16_lists=(), int8_lists=()):
        params = next(iter(lists.values()))
        self._params = params  # the whole tensors, for ``shapes``
        self.numels = list(map(torch.Tensor.numel, params))
        self.shard_meshes = None
        dtensor = dtensor_type()
        if dtensor is not None and any(map(isinstance, params, itertools.repeat(dtensor))):
            self.shard_meshes = [(param.device_mesh, tuple(dim for dim, placement in enumerate(param.placements)
                                                           if placement.is_shard()))
                                 if isinstance(param, dtensor) else None for param in params]
            lists = {name: [t.to_local() if isinstance(t, dtensor) else t for t in tensors]
                     for name, tensors in lists.items()}
        self.lists = lists
        self.bf16_lists = bf16_lists
        self.bf16 = False  # whether the bf16-capable lists hold bfloat16 (the C kernels' "_bf16" forms)
        self._arrays = {}  # the C path's element counts and pointer arrays, by list name, made once per step
        self.path = "per_tensor" if not fused else "cpu" if self._c_serves(bf16_lists, int8_lists) else "foreach"

    @property
    def shapes(self):
        """The whole parameters' shapes (made on demand: only the factored trunk asks)."""
        return [tuple(param.shape) for param in self._params]

    def _c_serves(self, bf16_lists, int8_lists):
        # Checked list by list with map (at C speed): a step of a 200-tensor model checks ~800 tensors.
        if torch.compiler.is_compiling() or not _cpu_kernels.available():
            return False
        dtypes = {True: set(), False: set()}
        for name, tensors in self.lists.items():
            if not _cpu_kernels.serves(tensors):
                return False
            if name in int8_lists:
                if set(map(_DTYPE, tensors)) - {torch.int8}:
                    return False
                continue
            dtypes[name in bf16_lists].update(map(_DTYPE, tensors))
        if dtypes[False] - {torch.float32} or len(dtypes[True]) > 1 or dtypes[True] - {torch.float32, torch.bfloat16}:
            return False
        self.bf16 = dtypes[True] == {torch.bfloat16}
        return True

    def kernel(self, name, names):
        """The C kernel ``name`` for the lists ``names``: its "_bf16" form where one of them holds bfloat16."""
        return name + "_bf16" if self.bf16 and set(names) & set(self.bf16_lists) else name

    def c_arrays(self, names):
        """``_cpu_kernels.run``'s arrays for the lists ``names``: the (local) element counts, then each list's
        data pointers; each made once per step, though the read and the update pass most lists both."""
        arrays = self._arrays
        if not arrays:  # the local element counts: a DTensor's shard's, else the numels known already
            arrays["numels"] = (_cpu_kernels.arrays([next(iter(self.lists.values()))])[0] if self.shard_meshes
                                else array.array("q", self.numels))
        for name in names:
            if name not in arrays:
                arrays[name] = _cpu_kernels.pointers(self.lists[name])
        return [arrays[name] for name in ("numels", *names)]

    def demote(self):
        """Run this group on the torch path (its 0-d state entries are not the C kernels' float32 numbers)."""
        if self.path == "cpu":
            self.path = "foreach"


class Read:
    """A group's read: ``sums`` (float64, one row of two sums per tensor, or None for a finiteness read) and
    ``nonfinite`` (a 0-d tensor in ``wide_dtype``, or from the C reads a Python float: nonzero (NaN for a torch
    read with sums) when a value read is NaN or Inf), over this process's elements until ``all_finite`` adds
    them over the tensors' meshes."""

    def __init__(self, group, sums, nonfinite):
        self.group, self.sums, self.nonfinite = group, sums, nonfinite

    def means(self):
        """Each tensor's two means, a zero-size tensor's 0: a float64 matrix of two rows, one column per tensor."""
        numels = torch.tensor(self.group.numels, dtype=self.sums.dtype, device=self.sums.device).clamp_(min=1)
        return (self.sums / numels[:, None]).T


def read_finite(group, name="grads"):
    """Whether every tensor of ``group.lists[name]`` is finite: one read of each."""
    tensors = group.lists[name]
    if group.path == "cpu":
        nonfinite = ctypes.c_double()  # a Python number: no torch op after the pass over memory
        _cpu_kernels.run("finite_read", group.c_arrays([name]), [nonfinite])
        return Read(group, None, nonfinite.value)
    # The largest |value| of each (NaN when one is NaN); an empty tensor has none, and nothing non-finite.
    nonempty = [t for t in tensors if t.numel()]
    largest = torch._foreach_norm(nonempty, ord=float("inf")) if nonempty else [tensors[0].new_zeros(())]
    device = largest[0].device
    largest = torch.stack([number.to(device=device, dtype=wide_dtype(device)) for number in largest])
    return Read(group, None, (~largest.isfinite()).any().to(largest.dtype))


def read_sums(group, c_kernel, names, torch_sums, numbers=()):
    """Two sums per tensor, from the C kernel ``c_kernel`` over the lists ``names`` (with ``numbers`` after
    them) or from ``torch_sums(*tensors, *numbers)`` (the tensors of one parameter, in ``names``' order; returns
    a float64 vector of two)."""
    lists = [group.lists[name] for name in names]
    if group.path == "cpu":
        sums = torch.empty(len(lists[0]), 2, dtype=torch.float64)
        nonfinite = ctypes.c_double()  # the kernel's verdict on its sums: no torch op after the pass over memory
        _cpu_kernels.run(group.kernel(c_kernel, names), group.c_arrays(names), [sums, nonfinite], numbers)
        return Read(group, sums, nonfinite.value)
    device = lists[0][0].device
    sums = torch.stack([torch_sums(*tensors, *numbers).to(device) for tensors in zip(*lists)])
    # 0 when every sum is finite, else NaN (Inf * 0).
    return Read(group, sums, (sums * 0).sum())


def all_finite(reads):
    """The step's decision: True when every value every read saw, on every process, is finite.

    Under FSDP2 each read's sums of DTensor parameters are added over the processes holding the tensor's
    other shards (a replicated mesh dimension contributes one copy), and the non-finite flags of every read
    over all of them, with one ``all_reduce`` per mesh dimension for the whole step. One host sync at most:
    without DTensor parameters, a step whose flags are the C reads' Python numbers takes no torch op (each
    costs ~20-40 us after a pass over memory)."""
    numbers = sum(read.nonfinite for read in reads if not torch.is_tensor(read.nonfinite))
    flags = [read.nonfinite for read in reads if torch.is_tensor(read.nonfinite)]
    if (numbers or not flags) and not any(read.group.shard_meshes for read in reads):
        return not numbers
    flag = flags[0] if flags else torch.zeros((), dtype=torch.float64)
    for other in flags[1:]:
        flag = flag + other.to(flag.device)
    return not bool(_sum_over_shards(reads, flag + numbers if numbers else flag))


def sum_over_shards(group, sums):
    """Add ``sums`` (a list of float64 vectors of any length, one per tensor of ``group``) of DTensor parameters
    over the processes holding the tensors' other shards, in place, as ``all_finite`` adds a read's: for sums
    an update takes of values it computes, one ``all_reduce`` per mesh dimension for the group. Plain tensors'
    sums stay as they are."""
    _sum_over_shards([Read(group, sums, None)], torch.zeros((), dtype=torch.float64))


def _sum_over_shards(reads, flag):
    """``flag`` added over every mesh the reads' DTensor parameters live on, and the reads' sums of those
    parameters over their shards (in place)."""
    meshes = {}  # mesh -> [(read, row, shard dims)], in the order every process builds it
    for read in reads:
        for row, entry in enumerate(read.group.shard_meshes or ()):
            if entry is not None:
                meshes.setdefault(entry[0], []).append((read, row, entry[1]))
    for mesh, rows in meshes.items():
        flag = _reduce_over_mesh(mesh, rows, flag)
    return flag


def _reduce_over_mesh(mesh, rows, flag):
    import torch.distributed as dist

    device = torch.device(mesh.device_type)
    with_sums = [(read, row, dims, len(read.sums[row])) for read, row, dims in rows if read.sums is not None]
    packed = torch.cat([flag.to(device=device, dtype=torch.float64).view(1)]
                       + [read.sums[row].to(device=device, dtype=torch.float64) for read, row, _, _ in with_sums])
    for dim in range(mesh.ndim):
        # A row replicated over this dimension is taken from its first coordinate only; the flag from all.
        if mesh.get_local_rank(dim) != 0:
            keep = torch.tensor([1.0] + [float(dim in dims) for _, _, dims, size in with_sums for _ in range(size)],
                                dtype=torch.float64, device=device)
            packed.mul_(keep)
        dist.all_reduce(packed, group=mesh.get_group(dim))
    start = 1
    for read, row, _, size in with_sums:
        read.sums[row] = packed[start:start + size].to(read.sums[row].device)
        start += size
    return packed[0]


class TensorStatistics:
    """A group's per-tensor 0-d state entries ``keys``: read as float64 vectors, stored back from vectors.

    On the C path they are rows of the group's StatisticsTable matrix; a group whose entries are not float32
    CPU numbers is moved to the torch path (``group.demote()``)."""

    def __init__(self, group, states, keys, table):
        self.keys, self.states = keys, states
        self.matrix = table.bind(states) if group.path == "cpu" else None
        if self.matrix is None:
            group.demote()

    def values(self, device):
        if self.matrix is not None:
            return dict(zip(self.keys, self.matrix.to(wide_dtype(device))))
        return {key: torch.stack([state[key] for state in self.states]).to(device=device, dtype=wide_dtype(device))
                for key in self.keys}

    def largest(self, device):
        """The largest finite value each entry's dtype holds (one number, or a vector: one per tensor)."""
        if self.matrix is not None:
            return largest_finite(torch.float32)
        return torch.tensor([largest_finite(state[self.keys[0]].dtype) for state in self.states],
                            dtype=wide_dtype(device), device=device)

    def store(self, values):
        """Store ``values[key]`` (one number per tensor) into each state's entry, in one copy."""
        if self.matrix is not None:
            self.matrix.copy_(torch.stack([values[key] for key in self.keys]))
            return
        torch._foreach_copy_([state[key] for key in self.keys for state in self.states],
                             [number for key in self.keys for number in values[key].unbind()])


def update(group, c_kernel, torch_update, names, vectors=None, numbers=None):
    """Run a group's update: the C kernel ``c_kernel`` (lists ``names``, then ``vectors``, then ``numbers``, in
    their order) or ``torch_update(*lists, **vectors, **numbers)``.

    ``vectors`` map names to one number per tensor (a vector), or to one number for every tensor; the torch
    update gets them as lists of 0-d tensors in each tensor's compute dtype, or as that one number."""
    vectors, numbers = vectors or {}, numbers or {}
    lists = [group.lists[name] for name in names]
    if group.path == "cpu":
        # Several vectors are converted to float32 at once, one number filled in float32 (rounded as the
        # conversion would): a small torch op costs ~20 us here, the read's pass over memory having just evicted
        # torch's code and data from the caches.
        if len(vectors) == 1 and _is_one_number(value := next(iter(vectors.values()))):
            per_tensor = [torch.full((len(lists[0]),), float(value), dtype=torch.float32)]
        else:
            per_tensor = [torch.full((len(lists[0]),), float(value), dtype=torch.float64) if _is_one_number(value)
                          else value if value.dtype == torch.float64 and value.is_cpu
                          else value.to(device="cpu", dtype=torch.float64) for value in vectors.values()]
            per_tensor = (torch.stack(per_tensor).to(torch.float32).unbind() if len(per_tensor) > 1
                          else [value.to(torch.float32).contiguous() for value in per_tensor])
        _cpu_kernels.run(group.kernel(c_kernel, names), group.c_arrays(names), per_tensor,
                         [float(value) for value in numbers.values()])
        mark_written(group, names)
        return
    if group.path == "per_tensor":
        batches = [[index] for index in range(len(lists[0]))]
    else:
        batches = {}
        for index, tensors in enumerate(zip(*lists)):
            batches.setdefault(tuple((t.device, t.dtype) for t in tensors), []).append(index)
        batches = list(batches.values())
    for indices in batches:
        first = lists[0][indices[0]]
        dtype = compute_dtype(first)
        batch_vectors = {name: value if _is_one_number(value)
                         else value[indices].to(device=first.device, dtype=dtype).unbind()
                         for name, value in vectors.items()}
        torch_update(*[[tensors[i] for i in indices] for tensors in lists], **batch_vectors, **numbers)


@torch._disable_dynamo  # traced, AOT autograd drops the bump (torch 2.13); the caller's kernel breaks the graph anyway
def mark_written(group, names):
    """Bump the version counters of the lists ``names`` (all written in place, but ``"grads"``, which is only read
    and keeps its version) after a kernel torch does not see write: the C kernels, and torch's fused AdamW on
    CPU, which leaves them as they were (torch 2.13). Autograd then sees the change, as after torch's in-place
    ops."""
    torch.autograd.graph.increment_version([tensor for name in names if name != "grads"
                                            for tensor in group.lists[name]])


def _is_one_number(value):
    return not torch.is_tensor(value) or value.dim() == 0


def widened(tensors, dtype):
    """``tensors`` in ``dtype`` (the same tensors where they have it, float copies where not)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def write_back(tensors, values):
    """Copy ``values`` into ``tensors`` where they are copies (``widened``'s), rounding to the tensors' dtype."""
    copies = [(tensor, value) for tensor, value in zip(tensors, values) if tensor is not value]
    if copies:
        torch._foreach_copy_(*map(list, zip(*copies)))


def saturate_(tensors, bound):
    """Clamp ``tensors`` into [-bound, bound] in place: a momentum that would overflow stays finite."""
    torch._foreach_clamp_min_(tensors, -bound)
    torch._foreach_clamp_max_(tensors, bound)


def sqrt_(tensors):
    """Square roots in place, each rounded once on the CPU, as the C kernels' ``sqrtf``: torch's vectorized
    float32 ``sqrt`` there is off by an ulp for ~0.7% of values (torch 2.13, AVX-512). A float32 value's
    square root taken in float64 rounds to the correct float32 one."""
    if tensors[0].dtype == torch.float32 and tensors[0].is_cpu:
        torch._foreach_copy_(tensors, torch._foreach_sqrt([t.double() for t in tensors]))
    else:
        torch._foreach_sqrt_(tensors)


def traced_number(value):
    """A param group's number (one a scheduler may cycle: OneCycleLR's betas[0]) as a 0-d float64 tensor inside a
    ``torch.compile`` trace, else as it is. Traced as a Python float it would be specialized: a guard and a new
    compile for every value, and (torch 2.13, Inductor) a stale value in ``torch.where``."""
    if torch.compiler.is_compiling() and not torch.is_tensor(value):
        return torch.zeros((), dtype=torch.float64) + value
    return value


def one_minus_power(base, exponent):
    """``1 - base ** exponent`` (a bias correction), exact for ``base`` near 1, ``exponent`` a float64 vector;
    for a list of bases, a matrix of one row per base, each small op taken once for all of them (~20 us each
    after a C pass). A ``base`` (a number from the param group, which a scheduler may cycle) enters as a
    tensor: Python math on it would make a compiled step guard on its value and compile again for every new
    one."""
    traced = torch.compiler.is_compiling()  # (torch.as_tensor(base) would guard on it too)
    if isinstance(base, list):
        base = (torch.stack([exponent.new_zeros(()) + number for number in base])[:, None]
                if traced or any(map(torch.is_tensor, base)) else exponent.new_tensor([[number] for number in base]))
    else:
        base = exponent.new_zeros(()) + base if traced or torch.is_tensor(base) else exponent.new_full((), base)
    return -torch.expm1(exponent * torch.log(base))


def largest_finite(dtype):
    return torch.finfo(dtype).max
