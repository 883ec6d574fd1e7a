"""Training on several processes: data parallel over ranks, set up by accelerate.

``torchrun --nproc_per_node N -m lab train …`` and ``accelerate launch -m lab train …`` start N copies of the same
command and tell each, through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``), which one
it is. Every trainer then runs unchanged; the few places where one process differs from N go through this module:

* **data**: every rank draws the same global batch (same seed, same shuffle) and keeps its contiguous share
  (``shard``). A GRPO rank shards the prompts and samples G completions of each of its own, so a group never
  straddles two ranks;
* **losses** that normalize by a count (tokens, sequences, pairs) divide by the count of the *global* batch
  (``global_sum``), so the per-rank gradients add up to the gradient of one process on the whole batch;
* **gradients** are summed over the ranks before clipping (``sync_gradients``, called by
  ``lab.runner.clip_and_step``): every rank then takes the same optimizer step and the replicas stay equal. This is
  the all-reduce that DDP does; it is done here on the trainable parameters alone (the LoRA adapters, or every
  weight in full fine-tuning), so the model stays an ordinary module that ``generate``, peft's adapter switching and
  the reference context keep working on, and the sum is exact (DDP averages, which is the sum only when every rank
  normalizes by its own share of the batch);
* **metrics** are reduced as one process would compute them: the trainers' ``MetricAccumulator`` sums its weighted
  sums and its weights over the ranks (token- and sequence-weighted means), rollout metrics are computed on the
  gathered rewards, and ``Run.log`` averages what is left (means over equally sized shards);
* **the record**: rank 0 alone writes config, metrics, samples and checkpoints (``NoRecord`` on the others);
* **stopping**: a stop event, SIGTERM or SIGINT on any rank is or-reduced over the ranks before each step, so all
  of them end after the same step;
* **FSDP** (``accelerate launch --use_fsdp``): full fine-tuning of every trainer shards the trained models with
  torch's ``fully_shard`` (``shard_model``: the policy, the reward model of rm, PPO's value model); gradients are
  then reduce-scattered as sums by FSDP itself, sampling runs with the weights gathered (``gathered``), and
  checkpoints save the full state dicts gathered on rank 0 (``FullWeights``). The frozen reference copy stays whole
  on every rank.

accelerate's ``PartialState`` reads the launcher's environment, initializes the process group (gloo on the CPU;
nccl for CUDA tensors, with gloo beside it for the small host-side tensors) and picks the GPU of the local rank;
its ``reduce``, ``gather`` and ``gather_object`` do the collectives. On one process (no launcher) every function here
is the identity and nothing is imported.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from lab.errors import ConfigError


def world_size() -> int:
    """Number of processes of this run (``WORLD_SIZE`` from torchrun / accelerate launch; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0: the process that writes the run record and prints."""
    return rank() == 0


def _state():
    """accelerate's process state, made on first use: the process group and the device of this rank."""
    from accelerate import PartialState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return PartialState()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "accelerate config: DeepSpeed is not supported by lab's trainers; choose 'multi-GPU' (DDP) or FSDP "
            "(full fine-tuning) in `accelerate config`, or use torchrun"
        )
    fsdp_reshard_after_forward()  # an FSDP strategy lab cannot run stops here, before any model loads
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true":
        return PartialState(backend="cuda:nccl,cpu:gloo")  # gloo carries the host-side scalars and objects
    return PartialState(cpu=True, backend="gloo")


def init() -> None:
    """Join the process group now (the first collective would otherwise do it); nothing on one process."""
    if world_size() > 1:
        _state()


def device() -> torch.device:
    """The GPU of this rank (``cuda:LOCAL_RANK``) when it has one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# data


def shard(rows: list, what: str = "batch_size") -> list:
    """This rank's contiguous share of a global batch: rows ``[r·B/N, (r+1)·B/N)``. Naive equivalent (one process):
    ``rows``. Rank r's rows come before rank r+1's, so the ranks' shards in order are the global batch."""
    n = world_size()
    if n == 1:
        return rows
    if len(rows) % n:
        raise ConfigError(f"{what}: {len(rows)} rows do not split evenly over {n} processes; use a multiple of {n}")
    size = len(rows) // n
    return rows[rank() * size : (rank() + 1) * size]


