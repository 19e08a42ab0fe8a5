"""The memory probe, the policy and the precision choice on a simulated GPU node (tests/gpu_node.py, through the
product's one GPU seam, trainer/memory/gpu.py). Every test name says "simulated": no GPU is touched."""

from __future__ import annotations

import pytest

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.memory import MemoryConfig
from lowmem_train.trainer import backend
from lowmem_train.trainer.memory import gpu as gpu_seam
from lowmem_train.trainer.memory.plan import Plan
from lowmem_train.trainer.memory.policy import PolicyState, decide
from lowmem_train.trainer.memory.probe import MemoryProbe
from tests.gpu_node import CONTEXT, GiB, MiB, SimDevice, SimNode, install, uuid_of


@pytest.fixture(autouse=True)
def restore_the_seam():
    real = gpu_seam.find_gpu_apis
    yield
    gpu_seam.find_gpu_apis = real


def four_gpu_node() -> SimNode:
    """The node of issue 19: 4 x 80 GB; CUDA's fastest-first order differs from NVML's PCI order (GPU 1 is faster),
    and GPU 3 is 99% full with another user's job."""
    gpus = [SimDevice(uuid_of(i), 80 * GiB, speed=2 if i == 1 else 1) for i in range(4)]
    gpus[3].others = int(0.99 * 80 * GiB)
    return SimNode(gpus)


def rank_on(node: SimNode, environ: dict, local_rank: int):
    cuda = node.process(environ, device=local_rank)  # accelerate's set_device(LOCAL_RANK)
    install(node, cuda)
    return cuda


def probe(environ: dict | None = None) -> MemoryProbe:
    return MemoryProbe(environ=environ or {})


def test_simulated_node_the_probe_reads_this_ranks_own_device_not_the_fullest_nor_the_same_nvml_index():
    node = four_gpu_node()
    cuda = rank_on(node, {}, local_rank=1)  # rank 1 of 2, CUDA_VISIBLE_DEVICES unset (docker run --gpus all)
    assert cuda.visible[1] is node.gpus[0]  # cuda:1 is PCI/NVML device 0: an index would read the wrong GPU
    cuda.allocate(30 * GiB - CONTEXT)  # this rank holds 30 of its 80 GB (context included)
    s = probe().sample(step=1)
    assert s.gpu_total == 80 * GiB and s.gpu_used == 30 * GiB  # NVML's figure of our device, by its UUID
    assert s.gpu_pressure == pytest.approx(0.37, abs=0.01)  # not 0.99, the other user's device
    assert s.torch_reserved == s.torch_max_allocated == 30 * GiB - CONTEXT


def test_simulated_node_a_spike_inside_a_step_is_seen_once_then_the_peak_starts_over():
    node = four_gpu_node()
    cuda = rank_on(node, {}, local_rank=1)
    cuda.allocate(30 * GiB - CONTEXT)
    p = probe()
    spike = cuda.allocate(12 * GiB)  # step 1: 12 GB of activations, freed before the sample
    cuda.free(spike)
    after_step_1 = p.sample(step=1)
    after_step_2 = p.sample(step=2)  # step 2 allocated nothing new
    assert after_step_1.torch_max_allocated == 42 * GiB - CONTEXT
    assert after_step_2.torch_max_allocated == 30 * GiB - CONTEXT  # the spike is gone from this sample
    # the freed 12 GB stay in our cache (reserved): ours to reuse, so not pressure
    assert after_step_2.torch_reserved == 42 * GiB - CONTEXT
    assert after_step_2.gpu_pressure == pytest.approx(0.37, abs=0.01)


def test_simulated_mig_instance_is_read_by_its_own_uuid():
    slices = [SimDevice(uuid_of(10 + i, "MIG"), 20 * GiB, name="MIG 2g.20gb") for i in range(4)]
    slices[0].others = 19 * GiB  # another user's job fills the first slice
    node = SimNode([SimDevice(uuid_of(0), 80 * GiB, mig=slices), SimDevice(uuid_of(1), 80 * GiB)])
    cuda = rank_on(node, {"CUDA_VISIBLE_DEVICES": slices[2].uuid}, local_rank=0)
    cuda.allocate(5 * GiB)
    s = probe().sample()
    assert s.gpu_total == 20 * GiB  # the slice, not the whole GPU nor GPU 0 by index
    assert s.gpu_used == 5 * GiB + CONTEXT
    assert s.gpu_pressure == pytest.approx(5 / (20 - 0.5), abs=1e-3)


def test_simulated_node_without_nvml_reads_its_device_through_cuda():
    gpus = [SimDevice(uuid_of(i), 40 * GiB) for i in range(2)]
    gpus[1].others = 10 * GiB
    node = SimNode(gpus, nvml=False)  # a container without the driver's NVML library
    cuda = rank_on(node, {}, local_rank=1)
    cuda.allocate(4 * GiB)
    s = probe().sample()
    assert (s.gpu_total, s.gpu_free, s.gpu_used) == (40 * GiB, 40 * GiB - 10 * GiB - CONTEXT - 4 * GiB, None)
    assert s.gpu_pressure == pytest.approx(4 / (40 - 10 - 0.5), abs=1e-3)


