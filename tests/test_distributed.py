"""DistributedDataParallel over a memory-free stage: 2 gloo processes = 1 process, whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import momres


def model() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6))
    blocks = [shared, shared] + [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6))
                                 for _ in range(4)]
    return nn.Sequential(momres.MomentumNet(blocks, 0.9), nn.Linear(6, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(8, 6, dtype=torch.float64, generator=generator),
            torch.randint(0, 3, (8,), generator=generator))


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = DistributedDataParallel(model())
        x, y = batch()
        shard = slice(rank * 4, rank * 4 + 4)
        nn.functional.cross_entropy(net(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save([p.grad for p in net.module.parameters()], out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    ddp_grads = torch.load(out)

    single = model()
    x, y = batch()
    nn.functional.cross_entropy(single(x), y).backward()
    grads = [p.grad for p in single.parameters()]
    assert len(ddp_grads) == len(grads)
    for a, b in zip(ddp_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