def per_process(n: int, what: str) -> int:
    """``n / N``: a global size (a minibatch) as each process's share; one line if it does not split evenly."""
    if n % world_size():
        raise ConfigError(f"{what}: {n} does not split evenly over {world_size()} processes; use a multiple of it")
    return n // world_size()


# ----------------------------------------------------------------------------------------------------------------------
# reductions


def _host(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1).cpu()


def global_sum(value):
    """Σ over the ranks of ``value`` (a number or a tensor, returned as the same kind): the global batch's count
    of tokens, sequences or pairs. Naive equivalent (one process): ``value``."""
    if world_size() == 1:
        return value
    from accelerate.utils import reduce

    _state()
    if torch.is_tensor(value):
        return reduce(value.detach(), "sum")
    total = float(reduce(_host(value), "sum")[0])
    return int(total) if isinstance(value, int) else total


def mean(value: float) -> float:
    """The mean over the ranks of a number that each rank computed on its equal share."""
    return global_sum(float(value)) / world_size()


def global_max(value: torch.Tensor) -> torch.Tensor:
    """The largest of the ranks' ``value`` (elementwise). Naive equivalent (one process): ``value``."""
    if world_size() == 1:
        return value
    from accelerate.utils import reduce

    _state()
    return reduce(value.detach(), "max")