def test_simulated_empty_visible_devices_is_no_gpu():
    node = four_gpu_node()
    install(node, node.process({"CUDA_VISIBLE_DEVICES": ""}))
    s = probe().sample()
    assert s.gpu_total is None and s.gpu_pressure is None


def plan16() -> Plan:
    return Plan(16, 1, 0, False, 2, False)


def test_simulated_run_sized_to_93_percent_of_its_gpu_is_left_alone_and_another_process_is_not():
    cfg = MemoryConfig()
    node = SimNode([SimDevice(uuid_of(0), 80 * GiB)])
    cuda = rank_on(node, {}, local_rank=0)
    # The user sized the batch so that nvidia-smi shows 93%: our context, and a cache that holds the step's peak
    # and more (blocks of another size, here an evaluation's, stay cached beside the training step's).
    states = cuda.allocate(50 * GiB)
    cuda.free(cuda.allocate(int(3.9 * GiB)))  # an evaluation's activations
    p = probe()
    cuda.free(cuda.allocate(20 * GiB))  # a training step's: too large for the cached 3.9 GiB, a segment of its own
    alone = p.sample(step=10)
    assert alone.gpu_used / alone.gpu_total == pytest.approx(0.93, abs=0.005)  # what the old signal judged: > 92%
    assert alone.gpu_pressure < cfg.gpu_high_fraction
    d = decide([alone], plan16(), cfg, 1, PolicyState.initial(plan16(), cfg))
    assert not d.changed, d.reason
    # Another user's job takes what is free, and our cache is all we have left: a peak like ours no longer fits.
    cuda.free(states)
    cuda.empty_cache()
    node.gpus[0].others = 5 * GiB
    cuda.allocate(50 * GiB)
    cuda.free(cuda.allocate(20 * GiB))
    node.gpus[0].others += node.gpus[0].free  # and then the rest of the device
    crowded = p.sample(step=20)
    assert crowded.gpu_pressure > cfg.gpu_high_fraction
    d = decide([crowded], plan16(), cfg, 1, PolicyState.initial(plan16(), cfg))
    assert d.changed and d.plan.micro_batch == 8 and "GPU peak" in d.reason


def test_simulated_worst_of_ranks_keeps_one_devices_figures_together():
    from lowmem_train.trainer.memory.units import MemorySample

    node = SimNode([SimDevice(uuid_of(i), 80 * GiB) for i in range(2)])
    node.gpus[1].others = 40 * GiB
    samples = []
    for rank in (0, 1):
        cuda = rank_on(node, {}, local_rank=rank)
        cuda.allocate(30 * GiB)
        samples.append(probe().sample())
    worst = MemorySample.worst([MemorySample.from_vector(s.to_vector()) for s in samples])
    assert worst.gpu_pressure == samples[1].gpu_pressure  # rank 1's device has another user's 40 GB
    assert (worst.gpu_free, worst.torch_reserved) == (samples[1].gpu_free, samples[1].torch_reserved)


@pytest.mark.parametrize("capability, auto, bf16_ok", [((7, 0), "fp32", False), ((7, 5), "fp32", False),
                                                       ((8, 0), "bf16", True), ((9, 0), "bf16", True)])
def test_simulated_precision_follows_the_compute_capability_of_this_ranks_device(monkeypatch, capability, auto,
                                                                                 bf16_ok):
    gpus = [SimDevice(uuid_of(0), 16 * GiB, name="Tesla T4", capability=(7, 5)),
            SimDevice(uuid_of(1), 32 * GiB, name="GPU under test", capability=capability)]
    node = SimNode(gpus)
    cuda = node.process({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})  # before accelerate chose a device
    install(node, cuda)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cuda.is_bf16_supported()  # what torch's default answers, emulation counted: True on every one
    assert backend.precision_for_this_rank("auto", on_gpu=True) == auto
    if bf16_ok:
        assert backend.precision_for_this_rank("bf16", on_gpu=True) == "bf16"
    else:
        with pytest.raises(ConfigError, match=r"--mixed_precision=bf16: cuda:1 \(GPU under test\) has compute"):
            backend.precision_for_this_rank("bf16", on_gpu=True)
    assert not cuda.contexts  # decided from device properties: no CUDA context on any GPU, GPU 0 included


def test_simulated_allocator_raises_torchs_out_of_memory_after_releasing_its_cache():
    import torch

    node = SimNode([SimDevice(uuid_of(0), 1 * GiB)])
    cuda = node.process(device=0)
    kept = cuda.allocate(200 * MiB)
    cuda.free(cuda.allocate(300 * MiB))  # cached, not live
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate 400\.00 MiB"):
        cuda.allocate(400 * MiB)  # 1 GiB - 500 MiB context - 200 live: even without the cache it does not fit
    assert cuda.memory_reserved() == 200 * MiB  # the cached 300 MiB were released before giving up
    cuda.free(kept)  # cached too small for 400 MiB: released on the way, and then it fits
    assert cuda.allocate(400 * MiB) and cuda.memory_reserved() == 400 * MiB
