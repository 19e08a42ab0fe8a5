"""This rank's own GPU, and nothing else: everything lowmem-train reads from CUDA and NVML about memory, and the
compute capability the precision choice needs. GPU-only code lives here, small, so that it can be read whole.

Why only our own device. On a shared node other users' jobs run on the other GPUs; their memory is not ours to
react to (a full GPU 3 must not halve the micro-batch of a rank on GPU 1). The device is the one torch computes
on (`torch.cuda.current_device()`, which accelerate sets from LOCAL_RANK). NVML numbers its devices in PCI bus
order while CUDA, by default, numbers them fastest first (CUDA_DEVICE_ORDER=FASTEST_FIRST), and
CUDA_VISIBLE_DEVICES may name devices by GPU-/MIG- UUID: so the NVML handle is found by the device's UUID
(`get_device_properties(i).uuid`, the identity CUDA and NVML share; a MIG instance has its own), never by index.
Without NVML (no driver library in the container, a MIG instance NVML cannot resolve) the driver's own answer for
the current device, `torch.cuda.mem_get_info()` (cudaMemGetInfo), gives the same total and free.

What a reading holds (all bytes, `GpuReading` in units.py):
    total, free     the device as the driver sees it: free is what every process left, ours included
    used            NVML's used on our device (what nvidia-smi shows: our CUDA context, our allocator's cache, and
                    every other process), for the journal; None without NVML
    allocated       torch's caching allocator in this process: live tensors
    reserved        ... plus the blocks it keeps cached for reuse (they stay until empty_cache())
    peak            the high-water mark of `allocated` since the previous reading: reading it resets it
                    (torch.cuda.reset_peak_memory_stats), so each sample sees the steps since the last one
                    (activations and optimizer temporaries that a between-step reading would miss)
The policy judges `peak / (free + reserved)` (units.MemorySample.gpu_pressure): our demand against what this
process could have if it needed it. Our own cache is ours, so it is not pressure; other processes' memory is.

The seam. `find_gpu_apis()` returns the CUDA runtime and the NVML module this process reads (torch.cuda when CUDA
works, else None; pynvml, initialised, else None). tests/gpu_node.py replaces it in one process to simulate a GPU
node, with semantics taken from the torch and NVML documentation (cited there); the training itself stays on the
CPU, so only what is read here is simulated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from lowmem_train.trainer.memory.units import GpuReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuApis:
    cuda: Any | None  # torch.cuda (or a simulation of it); None: no usable CUDA device in this process
    nvml: Any | None  # the pynvml module after nvmlInit(); None: no NVML (no driver library, or not installed)


def system_gpu_apis() -> GpuApis:
    """The real ones. pynvml raises NVMLError_LibraryNotFound on a machine without the driver: that is no GPU."""
    import torch

    cuda = torch.cuda if torch.cuda.is_available() else None
    nvml = None
    if cuda is not None:
        try:
            import pynvml

            pynvml.nvmlInit()
            nvml = pynvml
        except Exception:  # noqa: BLE001 - no pynvml, or any NVMLError: the driver's own figures will do
            nvml = None
    return GpuApis(cuda, nvml)


# The seam (module docstring). Looked up at call time, so that replacing it reaches every reader.
find_gpu_apis: Callable[[], GpuApis] = system_gpu_apis


def nvml_handle_by_uuid(nvml, uuid: str):
    """The NVML handle of the device CUDA calls `uuid`, or None. torch prints a device's UUID without the prefix
    NVML expects ("GPU-" for a whole GPU, "MIG-" for a MIG instance): both are tried."""
    text = str(uuid)
    candidates = [text] if text.startswith(("GPU-", "MIG-")) else [f"GPU-{text}", f"MIG-{text}"]
    for candidate in candidates:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(candidate)
        except Exception:  # noqa: BLE001 - NVMLError_NotFound / InvalidArgument: try the other form
            continue
    return None


class OwnGpu:
    """Reads this rank's device. Built once per process, after the device was chosen (accelerate's set_device)."""

    def __init__(self, apis: GpuApis | None = None):
        apis = apis or find_gpu_apis()
        self.cuda, self.nvml = apis.cuda, apis.nvml
        self.device = self.cuda.current_device() if self.cuda is not None else None
        self.handle = None
        self.name = ""
        if self.cuda is not None:
            props = self.cuda.get_device_properties(self.device)
            self.name = f"cuda:{self.device} ({props.name})"
            if self.nvml is not None:
                self.handle = nvml_handle_by_uuid(self.nvml, props.uuid)
                if self.handle is None:
                    log.info("memory: NVML cannot find %s by its UUID; reading it through CUDA instead", self.name)

    @property
    def present(self) -> bool:
        return self.cuda is not None

    def read(self, reset_peak: bool = True) -> GpuReading:
        """One reading of our device; the allocator's peak is reset after it (module docstring) unless told not to."""
        cuda = self.cuda
        if cuda is None:
            return GpuReading()
        used = None
        total = free = None
        if self.handle is not None:
            try:
                info = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
                total, free, used = int(info.total), int(info.free), int(info.used)
            except Exception:  # noqa: BLE001 - a device that fell off the bus: the driver's answer below, or none
                total = free = used = None
        if total is None:
            free, total = (int(v) for v in cuda.mem_get_info(self.device))
        reading = GpuReading(total=total, free=free, used=used, allocated=int(cuda.memory_allocated(self.device)),
                             reserved=int(cuda.memory_reserved(self.device)),
                             peak=int(cuda.max_memory_allocated(self.device)))
        if reset_peak:
            cuda.reset_peak_memory_stats(self.device)
        return reading

    def release_cache(self) -> None:
        """Give the allocator's unused cached blocks back to the driver (after a shrink: other processes on a shared
        GPU may use them, and nvidia-smi stops showing the old peak), and start a new peak."""
        if self.cuda is not None:
            self.cuda.empty_cache()
            self.cuda.reset_peak_memory_stats(self.device)


def visible_gpu_totals(apis: GpuApis | None = None) -> list[int]:
    """Total memory of every device this process may use (CUDA's view: CUDA_VISIBLE_DEVICES and MIG respected),
    for the pre-flight estimate, which runs before a device is chosen. Reads device properties only."""
    apis = apis or find_gpu_apis()
    cuda = apis.cuda
    if cuda is None:
        return []
    return [int(cuda.get_device_properties(i).total_memory) for i in range(cuda.device_count())]


def _properties(apis: GpuApis | None, device: int):
    cuda = (apis or find_gpu_apis()).cuda
    if cuda is None:
        return None
    return cuda.get_device_properties(device % max(1, cuda.device_count()))


def compute_capability(apis: GpuApis | None = None, device: int = 0) -> tuple[int, int] | None:
    """(major, minor) of `device`, read from its properties (no work is queued on it); None without CUDA."""
    props = _properties(apis, device)
    return None if props is None else (int(props.major), int(props.minor))


def device_name(apis: GpuApis | None = None, device: int = 0) -> str:
    """'cuda:1 (NVIDIA A100-SXM4-80GB)' for messages; '' without CUDA."""
    props = _properties(apis, device)
    return "" if props is None else f"cuda:{device} ({props.name})"