def any_set(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any of them (a stop asked for on one rank stops all)."""
    if world_size() == 1:
        return flag
    from accelerate.utils import reduce

    _state()
    return bool(reduce(_host(float(flag)), "max")[0] > 0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0, in rank order (equal shapes): for one rank's (b,) rewards, the
    (N·b,) rewards of the global batch. Naive equivalent (one process): ``tensor``."""
    if world_size() == 1:
        return tensor
    from accelerate.utils import gather as gather_

    _state()
    return gather_(tensor.contiguous())


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / Σ m over the tokens of every rank (a token-weighted metric). Naive equivalent: ``ops.masked_mean``."""
    mask = mask.to(x.dtype)
    both = global_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return both[0] / both[1].clamp(min=1)


def weighted_sums(sums: dict, weights: dict) -> tuple[dict, dict]:
    """(Σ w·value, Σ w) per metric, summed over the ranks (a metric missing on a rank counts as zero there)."""
    if world_size() == 1:
        return sums, weights
    from accelerate.utils import gather_object

    _state()
    parts = gather_object([(sums, weights)])
    keys = list(dict.fromkeys(k for s, _ in parts for k in s))
    return (
        {k: sum(s.get(k, 0.0) for s, _ in parts) for k in keys},
        {k: sum(w.get(k, 0.0) for _, w in parts) for k in keys},
    )


def reduce_metrics(metrics: dict) -> dict:
    """One step's metrics as one process reports them: numbers averaged over the ranks (means over equal shards, or
    values that are already global and equal everywhere), ``memory/*`` the largest, ``time/*`` and anything not a
    number rank 0's. Keys keep rank 0's order; a key only some ranks have is averaged over those."""
    if world_size() == 1:
        return metrics
    from accelerate.utils import gather_object

    _state()
    parts = gather_object([metrics])
    out = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if key.startswith("time/") or len(numbers) != len(values):
            out[key] = metrics.get(key, values[0])
        elif key.startswith("memory/"):
            out[key] = max(numbers)
        elif all(v == numbers[0] for v in numbers):
            out[key] = numbers[0]  # equal everywhere: exactly that number, not a rounded mean of copies
        else:
            out[key] = sum(numbers) / len(numbers)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (the run folder's path, say)."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([obj], from_process=0)[0]


# ----------------------------------------------------------------------------------------------------------------------
# gradients


@torch.no_grad()
def sync_gradients(params) -> None:
    """Replace every parameter's gradient by its sum over the ranks: what DDP's all-reduce does, as a sum.

    The losses divide by global counts, so the sum is the gradient of the global batch. A parameter without a
    gradient on some rank counts as zero there, and keeps ``grad = None`` only if no rank has one (AdamW skips
    those). One flat buffer per device and dtype, one all-reduce each. Naive equivalent:
    ``for p in params: dist.all_reduce(p.grad)``."""
    if world_size() == 1:
        return
    from accelerate.utils import reduce

    _state()
    params = [p for p in params if p.requires_grad or p.grad is not None]
    params = [p for p in params if not hasattr(p, "full_tensor")]  # FSDP's shards: reduce-scattered as sums already
    if not params:
        return
    has_grad = reduce(_host([p.grad is not None for p in params]), "sum") > 0  # (n,)
    groups: dict = {}
    for p, has in zip(params, has_grad.tolist()):
        if has:
            groups.setdefault((p.device, p.dtype), []).append(p)
    for group in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        flat = reduce(flat, "sum")
        offset = 0
        for p in group:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


@torch.no_grad()
def broadcast_parameters(params) -> None:
    """Rank 0's values of ``params`` on every rank, before training starts (DDP does the same when it wraps a
    model): the replicas then stay equal, since every rank takes the same steps."""
    if world_size() == 1:
        return
    _state()
    for p in params:
        if not hasattr(p, "full_tensor"):  # an FSDP shard was broadcast whole before sharding (shard_model)
            torch.distributed.broadcast(p.data, src=0)


# ----------------------------------------------------------------------------------------------------------------------
# FSDP: full fine-tuning with the weights, gradients and optimizer states sharded over the ranks

# the trainers whose full fine-tuning runs sharded (dpo stands for the whole dpo family)
FSDP_METHODS = ("sft", "sft-preferred", "csft", "dpo", "grpo", "reinforce", "rm", "ppo")
_FSDP_MODE = (
    "accelerate config: FSDP runs full fine-tuning (mode=full), not mode={mode}; LoRA and QLoRA train data parallel "
    "(DDP): launch without FSDP"
)
_STRATEGIES = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}  # → reshard after forward


def fsdp() -> bool:
    """True when the launch asks for FSDP: ``accelerate launch --use_fsdp`` (or an accelerate config with FSDP)
    sets ``ACCELERATE_USE_FSDP=true`` in every process's environment. Always false on one process."""
    return world_size() > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_reshard_after_forward() -> bool:
    """Whether a sharded layer frees its gathered weights after its forward: yes for FULL_SHARD (ZeRO-3, the
    default), no for SHARD_GRAD_OP (ZeRO-2: gradients and optimizer states sharded, weights kept gathered from the
    forward to the backward); accelerate passes ``FSDP_SHARDING_STRATEGY`` (FSDP 1 configs) or
    ``FSDP_RESHARD_AFTER_FORWARD`` (FSDP 2 configs). One line for a strategy lab does not run."""
    if not fsdp():
        return True
    if os.environ.get("FSDP_VERSION", "1") == "2":
        return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in _STRATEGIES:
        raise ConfigError(
            f"accelerate config: fsdp_sharding_strategy {strategy} is not supported; use FULL_SHARD or SHARD_GRAD_OP"
        )
    return _STRATEGIES[strategy]


def check_fsdp(method: str, mode: str | None, resume=None) -> None:
    """One line, before the first step, for what FSDP does not run here."""
    if not fsdp():
        return
    works = "FSDP runs full fine-tuning (mode=full)"
    if method not in FSDP_METHODS:
        raise ConfigError(
            f"accelerate config: {works} of {', '.join(FSDP_METHODS)}, not {method}; launch without FSDP for data "
            "parallel (DDP)"
        )
    if mode != "full":
        raise ConfigError(_FSDP_MODE.format(mode=mode))
    if resume:
        raise ConfigError(f"resume: a run under FSDP saves full weights, not a resumable state; {works} from scratch")


def shard_model(model: torch.nn.Module, mode: str = "full") -> torch.nn.Module:
    """Shard ``model`` over the ranks with FSDP (torch's ``fully_shard``) when the launch asks for FSDP; the model
    itself otherwise. Each transformer block (the classes in ``_no_split_modules`` of the model, or of the
    transformers trunk a reward or value model wraps, as accelerate's transformer auto-wrap picks them) is one unit,
    the embeddings and the heads another (gathered around ``forward``, and around a reward model's ``score``): a
    unit's weights are gathered for its forward and backward and freed after, and its gradients are
    reduce-scattered so that each rank keeps (and its optimizer updates) only its 1/N of every weight. The
    reduction is a sum, not FSDP's default mean, because every loss here already divides by the global batch's
    counts. Rank 0's weights are broadcast first, so the shards are those of one model. Naive equivalent:
    ``model`` (every rank a whole copy)."""
    if not fsdp():
        return model
    if mode != "full":
        raise ConfigError(_FSDP_MODE.format(mode=mode))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    _state()
    broadcast_parameters(list(model.parameters()) + list(model.buffers()))
    mesh = init_device_mesh(device().type, (world_size(),))
    reshard = fsdp_reshard_after_forward()
    # a reward or value model (lab.modeling.ScalarModel) wraps a transformers trunk: its blocks are the trunk's
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if callable(getattr(model, "score", None)):  # a reward model is called through score, not forward: gather there too
        register_fsdp_forward_method(model, "score")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


def _fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    """True for a model that ``shard_model`` sharded."""
    return fsdp() and isinstance(model, torch.nn.Module) and bool(_fsdp_units(model))


@contextlib.contextmanager
def gathered(model):
    """Every weight of a sharded ``model`` whole on every rank while the block runs (FSDP's "summon full params"),
    sharded again after; nothing for a model that is not sharded. Inside, forwards do no collective, so ranks may
    run different numbers of them: sampling, which stops when this rank's completions end, and saving, which rank
    0 alone does. Every rank must enter it (the gathering is a collective)."""
    if not is_sharded(model):
        yield model
        return
    units = _fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield model
    finally:
        reshard = fsdp_reshard_after_forward()
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard)


def full_weights(fn):
    """Decorator for a function whose first argument is a model: it runs under ``gathered(model)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gathered(args[0] if args else kwargs["model"]):
            return fn(*args, **kwargs)

    return wrapper


class FullWeights:
    """What a checkpoint of a sharded model saves: its full state dict, gathered by every rank (a collective) onto
    rank 0's CPU when made; ``save_pretrained`` then writes it as one process would (rank 0 alone calls it), so the
    saved model loads in one process. ``obj``: a Policy or a model; a reward or value model (a transformers trunk
    and a head: ``lab.modeling.ScalarModel``, ``lab.rm.SequenceClassifierReward``); or PPO's checkpoint, whose policy
    and value model are both gathered. Its ``tokenizer`` goes along."""

    def __init__(self, obj):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.obj = obj
        self.tokenizer = getattr(obj, "tokenizer", None)
        self.value = FullWeights(obj.value_model) if hasattr(obj, "value_model") else None  # lab.ppo.PPOCheckpoint
        obj = getattr(obj, "policy", obj)
        self.model = obj if isinstance(obj, torch.nn.Module) else obj.model  # a Policy holds its model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.state_dict = get_model_state_dict(self.model, options=options)

    def save_pretrained(self, path) -> None:
        from pathlib import Path

        path = Path(path)
        _save_gathered(self.model, self.state_dict, path)
        if self.value is not None:  # PPO's layout (lab.ppo.PPOCheckpoint): the value model in value/, its head here
            _save_gathered(self.value.model, self.value.state_dict, path / "value")
            torch.save(_under(self.value.state_dict, "head"), path / "value_head.pt")


def _save_gathered(model, state_dict: dict, path) -> None:
    """``model.save_pretrained(path)`` with the gathered ``state_dict``; for a reward or value model, its trunk's
    ``save_pretrained`` and its head's weights in scalar_head.pt, as ``ScalarModel.save`` writes them."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        model.save_pretrained(path, state_dict=state_dict)
        return
    name, trunk = next((n, m) for n, m in model.named_children() if isinstance(m, PreTrainedModel))
    trunk.save_pretrained(path, state_dict=_under(state_dict, name))
    head = _under(state_dict, "head")
    if head:
        torch.save(head, path / "scalar_head.pt")


def _under(state_dict: dict, prefix: str) -> dict:
    """The entries of ``state_dict`` under the submodule ``prefix``, named as that submodule names them."""
    return {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or gradient gathered whole on every rank; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------------------------------
# the record


class NoRecord:
    """The run record of a rank other than 0: the same calls, none of which writes anything. ``path`` is rank 0's
    run folder."""

    def __init__(self, path=None):
        self.path = path
        self.run_id = getattr(path, "name", None)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def close() -> None:
    """Leave the process group at the end of a run (torch warns about one left open); nothing on one process."""
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().destroy_process_group()
