"""One training across several processes, GPUs or machines, on torch.distributed.

Under `torchrun` (or `mnistlab train --nproc N`, which starts torchrun), every process runs the same training.
Data parallel, with the config's `batch_size` kept as the global batch: every rank draws the same seeded
permutation a single process would, takes a contiguous 1/N share of each batch, computes the gradients of its
share, and the shares' gradients are summed across ranks weighted by their size (`BatchGradients`), so each step
is the step one process would take, up to float rounding, and the learning rate needs no rescaling. Networks
trained through autograd (every CNN) do this under DistributedDataParallel, whose all-reduce of each bucket of
gradients runs while backward computes the next; the hand-derived MLP gradients bypass autograd, and so DDP's
hooks, and are summed in one explicit all-reduce after they are computed.

Evaluation is sharded without padding (sums of losses and correct counts), so accuracy is exactly the single
process's on the same weights. BatchNorm's running statistics are rank 0's, broadcast after each epoch; on CUDA
the layers are SyncBatchNorm, which also shares the batch statistics across ranks. Only rank 0 writes files and
prints. A rank that dies or hangs fails the others' next collective within the timeout.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from mnistlab.devices import available_memory, cpu_count
from mnistlab.errors import MnistlabError, plural
from mnistlab.files import interrupt_of
from mnistlab.models.gradients import GradientFn
from mnistlab.processes import LAUNCHER_ENV, end_with_parent, launcher_pid

# How long a rank waits in a collective for the others before giving up (a rank that died or hung).
TIMEOUT_S = float(os.environ.get("MNISTLAB_DIST_TIMEOUT", "60"))


@dataclass(frozen=True)
class Cluster:
    """This process's place among the processes of one training (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes the files and prints (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, total: int) -> slice:
        """This rank's contiguous share of `total` items, as `torch.tensor_split` cuts them: sizes differ by at
        most one, nothing is padded or repeated (one process: all of them)."""
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over all ranks, in place."""
        if self.active:
            self._run(dist.all_reduce, values)
        return values

    def share_gradients(self, params: list[torch.Tensor], local: int, total: int) -> None:
        """Turn each rank's mean gradient over its `local` images into the mean over the `total` of the batch, in
        one all-reduce (for gradients computed outside autograd: `BatchGradients`)."""
        if not self.active:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(local / total)
        self._run(dist.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) to every rank."""
        if self.active:
            for buffer in model.buffers():
                self._run(dist.broadcast, buffer, src=0)

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait for every rank; `timeout_s` (gloo only: NCCL's barrier keeps the group's) for a wait longer than
        TIMEOUT_S that is no sign of a hung peer, such as rank 0 writing the finished run."""
        if not self.active:
            return
        if timeout_s is not None and self.backend == "gloo":
            self._run(dist.monitored_barrier, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            self._run(dist.barrier)

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable value made by mnistlab itself, never a user's file)."""
        if not self.active:
            return value
        box = [value]
        self._run(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        self._run(dist.all_gather_object, out, value)
        return out

    def _run(self, collective, *args, **kwargs) -> None:
        """A collective operation; a peer that died or hung (past the timeout) is a one-line error (`lost`)."""
        try:
            collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            raise self.lost(exc) from None

    def lost(self, exc: BaseException) -> MnistlabError:
        """The one-line error for a collective that failed with `exc` (a peer died, or hung past the timeout),
        naming this rank, instead of a hang or a traceback from the backend."""
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return MnistlabError(
            f"rank {self.rank} of {self.world_size}: lost the other ranks (one died, or hung for over "
            f"{TIMEOUT_S:g} s: {reason}); the last checkpoint is intact, resume with --resume"
        )


SINGLE = Cluster()


class BatchGradients:
    """The gradients of a whole batch in every parameter's `.grad`, on every rank, from each rank's share of it.

    Each rank's mean gradient over its share is weighted by the share's size (local / total: shares differ by one
    image where the batch does not divide) and the weighted gradients are summed over the ranks: the mean over
    the batch, the gradient one process computes. Networks trained through autograd run under
    DistributedDataParallel with that weighting as its communication hook, so each bucket of gradients is
    all-reduced while backward computes the next; the hand-derived MLP gradients (`by_hand`), which bypass
    autograd and so DDP's hooks, are summed in one all-reduce after. One process: the gradient function alone.
    """

    def __init__(self, cluster: Cluster, model: nn.Module, make: Callable[[nn.Module], GradientFn], by_hand: bool):
        self.cluster = cluster
        self.weight = 1.0  # this rank's share of the batch at hand, for the communication hook
        self._failure: BaseException | None = None  # an all-reduce of the communication hook that failed
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._overlapped = cluster.active and not by_hand
        # Only the gradient function goes through DDP: the training attacks, evaluation, the weight average and
        # checkpoints use the network itself, so no forward without its backward reaches DDP (which would wait
        # for gradients that never come) and no state_dict key gets DDP's `module.` prefix.
        self._gradients = make(self._data_parallel(model) if self._overlapped else model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, local: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient function on this rank's images `x` (`local` of the batch's `total`; TRADES passes them
        twice), its gradients summed with the other ranks'; returns this rank's loss and outputs."""
        self.weight = local / total
        if not self._overlapped:
            loss, out = self._gradients(x, y)
            self.cluster.share_gradients(self._params, local, total)
            return loss, out
        try:
            return self._gradients(x, y)
        except RuntimeError:
            if self._failure is None:  # the computation's own error (a CUDA out-of-memory, say): no lost peer
                raise
            raise self.cluster.lost(self._failure) from None

    def sum_bucket(self, flat: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """A bucket of this rank's mean gradients, weighted by its share of the batch and summed over the ranks
        (DDP's own hook divides by the number of ranks, which is right only for equal shares). A failure is kept:
        DDP re-raises it from backward as a RuntimeError like any other, and only this tells them apart."""
        try:
            future = dist.all_reduce(flat.mul_(self.weight), async_op=True).get_future()
        except RuntimeError as exc:
            self._failure = exc
            raise
        return future.then(self._summed)

    def _summed(self, done: torch.futures.Future) -> torch.Tensor:
        try:
            return done.value()[0]
        except RuntimeError as exc:
            self._failure = exc
            raise

    def _data_parallel(self, model: nn.Module) -> DistributedDataParallel:
        device = next(model.parameters()).device
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # BatchNorm's running statistics are rank 0's, sent to every rank after each epoch (`broadcast_buffers`
            # of the Cluster, which the hand-derived path needs too) before evaluation; within an epoch each rank's
            # own serve its adversarial attacks (eval mode), as they did before DDP. DDP's default, rank 0's before
            # every forward, would add a collective to every step.
            **{_BUFFER_SYNC: False},
            # A built network uses every parameter in every forward: searching the graph for unused ones would
            # walk it at every step for nothing.
            find_unused_parameters=False,
        )
        ddp.register_comm_hook(self, _weighted_sum)
        return ddp


# torch 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers` (the old name warns on every rank).
_BUFFER_SYNC = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)


def _weighted_sum(gradients, bucket):  # unannotated: DDP compares annotations with classes, and these would be strings
    """DDP's communication hook (`BatchGradients.sum_bucket`)."""
    return gradients.sum_bucket(bucket.buffer())


def environment_world_size() -> int:
    """The number of processes torchrun (or any launcher setting WORLD_SIZE) started for this training."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MnistlabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def join(device: torch.device) -> tuple[Cluster, torch.device]:
    """This process's Cluster and device: rank 0 of 1 unless a launcher set WORLD_SIZE > 1, in which case the
    process group is started (gloo on CPU, nccl on CUDA) and this rank's CPU threads or GPU are chosen."""
    world = environment_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A rank of torchrun's: it must not outlive its launcher, even one killed by SIGKILL (issue 27). SIGTERM
        # to itself stops it as a terminal's would, its checkpoint intact.
        end_with_parent(launcher_pid(), signal.SIGTERM)
    if "LOCAL_WORLD_SIZE" in os.environ:
        # torchrun gives each process one thread unless told otherwise, a silent loss on a small machine: share
        # the cores among this machine's ranks instead (docs/distributed.md measures both).
        torch.set_num_threads(max(1, cpu_count() // local_world))
    if world <= 1:
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise MnistlabError(f"training on several processes needs the CPU or CUDA, not {device.type}")
    if not dist.is_initialized():  # else the caller's own process group, which it also ends
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if restarted():
            # torchrun keeps one store for the whole job, and a group restarted by --max-restarts read the failed
            # attempt's addresses from it and could not connect ("Gloo connectFullMesh failed ... Connection
            # refused", every restart on a loaded machine; pytorch/pytorch#167288): a restart gets keys of its own.
            handler = rendezvous("env://", timeout=timeout)
            store, rank, world_size = next(handler)
            handler.close()  # the store lives on in the process group; nothing else may hold it at exit
            store = dist.PrefixStore(f"mnistlab/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        _started.add(dist.group.WORLD)
    cluster = Cluster(dist.get_rank(), dist.get_world_size(), local_rank, local_world, backend)
    return cluster, device


_started: set = set()  # the process group `join` started, which `leave` ends


def leave(cluster: Cluster) -> None:
    """End the process group `join` started (after a finished or failed training). After a finished one, every
    rank must have passed a `barrier` first: a rank that ends its gloo group while a peer still holds
    connections to it can abort in the teardown (SIGABRT, "terminate called without an active exception")."""
    if cluster.active and dist.is_initialized() and dist.group.WORLD in _started:
        _started.discard(dist.group.WORLD)
        dist.destroy_process_group()


def restarted() -> bool:
    """Whether torchrun restarted this job after a failure (`--max-restarts`): it then resumes its checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


# A rank's memory: Python, PyTorch and mnistlab imported, the process group and a batch's work, plus about three
# copies of the images (read, decompressed, as the tensor; every registered data set is 70,000 images of 28x28).
# Measured (VmHWM) for seed-b-fixed on MNIST under --nproc 2 on AMD EPYC: 419 MB a rank, 227 MB of it imports.
# Larger CNNs need more: the estimate is a floor, so that a refusal is never wrong.
RANK_BYTES = 240 * 2**20 + 3 * 70_000 * 28 * 28


def check_capacity(nproc: int, device: torch.device, oversubscribe: bool = False) -> None:
    """Refuse, before anything starts, more ranks than this machine can run: more than its CPU cores on the CPU
    (or GPUs on CUDA) unless `oversubscribe`, and, always, ranks whose memory together exceeds what it has
    available (99 ranks on a 2-core machine once ran it out of memory, and the kernel killed a bystander)."""
    if nproc < 1:
        raise MnistlabError(f"--nproc must be at least 1, got {nproc}")
    limit, what = (torch.cuda.device_count(), "GPU") if device.type == "cuda" else (cpu_count(), "CPU core")
    need, have = nproc * RANK_BYTES, available_memory()
    memory = f"{nproc} ranks need at least {need / 2**30:.1f} GB of memory" + (
        f", {have / 2**30:.1f} GB is available" if have is not None else ""
    )
    if nproc > limit and not oversubscribe:
        raise MnistlabError(
            f"--nproc {nproc} is more than this machine's {plural(limit, what)} (one rank each); give --nproc "
            f"{limit} or fewer, or add --oversubscribe to run more ranks than {what}s ({memory})"
        )
    if have is not None and need > have:
        raise MnistlabError(f"--nproc {nproc}: {memory}; give fewer")


def launch(nproc: int, argv: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node NPROC -m mnistlab ARGV` in this process: what `--nproc` does."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = ["--standalone", "--nproc-per-node", str(nproc), "-m", "mnistlab", *argv]
    # The ranks set their own thread counts (`join`); this only spares the user torchrun's warning about it.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks end with this process (processes.end_with_parent)
    # torchrun's agent logs each signal it passes on as warnings; the ranks and this process say what matters.
    for name in list(logging.root.manager.loggerDict):  # each module's logger has a level of its own
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run.main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except SignalException as exc:
        # Ctrl-C, SIGTERM or SIGHUP: torchrun has passed it on to the ranks, which saved and said how to resume;
        # here it ends as it would in one process, not in torchrun's traceback.
        raise interrupt_of(exc.sigval) from None
    except ChildFailedError as exc:  # torchrun has printed each rank's own message and its failure table
        rank, failure = exc.get_first_failure()
        print(
            f"mnistlab: error: rank {rank} of {nproc} failed (exit code {failure.exitcode}); see above", file=sys.stderr
        )
        return 1
    finally:
        os.environ.pop(LAUNCHER_ENV, None)  # for this process's later launches of other kinds (tests run several)
    return 0
