"""The process seam: one plain process, or DDP / FSDP under torchrun (which sets RANK/WORLD_SIZE), with the
gather and scatter of sharded weights and optimiser state, and the RNG state a resumed run restores."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .models import decoder_layers_name

__all__ = ["Runtime", "full_tensors", "load_optimizer_state", "optimizer_state", "rng_state", "set_rng_state", "to_float"]


@dataclass
class Runtime:
    """Who this process is; distributed only when launched by torchrun/accelerate with WORLD_SIZE > 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> "Runtime":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world_size=world_size, device=device)

    def prepare(self, lm, strategy: str = "ddp") -> torch.nn.Module:
        """DDP wraps the whole model; FSDP (fully_shard) shards each coprocessor layer and the soft tokens.

        The frozen base is never sharded: every process keeps it whole, as it holds no gradients.
        """
        if not self.distributed:
            return lm
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            stack = lm.coprocessor.stack  # None for pause tokens: nothing but the soft tokens to shard
            for layer in [] if stack is None else getattr(stack, decoder_layers_name(stack)):
                fully_shard(layer)
            fully_shard(lm.coprocessor)
            return lm
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(lm, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def to_float(value: torch.Tensor) -> float:
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of possibly sharded (DTensor) parameters; collective when sharded."""
    return {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}


def optimizer_state(optimizer, sharded: bool) -> dict:
    """The optimiser's state dict with whole tensors, so one file resumes any number of processes."""
    state = optimizer.state_dict()
    if sharded:  # collective: every process gathers the same tensors in the same order
        state["state"] = {index: full_tensors(entry) for index, entry in state["state"].items()}
    return state


def load_optimizer_state(optimizer, state: dict, sharded: bool) -> None:
    """The state of :func:`optimizer_state` into ``optimizer``; sharded: each moment cut like its parameter."""
    if sharded:  # cut whole moments into the shards of the parameters they belong to
        from torch.distributed.tensor import distribute_tensor

        parameters = [p for group in optimizer.param_groups for p in group["params"]]  # the optimiser's order
        state["state"] = {
            index: {
                key: distribute_tensor(value, parameters[index].device_mesh, parameters[index].placements)
                if key != "step" and value.shape == parameters[index].shape
                else value
                for key, value in entry.items()
            }
            for index, entry in state["state"].items()
        }
    optimizer.load_state_dict(state)


def rng_state() -> dict:
    """RNG states as tensors and plain values, so torch.load(weights_only=True) reads them back."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.random.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.random.set_rng_state(state["torch"])
