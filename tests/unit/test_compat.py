"""Every fenced private API (trainer/compat.py) still exists in the installed libraries and does what we rely on.

An upgrade of accelerate, DeepSpeed or Python that removes or changes one fails here, loudly, before a training
run depends on it.
"""

from __future__ import annotations

import inspect
import multiprocessing

import pytest
import torch

from lowmem_train.trainer import compat


def test_set_sync_gradients_sets_what_accelerate_reads():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    for flag in (False, True):
        compat.set_sync_gradients(accelerator, flag)
        assert accelerator.sync_gradients is flag


def _nothing() -> None:
    pass


def test_stop_forkserver_stops_an_idle_server_and_it_restarts_on_demand():
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    child = context.Process(target=_nothing)
    child.start()
    assert not compat.stop_forkserver() or not child.is_alive()  # never while a child of ours lives
    child.join()
    assert forkserver._forkserver._forkserver_pid is not None  # the private state compat relies on
    assert compat.stop_forkserver() is True
    assert forkserver._forkserver._forkserver_pid is None
    again = context.Process(target=_nothing)
    again.start()
    again.join()
    assert again.exitcode == 0
    compat.stop_forkserver()


def test_cpu_adam_step_advances_only_the_beta_powers(deepspeed_ops):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = DeepSpeedCPUAdam([param], lr=0.1)
    before = param.detach().clone()
    compat.cpu_adam_step(optimizer, 1, optimizer.param_groups[0], torch.empty(0))
    assert torch.equal(param.detach(), before)  # no parameter touched


@pytest.mark.parametrize("attribute", ["ds_tensor", "ds_numel", "ds_shape"])
def test_deepspeed_still_keeps_zero3_partitions_where_compat_reads_them(attribute):
    from deepspeed.runtime.zero import partition_parameters

    assert f"param.{attribute} =" in inspect.getsource(partition_parameters) or \
        f".{attribute} = " in inspect.getsource(partition_parameters)
    plain = torch.nn.Parameter(torch.ones(3))
    assert compat.zero3_local_shard(plain) is None and compat.full_numel(plain) == 3
    assert compat.full_shape(torch.nn.Parameter(torch.ones(2, 3))) == (2, 3)


def test_instance_attributes_show_what_an_optimizer_holds_and_nothing_for_slots():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    optimizer.zero_grad()
    attributes = compat.instance_attributes(optimizer)
    assert "state" in attributes and "param_groups" in attributes

    class Slotted:
        __slots__ = ("x",)

    assert compat.instance_attributes(Slotted()) == {}
