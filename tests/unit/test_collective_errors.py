"""What a failed collective means, read from what NCCL, gloo and torch's store say (trainer/distributed.py).
The messages are verbatim: NCCL's (torch.distributed.DistBackendError, as users reported them in the issues cited),
gloo's and the store's (reproduced with torch 2.13 on this machine)."""

from __future__ import annotations

import pytest
import torch

from lowmem_train.trainer.distributed import classify_collective_error, misconfiguration_hint

NCCL = torch.distributed.DistBackendError

CASES = [
    # NVIDIA/nccl#2076: nodes with InfiniBand trouble
    (NCCL, "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, remote process exited or there was "
           "a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a "
           "remote process exiting prematurely.\nLast error:\nsocketProgressOpt: Call to recv from 172.16.0.4<33759> "
           "failed : Connection reset by peer", "lost_peer"),
    # NVIDIA/nccl#1514: a lost peer reported as an internal error
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, internal error, NCCL version "
           "2.14.3\nncclInternalError: Internal check failed.\nLast error:\nNet : Connection closed by remote peer "
           "user<50260>", "lost_peer"),
    (NCCL, "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=4, OpType=BROADCAST, NumelIn=112, "
           "NumelOut=112, Timeout(ms)=1800000) ran for 1800011 milliseconds before timing out.", "lost_peer"),
    # NVIDIA/Megatron-LM#661: more ranks than GPUs
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1727, invalid usage (run with "
           "NCCL_DEBUG=WARN for details), NCCL version 2.19.3\nncclInvalidUsage: This usually reflects invalid usage "
           "of NCCL library.\nLast error:\nDuplicate GPU detected : rank 3 and rank 0 both on CUDA device f000",
     "misconfigured"),
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1691, invalid usage (run with "
           "NCCL_DEBUG=WARN for details), NCCL version 2.18.1\nncclInvalidUsage: This usually reflects invalid usage "
           "of NCCL library.\nLast error:\nBootstrap : no socket interface found", "misconfigured"),
    # PKU-YuanGroup/Open-Sora-Plan#386: NCCL's own buffers
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:121, unhandled cuda error (run with "
           "NCCL_DEBUG=INFO for details), NCCL version 2.18.1\nncclUnhandledCudaError: Call to CUDA function failed.\n"
           "Last error:\nCuda failure 'out of memory'", "out_of_memory"),
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:121, unhandled cuda error (run with "
           "NCCL_DEBUG=INFO for details), NCCL version 2.18.1\nncclUnhandledCudaError: Call to CUDA function failed.\n"
           "Last error:\nFailed to CUDA calloc 536870912 bytes", "out_of_memory"),
    # a bug or a node fault, not a lost peer: no automatic restart loop
    (NCCL, "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:121, unhandled cuda error (run with "
           "NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nncclUnhandledCudaError: Call to CUDA function failed.\n"
           "Last error:\nCuda failure 999 'unknown error'", None),
    # gloo, reproduced: a killed peer, a peer that exited, a hung peer
    (RuntimeError, "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                   "[127.0.0.1]:28545: Connection reset by peer. This is typically caused by a remote worker hanging "
                   "or bugs in the application.", "lost_peer"),
    (RuntimeError, "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:38036",
     "lost_peer"),
    (RuntimeError, "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv "
                   "operation to complete", "lost_peer"),
    (torch.distributed.DistNetworkError, "Failed to recv, got 0 bytes. Connection was likely closed. Did the remote "
                                         "server shutdown or crash?", "lost_peer"),
    (RuntimeError, "Expected all tensors to be on the same device, but found at least two devices", None),
]


@pytest.mark.parametrize("kind, message, expected", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_a_collective_error_is_classified_by_what_it_says(kind, message, expected):
    assert classify_collective_error(kind(message)) == expected


def test_a_dist_backend_error_is_not_a_lost_peer_by_its_type_alone():
    assert classify_collective_error(NCCL("NCCL error: invalid argument (run with NCCL_DEBUG=WARN for details)")) \
        is None


def test_a_misconfiguration_says_what_to_change():
    duplicate = NCCL(CASES[3][1])
    assert "at most one process per GPU" in misconfiguration_hint(duplicate)
    assert "NCCL_SOCKET_IFNAME" in misconfiguration_hint(NCCL(CASES[4][1]))
