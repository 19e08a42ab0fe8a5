"""A simulated GPU node for tests: physical GPUs behind a fake NVML and a fake `torch.cuda`, handed to the product
through its one seam (trainer/memory/gpu.py, `find_gpu_apis`). The training itself stays on the CPU; what is
simulated is what the product reads about GPU memory, and the out-of-memory errors a real allocator raises.

Semantics, each taken from the documentation or source named (facts collected in torch 2.13 / nvidia-ml-py 13.615):
- Device numbering. NVML numbers the physical GPUs in PCI bus order (nvmlDeviceGetHandleByIndex: "The NVML index may
  not correlate with other APIs, such as the CUDA device index"). CUDA numbers them by CUDA_DEVICE_ORDER,
  FASTEST_FIRST by default, PCI_BUS_ID on request (CUDA Programming Guide, environment variables), and then keeps
  only CUDA_VISIBLE_DEVICES: unset = all, "" = none, integers index the CUDA order, "GPU-<uuid>" (or a unique
  prefix of it) and "MIG-<uuid>" name a device; enumeration stops at the first invalid entry, a repeated entry
  leaves none (torch/cuda/__init__.py `_parse_visible_devices`, same rules).
- `get_device_properties(i).uuid`: an object whose str() is the bare 8-4-4-4-12 hex, without NVML's "GPU-"/"MIG-"
  prefix (torch/csrc/cuda/Module.cpp, `uuid_to_string`); a MIG instance's CUDA UUID is its MIG UUID
  (cuDeviceGetUuid_v2). Reading properties creates no CUDA context.
- A CUDA context (a few hundred MB of the device) is created on a device by set_device, mem_get_info or the first
  allocation there (CUDA >= 12 cudaSetDevice; torch issue #103584), charged to the process until it exits.
- The caching allocator (c10/cuda/CUDACachingAllocator.cpp): requests round up to 512 B; a request takes a cached
  free segment if one is large enough, else a new segment (2 MiB for <= 1 MiB, 20 MiB for <= 10 MiB, else rounded
  up to 2 MiB) if the device has that much free; else it releases every fully free cached segment (what
  empty_cache() does) and tries once more; else torch.OutOfMemoryError with the allocator's message. Requests of
  at most 1 MiB and larger ones never share segments (the allocator's small and large pools).
  memory_allocated counts live blocks, memory_reserved segments; max_memory_allocated is the high-water mark of
  allocated until reset_peak_memory_stats() (torch/cuda/memory.py); empty_cache() releases only free segments.
  Simplification: a segment holds one block (no splitting), which keeps reserved >= allocated and the cache's
  behaviour (it holds a freed peak until empty_cache) without modelling fragmentation.
- mem_get_info(d) = (free, total) of the whole device (cudaMemGetInfo: every process's memory is subtracted).
- NVML memory info (v1 struct): total = free + used, used = driver reservation + every process's context and
  segments (structnvmlMemory__t). nvmlDeviceGetHandleByUUID takes the full "GPU-..." or "MIG-..." string, str or
  bytes, and raises NVMLError_NotFound otherwise. A MIG instance handle reports its own slice.
- is_bf16_supported() answers True below compute capability 8.0 (emulation; torch/cuda/__init__.py), which is why
  the product reads the capability instead.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch

from lowmem_train.trainer.memory import gpu as gpu_seam

MiB, GiB = 1 << 20, 1 << 30
CONTEXT = 500 * MiB


def format_size(n: int) -> str:
    """c10's format_size, as the allocator's message prints sizes."""
    if n <= 1024:
        return f"{n} bytes"
    if n <= MiB:
        return f"{n / 1024:.2f} KiB"
    if n <= GiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / GiB:.2f} GiB"


@dataclass
class SimDevice:
    """A physical GPU, or one MIG instance of it (`parent` set)."""

    uuid: str  # with NVML's prefix: "GPU-..." or "MIG-..."
    total: int
    name: str = "NVIDIA A100-SXM4-80GB"
    capability: tuple[int, int] = (8, 0)
    speed: int = 0  # CUDA's FASTEST_FIRST puts larger first
    others: int = 0  # bytes other processes (other users' jobs) hold
    driver_reserved: int = 0
    mig: list["SimDevice"] = field(default_factory=list)
    parent: "SimDevice | None" = None

    def __post_init__(self) -> None:
        for instance in self.mig:
            instance.parent = self
        self.ours = {}  # process key -> bytes (context + segments) of our simulated processes

    @property
    def used(self) -> int:
        inner = sum(i.used for i in self.mig)
        return self.driver_reserved + self.others + sum(self.ours.values()) + inner

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


class Uuid:
    """What torch returns as a device UUID: str() is the bare hex."""

    def __init__(self, text: str):
        self.text = text.split("-", 1)[1]

    def __str__(self) -> str:
        return self.text


@dataclass
class Props:
    name: str
    major: int
    minor: int
    total_memory: int
    uuid: Uuid


class FakeNvml:
    """The part of pynvml the product calls, over one node."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotFound(NVMLError):  # noqa: N801 - pynvml's names
        def __str__(self) -> str:
            return "Not Found"

    def __init__(self, node: "SimNode"):
        self.node = node

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - physical GPUs, whatever CUDA_VISIBLE_DEVICES says
        return len(self.node.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimDevice:  # noqa: N802 - PCI bus order
        return self.node.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid) -> SimDevice:  # noqa: N802
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for device in self.node.all_devices():
            if device.uuid == text:
                return device
        raise self.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: SimDevice) -> str:  # noqa: N802
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: SimDevice):  # noqa: N802
        return _MemoryInfo(handle.total, handle.free, handle.used)


