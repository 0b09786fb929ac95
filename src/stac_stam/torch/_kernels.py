"""The per-tensor kernels the library's PyTorch optimizers run: compiled, batched or op by op (``TensorKernel``),
with their hyperparameters as tensors; the finiteness read and the helpers around the kernels' results."""

import inspect
import types
import warnings

import torch


def _as_scalars(result):
    """A kernel's per-tensor numbers as 0-d tensors (its 1-element hyperparameters make them 1-element)."""
    if isinstance(result, tuple):
        return tuple(number.view(()) for number in result)
    return None if result is None else result.view(())


def _compile(function, name, **options):
    """``torch.compile(function)`` with dynamic shapes, under a code object of its own named ``name``: dynamo
    counts recompiles (its limit is 8) per code object, and every compiled form has its own dtype variants."""
    bound_to = getattr(function, "__self__", None)
    function = getattr(function, "__func__", function)
    copy = types.FunctionType(function.__code__.replace(co_name=name), function.__globals__, name,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    # Not fullgraph: past the recompile limit a call runs eagerly, not fails.
    return torch.compile(copy if bound_to is None else types.MethodType(copy, bound_to), dynamic=True,
                         options=options or None)


def _has_16_bit(tensors):
    return any(t.element_size() == 2 for t in tensors)


def tensor_mean(values):
    """The mean of one tensor; the ``mean`` a kernel gets when it runs on one tensor."""
    return values.mean()


class TensorKernel:
    """A one-tensor update or statistic, run over a list of tensors: compiled, batched or op by op.

    ``kernel(*elementwise, **scalars)`` either updates elementwise tensors in
    place (the ones named in ``writes``) or reads them and returns per-tensor
    numbers (statistics, a finiteness flag; they come back as 0-d tensors); a
    kernel with a ``mean`` argument takes its per-tensor means through it.
    Scalars are tensors, so a learning-rate schedule never recompiles.

    ``kernel.map(fused, operands, scalars)`` runs it for every tensor
    (``operands[i]`` the elementwise tensors, ``scalars[i]`` the scalar dict of
    tensor i) and returns the per-tensor results. With ``fused``:

    - a tensor of ``compiled_min_numel`` elements or more runs through
      ``torch.compile`` (dynamic shapes, flat views): one pass over memory, no
      temporaries, one kernel for every size.
    - smaller tensors of one kind run together: one compiled call on their
      concatenation (each tensor's mean taken over its segment, per-tensor
      scalars spread over it), copied back after. A compiled call costs
      ~40 us and op by op a small tensor costs ~100 us (2 CPU threads, torch
      2.13); a model of hundreds of small norms and biases pays that once.
    - where ``torch.compile`` cannot build a kernel for a device (no C++
      compiler, no Triton) that device runs op by op, after one warning.

    Without ``fused`` (and inside a ``torch.compile``d training step, where
    the eager code is what gets traced, and for non-contiguous tensors) each
    tensor runs op by op.
    """

    compiled_min_numel = 1 << 16

    def __init__(self, kernel, writes=(), compile_large=True):
        self.kernel = kernel
        self.compile_large = compile_large  # False: large tensors run op by op (few ATen ops that beat Inductor)
        positional = list(inspect.signature(kernel).parameters)
        self.written = [positional.index(name) for name in writes]
        self.takes_mean = "mean" in positional
        self.mean_argument = {"mean": tensor_mean} if self.takes_mean else {}  # for one tensor at a time
        self.compiled = _compile(kernel, kernel.__name__)
        self.compiled_on_segments = _compile(types.MethodType(TensorKernel._on_segments, self),
                                             f"{kernel.__name__}_on_segments")
        # With 512-bit vectors Inductor loads 16-bit values (bf16 state) through its partial-load path: a STAC
        # step with bf16 momentum took 10.3 ms on 16.7M elements, 5.6 ms compiled for 256-bit vectors.
        narrow = {"cpp.simdlen": 256} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}
        self.compiled_narrow = _compile(kernel, f"{kernel.__name__}_narrow", **narrow)
        self.compiled_on_segments_narrow = _compile(types.MethodType(TensorKernel._on_segments, self),
                                                    f"{kernel.__name__}_on_segments_narrow", **narrow)
        self.eager_devices = set()
        self.segments = {}

    def map(self, fused, operands, scalars):
        results = [None] * len(operands)
        batches = {}
        for index, (tensors, values) in enumerate(zip(operands, scalars)):
            batchable = (fused and not torch.compiler.is_compiling()
                         and 0 < tensors[0].numel() < self.compiled_min_numel
                         and all(t.is_contiguous() for t in tensors))
            if batchable:  # the scalars' kind follows the tensors'
                batches.setdefault(tuple((t.device, t.dtype) for t in tensors), []).append(index)
            else:
                results[index] = self._one(fused, tensors, values)
        for indices in batches.values():
            if len(indices) == 1:
                results[indices[0]] = self._eager(operands[indices[0]], scalars[indices[0]])
                continue
            batch_results = self._batch([operands[i] for i in indices], [scalars[i] for i in indices])
            for index, result in zip(indices, batch_results):
                results[index] = result
        return results

    def map_statistics(self, fused, operands, scalars):
        """``map`` for a statistics kernel whose first number is the tensor's finiteness flag: returns the flags
        and, per tensor, the other numbers."""
        results = self.map(fused, operands, scalars)
        return [flag for flag, *_ in results], [numbers for _, *numbers in results]

    def _eager(self, tensors, values):
        return _as_scalars(self.kernel(*tensors, **values, **self.mean_argument))

    def _one(self, fused, tensors, values):
        device = tensors[0].device.type
        if (not fused or not self.compile_large or device in self.eager_devices or torch.compiler.is_compiling()
                or tensors[0].numel() < self.compiled_min_numel or not all(t.is_contiguous() for t in tensors)):
            return self._eager(tensors, values)
        flat = [t.view(-1) for t in tensors]
        # 0-d tensors go in as 1-element views: compiled for float64 on the CPU, Inductor drops writes to 0-d inputs.
        ones = {name: value.view(1) if value.dim() == 0 else value for name, value in values.items()}
        compiled = self.compiled_narrow if _has_16_bit(tensors) else self.compiled
        try:
            return _as_scalars(compiled(*flat, **ones, **self.mean_argument))
        except torch._dynamo.exc.BackendCompilerFailed as error:  # raised before the kernel touches memory
            self._fall_back_to_eager(device, error)
            return self._eager(tensors, values)

    def _fall_back_to_eager(self, device, error):
        warnings.warn(f"torch.compile cannot build the {self.kernel.__name__} kernel on {device} ({error}); "
                      f"running it op by op (pass fused=False to choose that)", RuntimeWarning, stacklevel=5)
        self.eager_devices.add(device)

    def _batch(self, operands, scalars):
        """Small tensors of one kind as one flat batch, in one compiled call (op by op where that cannot be
        built), copied back after."""
        device = operands[0][0].device
        sizes = [tensors[0].numel() for tensors in operands]
        if (device, *sizes) not in self.segments:  # the same tensors come back every step
            counts = torch.tensor(sizes, device=device)
            self.segments[device, *sizes] = (torch.repeat_interleave(torch.arange(len(sizes), device=device), counts),
                                             counts)
        segment, counts = self.segments[device, *sizes]
        flat = [torch.cat([tensors[position].view(-1) for tensors in operands]) for position in range(len(operands[0]))]
        shared, per_tensor = {}, {}
        for name, first in scalars[0].items():
            if all(values[name] is first for values in scalars):
                shared[name] = first
            else:
                per_tensor[name] = torch.stack([values[name] for values in scalars])
        result = None
        if device.type not in self.eager_devices:
            try:
                compiled = self.compiled_on_segments_narrow if _has_16_bit(flat) else self.compiled_on_segments
                result = compiled(*flat, segment=segment, counts=counts, shared=shared, per_tensor=per_tensor)
            except torch._dynamo.exc.BackendCompilerFailed as error:  # raised before the kernel touches memory
                self._fall_back_to_eager(device.type, error)
        if device.type in self.eager_devices:
            result = self._on_segments(*flat, segment=segment, counts=counts, shared=shared, per_tensor=per_tensor)
        for position in self.written:
            torch._foreach_copy_([tensors[position].view(-1) for tensors in operands], flat[position].split(sizes))
        if result is None:
            return [None] * len(operands)
        # One value per tensor (a number for the whole batch, like the finiteness flag, is every tensor's).
        numbers = [number.expand(len(sizes)).unbind() for number in (result if isinstance(result, tuple) else (result,))]
        return list(zip(*numbers)) if isinstance(result, tuple) else list(numbers[0])

    def _on_segments(self, *flat, segment, counts, shared, per_tensor):
        """The kernel on a flat batch whose element i belongs to tensor ``segment[i]``. A kernel with a
        ``mean`` (a statistic) gets each tensor's mean and its per-tensor scalars as one value per tensor; an
        update gets the per-tensor scalars at every element of their tensor."""
        if self.takes_mean:
            def mean(values):
                # segment_reduce sums in a fixed order (a compiled index_add_ races: not deterministic), one element
                # after another, so in float64 (MPS has none): in float32 a sum of 60K elements is off by ~1e-5.
                wide = torch.float32 if values.device.type == "mps" else torch.float64
                sums = torch.segment_reduce(values.to(wide), "sum", lengths=counts)
                return (sums / counts).to(values.dtype)
            return self.kernel(*flat, **shared, **per_tensor, mean=mean)
        return self.kernel(*flat, **shared, **{name: values[segment] for name, values in per_tensor.items()})


