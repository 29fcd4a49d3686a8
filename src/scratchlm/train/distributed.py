"""Multi-process training with torch.distributed: DDP, FSDP2 or ZeRO-1, one process per device, via torchrun.

    torchrun --standalone --nproc_per_node 8 -m scratchlm train CONFIG.yaml train.parallel=fsdp
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --nproc_per_node 8 -m scratchlm train CONFIG.yaml                 # on each of the 2 nodes

torchrun starts the processes and sets ``RANK`` (0..W-1 over all nodes), ``LOCAL_RANK`` (0..G-1 on this
node) and ``WORLD_SIZE`` (W). :func:`process_group` reads them, joins the group (``nccl`` on CUDA, ``gloo`` on
CPU) and gives rank r the device ``cuda:LOCAL_RANK`` (or the CPU). Without ``WORLD_SIZE`` (or with 1) nothing
here does anything: every function is the identity of the single-process loop.

What each strategy (``train.parallel``) keeps on every rank, with N parameters, W ranks, fp32 weights and
gradients and AdamW (8 bytes of state per parameter, ``exp_avg`` + ``exp_avg_sq``), activations aside:

    strategy  parameters         gradients                   optimizer state   bytes per rank
    ddp       replicated         replicated (all-reduce)     replicated        4N + 4N + 8N    = 16N
    zero1     replicated         replicated (all-reduce)     1/W (sharded)     4N + 4N + 8N/W
    fsdp      1/W (all-gathered  1/W (reduce-scatter)        1/W (sharded)     16N/W + 4 N_block x ~2
              per block for forward and backward)                              (the blocks gathered now)

- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` averages the gradients (bucketed all-reduce,
  overlapped with the backward); every rank then runs the same optimizer step on the same numbers.
- ``zero1``: DDP for the gradients plus :class:`torch.distributed.optim.ZeroRedundancyOptimizer`: rank r
  keeps the optimizer state of its 1/W of the parameters (Rajbhandari et al. 2020, ZeRO stage 1), steps
  them, and broadcasts the updated values to the others.
- ``fsdp``: FSDP2's :func:`torch.distributed.fsdp.fully_shard`, applied to each Transformer block and then
  to the root (the embeddings and the head): parameters are DTensors sharded on dim 0; a block's full weights
  are all-gathered just before its forward (and again for its backward) and freed after, and gradients are
  reduce-scattered (averaged) so that each rank steps only its shard (ZeRO stage 3). The weights are
  gathered in fp32; the bf16 casts are autocast's, as in the single-process loop. GPT models only: the
  encoder-decoder's cached decoding calls sub-modules outside their ``forward``, which FSDP2 cannot gather.

The trainer applies these from outside (torchtitan style): the model code knows nothing of them.
Gradient accumulation reduces once per optimizer step (:func:`gradient_sync`: DDP's ``no_sync``, FSDP2's
``set_requires_gradient_sync``). Logged numbers are global: the loss is averaged over ranks (every rank
decides the same way on a NaN), the gradient norm is that of the whole (averaged) gradient.

Checkpoints stay one set of files, loadable anywhere (one process, another world size, ``scratchlm.load``):
every rank takes part in gathering the full, unwrapped state (:func:`full_model_state`,
:func:`full_optimizer_state`: FSDP's DTensors through ``torch.distributed.checkpoint.state_dict``, ZeRO's
shards through ``consolidate_state_dict``), then rank 0 alone writes it, in the single-process format (no
``module.`` prefixes, optimizer state keyed by parameter index as ``torch.optim`` does). On resume every
rank reads the same files; the strategy takes its own share (:func:`load_optimizer_state`).
Multi-node runs need the run directory on a file system that every node sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.config import TrainConfig
from scratchlm.errors import ConfigError, ScratchLMError

T = TypeVar("T")

# rank 0 may spend a long time alone (training the tokenizer, encoding shards) while the others wait
WAIT_FOR_MAIN_TIMEOUT = timedelta(hours=12)
_objects_group: Any = None  # a gloo group with that timeout, for the Python objects rank 0 sends


@dataclass(frozen=True)
class World:
    """Who this process is: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, samples, plots and checkpoints."""
        return self.rank == 0


def world_from_env() -> World:
    """The World torchrun describes in ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (one process if unset)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))), size=size)


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process); readable before the process group exists."""
    return world_from_env().is_main


def rank_device(name: str, world: World) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` on a GPU machine, else the CPU.

    One process: :func:`scratchlm.device.resolve_device` unchanged.
    """
    from scratchlm.device import resolve_device

    device = resolve_device(name)
    if world.size == 1:
        return device
    if device.type == "cuda":
        if name not in ("auto", "cuda"):
            raise ConfigError(
                f"train.device={name!r} under torchrun: use train.device=cuda (or auto); each rank "
                "takes cuda:LOCAL_RANK (restrict the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", world.local_rank)
    if device.type != "cpu":
        raise ConfigError(
            f"train.device={name!r} is {device}: multi-process training runs on CUDA (nccl) or the CPU "
            "(gloo); use train.device=cpu here"
        )
    return device


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[World]:
    """Join the torchrun process group for the body (nccl on CUDA, gloo on CPU), and always leave it.

    Re-entrant: inside an active group (e.g. ``pipeline.run`` around ``train_model``) it only yields the
    World, and the outer one destroys the group, also when the body raises.
    """
    global _objects_group
    world = world_from_env()
    if world.size == 1 or dist.is_initialized():
        yield world
        return
    device = rank_device(device_name, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        _objects_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN_TIMEOUT)
        yield world
    finally:
        _objects_group = None
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------------------------------------
# applying a strategy to the model and the optimizers