@dataclass
class _MemoryInfo:
    total: int
    free: int
    used: int


class SimNode:
    """Physical GPUs in PCI bus order (NVML's order), and the processes of ours that run on them."""

    def __init__(self, gpus: list[SimDevice], nvml: bool = True):
        self.gpus = gpus
        self.nvml = FakeNvml(self) if nvml else None

    def all_devices(self):
        for gpu in self.gpus:
            yield gpu
            yield from gpu.mig

    def cuda_order(self, environ) -> list[SimDevice]:
        """The devices CUDA enumerates for a process with this environment (module docstring)."""
        if environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") == "PCI_BUS_ID":
            ordered = list(self.gpus)
        else:
            ordered = sorted(self.gpus, key=lambda g: -g.speed)  # stable: ties stay in PCI order
        ordered = [g for g in ordered if not g.mig]  # a GPU in MIG mode is used through its instances only
        names = environ.get("CUDA_VISIBLE_DEVICES")
        if names is None:
            return ordered
        chosen = []
        for entry in names.split(","):
            entry = entry.strip()
            if entry.isdigit() and int(entry) < len(ordered):
                device = ordered[int(entry)]
            elif entry.startswith(("GPU-", "MIG-")):
                matches = [d for d in self.all_devices() if d.uuid.startswith(entry)]
                if len(matches) != 1:
                    break
                device = matches[0]
            else:
                break
            if device in chosen:
                return []
            chosen.append(device)
        return chosen

    def process(self, environ=None, device: int | None = None, context: int = CONTEXT) -> "SimCuda":
        environ = os.environ if environ is None else environ
        cuda = SimCuda(self, self.cuda_order(environ), context)
        if device is not None:
            cuda.set_device(device)
        return cuda

    def apis(self, cuda: "SimCuda") -> gpu_seam.GpuApis:
        """What gpu.system_gpu_apis would return in that process: no CUDA runtime when no device is visible."""
        return gpu_seam.GpuApis(cuda if cuda.is_available() else None, self.nvml)