def _grad_is_finite(grad):
    if not grad.numel():  # an empty gradient has no min or max, and nothing that is not finite
        return torch.ones((), dtype=torch.bool, device=grad.device)
    return torch.isfinite(torch.stack(torch.aminmax(grad))).all()  # a NaN shows in both, an Inf in one


# A large gradient runs ATen's aminmax: one multithreaded read that allocates nothing, and faster than the
# compiled reduction (a STAC step on 4 x 4096^2 took 38.8 ms with it, 48.1 ms with the compiled form).
grad_is_finite = TensorKernel(_grad_is_finite, compile_large=False)


def store_tensor_statistics(states, keys, statistics):
    """Copy each tensor's new 0-d statistics (the first ``len(keys)`` of its numbers, in ``keys``' order) into
    its state, in one foreach call."""
    torch._foreach_copy_([state[key] for state in states for key in keys],
                         [number for numbers in statistics for number in numbers[:len(keys)]])


def all_true(flags):
    """Whether every 0-d bool tensor in ``flags`` is True, with one host sync per device."""
    by_device = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return all(bool(torch.stack(on_device).all()) for on_device in by_device.values())


def scalar_tensors(**values):
    """Hyperparameters as 1-element tensors, the form TensorKernel wants: ``scalars(device, dtype)`` gives the
    dict, built once per device and dtype (a step over tensors of several kinds makes each dict once)."""
    built = {}

    def scalars(device, dtype):
        if (device, dtype) not in built:
            built[device, dtype] = {name: torch.tensor([value], dtype=dtype, device=device)
                                    for name, value in values.items()}
        return built[device, dtype]

    return scalars
