"""Process-group setup for ``torchrun`` (DDP) and the few collectives the engine needs.

Launch with ``torchrun --nproc_per_node N -m visiontrain train <task> ...``: torchrun sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; we use gloo on CPU and NCCL on GPU. A plain
``python -m visiontrain`` run is a world of one and every function here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` under torchrun picks ``cuda:<local_rank>``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec} was asked for but CUDA is not available here; use device=cpu")
    return device


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = local_rank()
    device = resolve_device(device_spec, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0":
            dist.init_process_group(backend=backend)
        else:
            # the agent's store outlives a restart with the dead workers' addresses still in it; under
            # the same keys, a restarted rank can read a stale one and fail to connect (gloo:
            # "connectFullMesh ... Connection refused"). A prefix per restart keeps the attempts apart.
            store, rank_, world_ = next(dist.rendezvous("env://"))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"visiontrain/restart{restart}", store),
                                    rank=rank_, world_size=world_)
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` unchanged in a world of one)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def global_mean_normalizer(local: torch.Tensor, minimum: float = 1.0) -> torch.Tensor:
    """A loss normaliser for DDP: ``max(sum over ranks of local, minimum) / world`` (detached).

    A loss ``sum_i l_i / max(n, minimum)`` over a batch computed on each rank as ``sum_local / this``
    makes DDP's gradient average equal to the single-process gradient over the global batch. Collective
    (every rank must call it); ``max(local, minimum)`` in a world of one."""
    if not is_dist():
        return local.detach().clamp(min=minimum)
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.clamp(min=minimum) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun (registering the parameters that require grad
    now: wrap again after freezing changes), the model itself in a world of one."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_means(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over ranks (float64, one all-reduce); unchanged in a world of one."""
    if not is_dist():
        return values
    t = all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
    return dict(zip(values, t.tolist()))


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on ``device``; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