def parallelize(
    model: nn.Module,
    cfg: TrainConfig,
    world: World,
    device: torch.device,
    *,
    arch: str = "gpt",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    """Apply ``cfg.parallel`` to ``model`` (on ``device``); returns (module to run the forward, optimizers).

    ``model`` stays the plain module for evaluation and checkpoints (FSDP shards it in place). One
    process: ``(model, build_optimizers(model, cfg))``. Call after loading resumed weights: DDP broadcasts
    rank 0's weights and FSDP shards the full weights each rank holds.
    """
    from scratchlm.train.optim import build_optimizers

    if world.size == 1:
        return model, build_optimizers(model, cfg)
    if cfg.parallel == "fsdp":
        if arch != "gpt":
            raise ConfigError(
                f"train.parallel=fsdp supports model.arch=gpt, not {arch} (its cached decoding calls "
                "sub-modules outside their forward, which FSDP2 cannot gather); use ddp or zero1"
            )
        if dtype == torch.float16:
            raise ConfigError(
                "train.parallel=fsdp with float16 needs a sharded GradScaler, which torch's fused AdamW "
                "does not accept; use train.dtype=bfloat16 or float32, or train.parallel=ddp or zero1"
            )
        apply_fsdp(model)
        return model, build_optimizers(model, cfg)
    forward_model = wrap_ddp(model, device)
    if cfg.parallel == "zero1":
        return forward_model, build_optimizers(model, cfg, make=zero1_optimizer)
    return forward_model, build_optimizers(model, cfg)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (its parameters are broadcast from rank 0 here)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def apply_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each Transformer block, then the root (embeddings, final norm, head).

    Each block is one unit of all-gather / reduce-scatter, so at most a block or two are ever unsharded;
    the root holds the rest (a tied head and embedding are one parameter in one unit).
    """
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def zero1_optimizer(cls: type[torch.optim.Optimizer], groups: list[dict], **kwargs: Any) -> Any:
    """``cls(groups, **kwargs)`` with its state sharded over the ranks (ZeroRedundancyOptimizer)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP-sharded (then every rank must take part in each of its forwards)."""
    if not _active():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(forward_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward + backward with (``enabled``) or without the gradient reduction over ranks.

    Accumulating k micro-batches: all but the last run without it, so gradients are summed locally and
    reduced once per step (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``).
    """
    if enabled or not _active():
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    module = getattr(forward_model, "_orig_mod", forward_model)  # under torch.compile
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (inf = no clipping); returns the norm before clipping
    (a 0-d tensor on the device: reading it is left to the caller, who waits for the device once per step).

    ``torch.nn.utils.clip_grad_norm_`` split in its two halves (as torchtitan does): under FSDP the norm of
    the sharded DTensor gradients is itself a DTensor, made a plain tensor holding the global norm
    (``full_tensor``, which reduces it if the torch version left it partial) before the gradients are scaled.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if _active():
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------------------------------------
# collectives on logged values and decisions


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (all-reduce; gloo has no AVG, so SUM / W)."""
    if not _active():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def sum_over_ranks(*values: float) -> list[float]:
    """The sums over ranks of a few Python numbers, in one all-reduce (float64)."""
    if not _active():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier()


def all_gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; ``[obj]`` in one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_objects_group)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its (picklable) result or raises its user error.

    The others wait (up to :data:`WAIT_FOR_MAIN_TIMEOUT`). A ScratchLMError on rank 0 is raised on every
    rank, so a bad path or corrupt checkpoint ends all processes with the same one-line message.
    """
    if not _active():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ScratchLMError as e:
            box[0] = ("error", e)
        except BaseException as e:
            box[0] = ("crash", f"rank 0 failed: {type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0, group=_objects_group)
            raise
    dist.broadcast_object_list(box, src=0, group=_objects_group)
    status, value = box[0]
    if status == "error":
        raise value
    if status == "crash":
        raise RuntimeError(value)
    return value


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the others (which then find its results in the cache); returns it.

    For steps that write shared files (tokenizer training, shard preparation): one writer, no races.
    """
    if not _active():
        return fn()
    result: list[T] = []
    on_main(lambda: result.append(fn()))  # only the outcome travels (ok, or rank 0's error)
    return result[0] if dist.get_rank() == 0 else fn()


# ----------------------------------------------------------------------------------------------------------
# full (unsharded) state for checkpoints, and loading it back


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of the unwrapped model under their plain names, on rank 0 (a collective under FSDP).

    FSDP: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` all-gathers each DTensor to rank
    0's CPU (the other ranks get ``{}``); tied names are made to share one tensor again, so the checkpoint
    stores it once as in one process. Otherwise: ``model.state_dict()`` (the same on every rank).
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
            state[name] = state[first[id(p)]]
    return state


def full_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict] | None:
    """Each optimizer's full state dict in the ``torch.optim`` format, on rank 0 (None elsewhere).

    A collective for ZeRO-1 (``consolidate_state_dict`` sends each rank's shard to rank 0) and FSDP
    (``get_optimizer_state_dict`` gathers the DTensor states; its parameter names are turned back into
    the indices ``torch.optim`` uses, so the file is the same whatever the strategy).
    """
    if not _active():
        return [opt.state_dict() for opt in optimizers]
    from torch.distributed.optim import ZeroRedundancyOptimizer

    main = dist.get_rank() == 0
    states = []
    for opt in optimizers:
        if isinstance(opt, ZeroRedundancyOptimizer):
            opt.consolidate_state_dict(to=0)
            states.append(opt.state_dict() if main else None)
        elif is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            named = get_optimizer_state_dict(model, opt, options=options)
            states.append(_names_to_indices(named, _param_names(model, opt)) if main else None)
        else:
            states.append(opt.state_dict())
    return states if main else None


def load_optimizer_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], states: list[dict]
) -> None:
    """Load full optimizer states (from :func:`full_optimizer_state`, any strategy) on every rank.

    ZeRO-1 keeps its shard of the full dict; FSDP takes its shards through ``set_optimizer_state_dict``.
    """
    from scratchlm.train.optim import load_optimizer_state as load_plain

    if not is_sharded(model):
        load_plain(optimizers, states)  # ZeroRedundancyOptimizer.load_state_dict takes the full dict
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    def load_shards(opt: torch.optim.Optimizer, sd: dict) -> None:
        named = _indices_to_names(sd, _param_names(model, opt))
        set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True))

    load_plain(optimizers, states, load=load_shards)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``opt`` in its index order (torch.optim numbers them group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _names_to_indices(sd: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
    }


def _indices_to_names(sd: dict, names: list[str]) -> dict:
    return {
        "state": {names[int(i)]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }
