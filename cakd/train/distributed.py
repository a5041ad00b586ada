"""torchrun environment, rank helpers and the few collectives the trainer needs."""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .report import UserError


@dataclasses.dataclass(frozen=True)
class DistributedMode:
    """What :func:`init_distributed_mode` found: this process's ``rank`` of ``world_size``, the
    ``device`` it runs on, and whether a process group joins them (``distributed``)."""

    distributed: bool
    rank: int
    world_size: int
    device: torch.device


def check_device(name):
    """``--device`` as a torch.device; a CUDA device where none is visible is one error line
    (the trainer's and the scripts', before torchrun's set-up, which would fail on it)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is visible: pass --device cpu for a CPU run")
    return torch.device(name)


def init_distributed_mode(device="cpu", dist_url="env://"):
    """Join torchrun's (or SLURM's) process group, if any; returns the :class:`DistributedMode`.

    ``device``: ``cuda`` becomes ``cuda:<local rank>`` in a process group. NCCL on CUDA devices,
    gloo on the CPU. A plain ``python -m cakd.train`` runs as one process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        gpu = rank % max(torch.cuda.device_count(), 1)
    else:
        return DistributedMode(False, 0, 1, torch.device(device))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
    backend = "nccl" if cuda else "gloo"
    kwargs = {"device_id": torch.device(device)} if cuda else {}  # NCCL then knows its GPU
    store = attempt_store() if dist_url == "env://" else None
    kwargs.update({"store": store} if store is not None else {"init_method": dist_url})
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank, **kwargs)
    global _HOST_GROUP
    _HOST_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None  # None: the default group is gloo
    dist.barrier()
    return DistributedMode(True, rank, world_size, torch.device(device))


_HOST_GROUP = None  # a gloo group beside NCCL's: collectives of host values that wait for no GPU work


def host_any(flag: bool) -> bool:
    """True when ``flag`` is set on any rank, agreed over the host (gloo): unlike :func:`any_rank`
    on a CUDA device, it does not wait for the GPU's queued work (cheap enough for every step)."""
    if not is_dist():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(t.item())


def attempt_store():
    """torchrun's store with a prefix per attempt, or None outside torchrun.

    Under ``--max-restarts`` torchrun's static rendezvous keeps one store for every attempt, and
    ``env://`` does not prefix its keys: a restarted rank could read the address (gloo) or id
    (NCCL) a dead rank of the previous attempt left there, and wait for it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(minutes=30)
    )
    return dist.PrefixStore(f"cakd/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in one process)."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device) -> bool:
    """True when ``flag`` is set on any rank: every rank must take the same branch."""
    if not is_dist():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def smallest(value: int, device) -> int:
    """The smallest of ``value`` over the ranks (itself in one process)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def average_gradients(parameters):
    """Average the gradients of parameters that are not under DDP (the discriminator),
    as one flat all-reduce."""
    if not is_dist():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's forward updates its
    own, so evaluating every rank's copy would not be evaluating the checkpoint rank 0 saves."""
    if is_dist():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if is_dist():
        dist.destroy_process_group()
