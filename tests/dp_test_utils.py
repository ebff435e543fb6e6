"""Run a loss on several data-parallel ranks for real: ``world`` CPU processes joined by a gloo process group, each
calling ``hapo_verl.integration.loss.run_loss`` on its own rows with ``dp_group`` = the world group (what verl's
engine hands the loss). Used to check that statistics reduced over the ranks (BAPO's bounds, STAPO's counts) make
the result independent of the data-parallel size."""

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, job, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(job(rank, world, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(job, world: int, out_dir) -> list:
    """``job(rank, world, dp_group) -> picklable`` on ``world`` gloo ranks; the results, by rank. ``job`` must be a
    module-level function (it is pickled into the spawned processes)."""
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_worker, args=(world, _free_port(), job, str(out_dir)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def assert_ranks_equal_single(single: dict, ranks: list) -> None:
    """Two data-parallel ranks give the single process's loss and gradient: verl's token-mean scales each rank by
    dp_size and DDP averages the ranks' gradients. Each result holds ``loss``, ``grad`` and its ``rows``."""
    import pytest

    assert sum(r["loss"] for r in ranks) / len(ranks) == pytest.approx(single["loss"], rel=1e-6)
    grads = torch.zeros_like(single["grad"])
    for r in ranks:
        grads[r["rows"]] = r["grad"] / len(ranks)
    assert torch.allclose(grads, single["grad"], atol=1e-7)
