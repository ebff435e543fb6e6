"""Collectives over the data-parallel group verl's engine hands a loss (``dp_group``): sums for statistics every
rank must agree on, and gathers of per-rank values. Both are no-ops on one process."""

from __future__ import annotations

import torch


def dp_all_reduce(dp_group=None):
    """``all_reduce(tensor)``: the sum over the data-parallel group verl's engine hands the loss (``dp_group``), a
    no-op on one process. Every rank calls it once per micro-batch: verl's engines give every data-parallel rank the
    same number of micro-batches (``prepare_micro_batches(..., same_micro_num_in_dp=True)``)."""

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dp_group is None or not (dist.is_available() and dist.is_initialized()):
            return tensor
        if dist.get_world_size(group=dp_group) <= 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=dp_group)
        return out

    return all_reduce


def dp_all_gather(dp_group=None):
    """``all_gather(values)``: the 1-D ``values`` of every data-parallel rank concatenated in rank order (ranks may
    hold different numbers of values), ``values`` itself on one process."""

    def all_gather(values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dp_group is None or not (dist.is_available() and dist.is_initialized()):
            return values
        world = dist.get_world_size(group=dp_group)
        if world <= 1:
            return values
        values = values.detach().reshape(-1)
        size = torch.tensor([values.numel()], device=values.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=dp_group)
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(counts), dtype=values.dtype, device=values.device)
        padded[:values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=dp_group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    return all_gather
