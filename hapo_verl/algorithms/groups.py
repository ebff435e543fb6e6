"""Prompt groups: the n responses that share a ``uid``. Group ids, per-group sums and GRPO's normalisation.

Pure torch; every estimator that normalises within groups uses these (one definition each).
"""

from __future__ import annotations

import torch


def group_ids_from_index(index) -> torch.Tensor:
    """Map arbitrary group labels (uids: str/int, numpy/list/tensor) to contiguous ids 0..G-1."""
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        _, ids = torch.unique(index.reshape(-1), return_inverse=True)
        return ids
    import numpy as np

    arr = np.asarray(index, dtype=object).reshape(-1)
    _, ids = np.unique(arr.astype(str), return_inverse=True)
    return torch.from_numpy(ids.astype(np.int64))


def num_groups(group_ids: torch.Tensor) -> int:
    """G for contiguous ids 0..G-1 (one host sync: call it on the driver, not in a loss)."""
    return int(group_ids.max().item()) + 1 if group_ids.numel() else 0


def equal_size_groups(group_ids: torch.Tensor, count: int) -> tuple[int, torch.Tensor | None] | None:
    """The layout of ``count`` groups (contiguous ids 0..count-1) when every group has the same size n, as verl's
    rollout makes them (``rollout.n`` responses per prompt; dynamic sampling keeps whole groups): ``(n, order)``,
    where ``order`` (B,) lists the rows group after group, so that ``x[order].view(count, n, ...)`` puts each group
    on one slice of dim 0 (block j holds group ``group_ids[order[j * n]]``), and is None when the rows already are
    such blocks (each n consecutive rows one group, in any group order: ``x.view(count, n, ...)`` directly). None when
    the sizes differ. Vectorised, two host syncs (call it on the driver, not in a loss)."""
    rows = group_ids.numel()
    if count <= 0 or rows % count:
        return None
    size = rows // count
    if not bool((torch.bincount(group_ids.reshape(-1), minlength=count) == size).all()):
        return None
    blocks = group_ids.reshape(count, size)
    if bool((blocks == blocks[:, :1]).all()):  # each block is one group, and each group has size rows: one block
        return size, None
    return size, torch.argsort(group_ids.reshape(-1), stable=True)


def group_sum(values: torch.Tensor, group_ids: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) sums of ``values`` (B,) per group."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, group_ids, values)


def grpo_sequence_advantage(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> torch.Tensor:
    """GRPO advantage per response, as verl's ``compute_grpo_outcome_advantage``: mean and unbiased std over the
    group's responses; a group of one uses mean 0 and std 1."""
    ones = torch.ones_like(scores)
    count = group_sum(ones, group_ids, num_groups)
    total = group_sum(scores, group_ids, num_groups)
    mean = total / count.clamp_min(1.0)
    sq = group_sum((scores - mean[group_ids]).square(), group_ids, num_groups)
    std = (sq / (count - 1.0).clamp_min(1.0)).sqrt()
    singleton = count <= 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    centered = scores - mean[group_ids]
    return centered / (std[group_ids] + epsilon) if norm_adv_by_std else centered