class SimCuda:
    """torch.cuda as one process sees it: the functions the product calls, plus `allocate`/`free` for the test."""

    _keys = itertools.count()

    def __init__(self, node: SimNode, visible: list[SimDevice], context: int = CONTEXT):
        self.node, self.visible, self.context = node, visible, context
        self.key = next(self._keys)
        self.current = 0
        self.contexts: set[int] = set()
        self.segments: dict[int, list[list]] = {}  # device -> [[size, live block size or 0], ...]
        self.peak: dict[int, int] = {}
        self.ooms = self.cache_releases = 0

    # ---- what the product calls ----------------------------------------------------------------------------
    def is_available(self) -> bool:
        return bool(self.visible)

    def device_count(self) -> int:
        return len(self.visible)

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: int) -> None:
        self._device(device)
        self.current = device
        self._touch(device)

    def get_device_properties(self, device: int) -> Props:
        d = self._device(device)
        return Props(d.name, d.capability[0], d.capability[1], d.total, Uuid(d.uuid))

    def mem_get_info(self, device: int | None = None) -> tuple[int, int]:
        device = self.current if device is None else device
        self._touch(device)
        d = self._device(device)
        return d.free, d.total

    def memory_allocated(self, device: int | None = None) -> int:
        return sum(block for _, block in self.segments.get(self._index(device), []))

    def memory_reserved(self, device: int | None = None) -> int:
        return sum(size for size, _ in self.segments.get(self._index(device), []))

    def max_memory_allocated(self, device: int | None = None) -> int:
        return self.peak.get(self._index(device), 0)

    def reset_peak_memory_stats(self, device: int | None = None) -> None:
        index = self._index(device)
        self.peak[index] = self.memory_allocated(index)

    def empty_cache(self) -> None:
        self.cache_releases += 1
        for index in list(self.segments):
            self.segments[index] = [s for s in self.segments[index] if s[1]]
            self._charge(index)

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self._device(self.current).capability >= (8, 0) or including_emulation

    # ---- what a test does with it ------------------------------------------------------------------------------
    def allocate(self, nbytes: int, device: int | None = None) -> list:
        """A live block of `nbytes` on the device (the allocator's rules, module docstring); raises
        torch.OutOfMemoryError as the real allocator does."""
        index = self._index(device)
        self._touch(index)
        block = -(-max(nbytes, 1) // 512) * 512
        small = block <= MiB  # the small pool's 2 MiB segments serve small requests only, and only them
        for attempt in range(2):
            cached = [s for s in self.segments[index] if not s[1] and s[0] >= block and (s[0] == 2 * MiB) == small]
            if cached:
                segment = min(cached, key=lambda s: s[0])
                segment[1] = block
                return self._allocated(index, segment)
            size = 2 * MiB if block <= MiB else 20 * MiB if block <= 10 * MiB else -(-block // (2 * MiB)) * 2 * MiB
            if self._device(index).free >= size:
                segment = [size, block]
                self.segments[index].append(segment)
                self._charge(index)
                return self._allocated(index, segment)
            if attempt == 0:  # release_cached_blocks(), then one more try
                self.cache_releases -= 1  # (not a release the product asked for)
                self.empty_cache()
        self.ooms += 1
        raise torch.OutOfMemoryError(self._oom_message(index, size))

    def free(self, segment: list) -> None:
        segment[1] = 0  # back to the cache: still reserved until empty_cache()

    # ---- internals -----------------------------------------------------------------------------------------------
    def _index(self, device: int | None) -> int:
        return self.current if device is None else int(device)

    def _device(self, device: int) -> SimDevice:
        if not 0 <= device < len(self.visible):
            raise AssertionError("Invalid device id")
        return self.visible[device]

    def _touch(self, device: int) -> None:
        """A context on first use of a device."""
        if device not in self.contexts:
            self.contexts.add(device)
            self.segments.setdefault(device, [])
            self._charge(device)

    def _charge(self, device: int) -> None:
        self._device(device).ours[self.key] = self.context + self.memory_reserved(device)

    def _allocated(self, device: int, segment: list) -> list:
        self.peak[device] = max(self.peak.get(device, 0), self.memory_allocated(device))
        return segment

    def _oom_message(self, device: int, size: int) -> str:
        d = self._device(device)
        allocated, reserved = self.memory_allocated(device), self.memory_reserved(device)
        return (f"CUDA out of memory. Tried to allocate {format_size(size)}. GPU {device} has a total capacity of "
                f"{format_size(d.total)} of which {format_size(d.free)} is free. Including non-PyTorch memory, this "
                f"process has {format_size(self.context + reserved)} memory in use. Of the allocated memory "
                f"{format_size(allocated)} is allocated by PyTorch, and {format_size(reserved - allocated)} is "
                "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
                "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def install(node: SimNode, cuda: SimCuda) -> None:
    """Make this process's product code read the simulated node (the seam in trainer/memory/gpu.py)."""
    gpu_seam.find_gpu_apis = lambda: node.apis(cuda)


def uuid_of(n: int, kind: str = "GPU") -> str:
    return f"{kind}-{n:08x}-1111-2222-3333-{n:012x}"
