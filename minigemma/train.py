"""Training: the loop, its schedule, gradient accumulation, checkpoints, and many processes (chapter 08).

    python -m minigemma train tiny-gemma3 --steps 2000 --out runs/gemma3       # a recipe or a JSON file
    python -m minigemma train tiny-gemma3 --steps 2000 --out runs/gemma3 --resume
    python -m minigemma train tiny-gemma3 --steps 2000 --out runs/bf16 --precision bf16-mixed
    torchrun --nproc_per_node 2 -m minigemma train tiny-gemma3 --steps 2000 --out runs/ddp
    torchrun --nproc_per_node 2 -m minigemma train tiny-gemma3 --steps 2000 --out runs/fsdp --fsdp

One optimizer step:

    batch  = window_batch(stream, B, T, seed, step, rank, world)   # this process's rows
    for each of A micro-batches:                                   # gradient accumulation
        loss_sum = Σ over its tokens of −log p(next token)         # chunked head + loss
        (loss_sum / tokens in the whole batch).backward()          # grads add up to the batch mean's
    clip the gradient norm to `clip`; lr = warmup, then cosine; AdamW step

The batch of step s depends only on (seed, s), and the schedule only on s, so a run resumed from
the checkpoint of step s continues bit for bit as if it had never stopped: the checkpoint holds
the weights, AdamW's moments and step counts, the config and the history, in one safetensors
file written atomically (`atomic.write_atomic`: a temporary file, flushed, then renamed).

Many processes (torchrun): each takes rows rank, rank + world, ... of the same global batch and
DDP averages the gradients (an all-reduce), so N processes with batch B/N give the loss curve of
one process with batch B. With `--fsdp` each process holds only a shard of every weight, gradient
and optimizer moment (FSDP2's `fully_shard`), gathered layer by layer when needed. On CPU the
processes talk through gloo, on GPUs through NCCL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data as data_mod
from .atomic import write_atomic
from .losses import Labels, chunked_loss

FORMAT = "minigemma-train-1"


# --------------------------------------------------------------------------------------------
# Configs: the model and the run
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One training run. batch_size is global: rows per optimizer step over all processes."""

    steps: int = 2000  # the schedule's length (the cosine reaches min_lr here)
    batch_size: int = 16
    seq_len: int = 128  # T: tokens per row
    grad_accum: int = 1  # micro-batches per step (each process)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # on matrices only (not norms, biases, RG-LRU's Λ)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 250
    eval_windows: int = 64  # validation windows of seq_len + 1 tokens
    ckpt_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    loss_chunk: int | None = None  # rows per chunk of the head + loss (None: ~4 M logits)
    packed: bool = True  # positions restart at each BOS inside a window (documents kept apart)
    bos_id: int = 2
    precision: str = "float32"  # or "bf16-mixed": see `precision_context`

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check_precision(self.precision)
        at_least = {"steps": 1, "batch_size": 1, "seq_len": 1, "grad_accum": 1, "eval_windows": 1,
                    "keep_checkpoints": 1, "warmup": 0, "eval_every": 0, "ckpt_every": 0}
        for name, low in at_least.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must split into grad_accum ({self.grad_accum}) "
                             "equal micro-batches")
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk < 1):
            raise ValueError(f"loss_chunk must be None or a whole number >= 1, got {self.loss_chunk!r}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0 and self.clip >= 0
                and all(0 <= b < 1 for b in self.betas)):
            raise ValueError("min_lr_ratio must be in [0, 1], weight_decay and clip >= 0, betas in [0, 1)")


PRECISIONS = ("float32", "bf16-mixed")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def precision_context(precision: str, device: torch.device | str = "cpu"):
    """Where the forward runs: "float32" as it is; "bf16-mixed" under `torch.autocast` in bfloat16,
    mixed precision as Gemma trains: the matrix products take bfloat16 inputs (2x the float32
    rate on CPUs with bf16 dot products), while weights, gradients, AdamW's moments, norms,
    attention's softmax and the loss stay float32. The backward follows the forward's dtypes."""
    _check_precision(precision)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay.

        step < warmup:           peak · (step + 1) / warmup
        warmup <= step < total:  min + ½ (peak − min) (1 + cos(π · (step − warmup) / (total − warmup)))
        step >= total:           min,        with min = peak · min_ratio
    """
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _gemma_cfg(**kw):
    from .gemma import GemmaConfig, layer_pattern

    n = kw.pop("num_hidden_layers")
    return dict(num_hidden_layers=n, layer_types=layer_pattern(n, 6), **kw)


# The chapter's longer run (chapter 08 states where it ends): 500 steps of 16 × 128 tokens, 1 M tokens.
_TINY_TRAIN = dict(steps=500, batch_size=16, seq_len=128, lr=5e-3, warmup=30, eval_every=50, ckpt_every=125)

# The chapter's training recipes (model + data + schedule; `gemma.PRESETS` and `griffin.PRESETS` are
# the published models): about 1.5 M parameters each besides the 0.5 M of the 4096 × 128 embedding,
# trained on the same tokens (Shakespeare through a 4096-piece SentencePiece model).
RECIPES: dict[str, dict] = {
    "tiny-gemma3": {
        "model": "gemma3",
        "config": _gemma_cfg(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=64,
                             query_pre_attn_scalar=32, rope_theta=1_000_000.0, use_qk_norm=True,
                             max_position_embeddings=2048),
        "data": {"tokenizer": "spm", "vocab_size": 4096},
        "train": dict(_TINY_TRAIN),
    },
    "tiny-griffin": {
        "model": "griffin",
        "config": dict(vocab_size=4096, width=128, num_layers=6, num_heads=4, num_kv_heads=1, lru_width=128,
                       mlp_expanded_width=512, attention_window_size=64, scan="associative"),
        "data": {"tokenizer": "spm", "vocab_size": 4096},
        "train": dict(_TINY_TRAIN),
    },
}


def load_spec(name_or_path: str | dict) -> dict:
    """A run spec {"model", "config", "data", "train"} from a recipe name, a JSON file or a dict."""
    if isinstance(name_or_path, dict):
        spec = name_or_path
    elif name_or_path in RECIPES:
        spec = RECIPES[name_or_path]
    elif Path(name_or_path).is_file():
        spec = json.loads(Path(name_or_path).read_text())
    else:
        raise ValueError(f"{name_or_path!r} is neither a recipe ({', '.join(RECIPES)}) nor a JSON file")
    spec = json.loads(json.dumps(spec))  # a deep copy
    if spec.get("model") not in ("gemma3", "gemma2", "griffin"):
        raise ValueError(f"spec 'model' must be 'gemma3', 'gemma2' or 'griffin', got {spec.get('model')!r}")
    spec.setdefault("data", {"tokenizer": "spm", "vocab_size": spec["config"].get("vocab_size", 4096)})
    spec.setdefault("train", {})
    return spec


def build_model(spec: dict, seed: int = 0) -> nn.Module:
    """The model of a spec, freshly initialised from `seed` (the same on every process)."""
    torch.manual_seed(seed)
    if spec["model"] == "griffin":
        from .griffin import Griffin, GriffinConfig

        return Griffin(GriffinConfig(**spec["config"]))
    from .gemma import Gemma, GemmaConfig

    cfg = dict(spec["config"])
    cfg.setdefault("family", "gemma2" if spec["model"] == "gemma2" else "gemma3")
    return Gemma(GemmaConfig(**cfg))


def model_spec(model: nn.Module) -> dict:
    """{"model", "config"} describing an existing Gemma or Griffin (what a checkpoint records)."""
    return {"model": model.config.family, "config": dataclasses.asdict(model.config)}


class CausalLMLoss(nn.Module):
    """The model and its loss as one module (what DDP and FSDP wrap): ids (B, T + 1) -> (Σ loss, tokens).

    The head runs inside the loss, chunk by chunk (`losses.chunked_loss`), on the final hidden states;
    `model.head()` gives its weight and soft-cap (a `torch.compile`d model passes the call through).
    """

    def __init__(self, model: nn.Module, chunk: int | None = None, packed: bool = True, bos_id: int = 2):
        super().__init__()
        self.model, self.chunk, self.packed, self.bos_id = model, chunk, packed, bos_id

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = windows[:, :-1], windows[:, 1:]
        positions = data_mod.document_positions(inputs, self.bos_id) if self.packed else None
        hidden = self.model(inputs, positions=positions, return_hidden=True)  # (B, T, C)
        weight, cap = self.model.head()
        target = Labels(targets)
        return chunked_loss(hidden, weight, target, cap, self.chunk, reduction="sum"), target.count()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms, biases or gates' Λ."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step on one tensor, in place: what `torch.optim.AdamW` does to each parameter (its
    single-tensor path, the same operations in the same order: `tests/test_train.py` checks the two
    agree bit for bit). `step` is the number of this step, 1 for the first update.

        p ← p · (1 − lr · wd)                        decoupled weight decay: on the weights, not the gradient
        m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
        p ← p − lr · m̂ / (√v̂ + eps),   m̂ = m / (1 − β1^step),  v̂ = v / (1 − β2^step)

    param, exp_avg (m) and exp_avg_sq (v) are updated in place; nothing is returned.
    """
    beta1, beta2 = betas
    with torch.no_grad():  # a Parameter is updated in place too
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------
def accumulate_gradients(loss_sum_fn, micro_batches, n_total, sync=None) -> float:
    """Forward and backward over micro-batches so the gradients equal those of the whole batch.

    loss_sum_fn(mb) returns the SUM of the per-token losses of micro-batch mb; each is divided by
    n_total, the number of tokens in all the micro-batches, before its backward. The gradients
    add up in .grad, to ∇ (Σ_all losses / n_total), the mean over the whole batch, however the
    tokens are split (even unequally). `sync(last)` is a context manager that lets a distributed
    wrapper skip the all-reduce on all but the last micro-batch. Returns the batch's mean loss.
    """
    total = 0.0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (sync(last) if sync is not None else contextlib.nullcontext()):
            loss_sum = loss_sum_fn(mb)
            (loss_sum / n_total).backward()
        total += float(loss_sum.detach())
    return total / float(n_total)


# --------------------------------------------------------------------------------------------
# Distributed: one process per device (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "single"  # "single", "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(fsdp: bool = False, device: str | None = None) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPUs); one process: no group."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1 and not fsdp:
        return Dist(device=dev)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if world == 1:  # FSDP on one process still needs a group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev, "fsdp" if fsdp else "ddp")


def close_distributed() -> None:
    """Destroy the process group with nothing left holding it.

    Modules wrapped by FSDP2 keep the group alive through their device mesh; if it outlives
    `destroy_process_group`, gloo's worker threads are torn down during interpreter exit and the
    process can abort ("terminate called without an active exception", 2 runs in 30 under load).
    Callers drop their model first; the collections here free whatever cycles still hold it.
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def wrap(loss_module: CausalLMLoss, d: Dist) -> nn.Module:
    """DDP around the whole module, or FSDP2: every block sharded on its own, then the root."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in loss_module.model.layers:
            fully_shard(layer)
        fully_shard(loss_module)  # the root: embedding (= head), final norm
    return loss_module


def _sync_context(wrapped: nn.Module, d: Dist):
    """A context factory for accumulate_gradients: all-reduce only on the last micro-batch."""
    if d.mode == "ddp":
        return lambda last: contextlib.nullcontext() if last else wrapped.no_sync()
    if d.mode == "fsdp":
        @contextlib.contextmanager
        def ctx(last):
            wrapped.set_requires_gradient_sync(last)
            yield
        return ctx
    return None


def _all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per saved step, written atomically
# --------------------------------------------------------------------------------------------
def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:07d}.safetensors"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints in out_dir, oldest first (temporary files of an interrupted write are ignored)."""
    return sorted(Path(out_dir).glob("step-*.safetensors"))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint that opens and carries our format tag, or None."""
    from safetensors import safe_open

    for path in reversed(list_checkpoints(out_dir)):
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("format") == FORMAT:
                    return path
        except Exception:  # noqa: BLE001 - a damaged file: fall back to the one before
            continue
    return None


def _state(model: nn.Module, optimizer, d: Dist):
    """(model tensors, optimizer state) gathered in full (under FSDP: onto rank 0), keyed by name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=d.mode == "fsdp")
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _write_checkpoint(tensors: dict, metadata: dict, path: Path) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete

    write_atomic(path, write)


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer, step: int, spec: dict,
                    cfg: TrainConfig, history: dict, d: Dist | None = None) -> Path | None:
    """Write step-NNNNNNN.safetensors: weights, AdamW state, spec, config, history. Returns the path
    (None on processes other than rank 0, which only take part in gathering the shards)."""
    d = d or Dist()
    msd, osd = _state(model, optimizer, d)
    if not d.main:
        return None
    tensors, aliases = {}, {}
    seen = {}
    for name, t in msd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a tied weight (the LM head is the embedding): stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model.{name}"] = t.detach().cpu().contiguous()
    for name, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{name}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"format": FORMAT, "step": str(step), "spec": json.dumps(spec), "train": json.dumps(dataclasses.asdict(cfg)),
            "history": json.dumps(history), "param_groups": json.dumps(osd["param_groups"]),
            "aliases": json.dumps(aliases)}
    path = checkpoint_path(out_dir, step)
    _write_checkpoint(tensors, meta, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """{"step", "spec", "train", "history", "model": {name: tensor}, "optim": state dict} of a checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a minigemma training checkpoint (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, name in json.loads(meta["aliases"]).items():
        model[alias] = model[name]
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, key = k[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[key] = v
    return {"step": int(meta["step"]), "spec": json.loads(meta["spec"]), "train": json.loads(meta["train"]),
            "history": json.loads(meta["history"]), "model": model,
            "optim": {"state": state, "param_groups": json.loads(meta["param_groups"])}}


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, d: Dist | None = None) -> dict:
    """Load weights (and the optimizer's state) into model; returns read_checkpoint's dict."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ck = read_checkpoint(path)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ck["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, ck["optim"], options=opts)
    return ck


def load_trained(path: str | Path) -> nn.Module:
    """A model rebuilt from a training checkpoint (file or run folder: its latest checkpoint), in eval mode."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path}")
        path = found
    ck = read_checkpoint(path)
    model = build_model(ck["spec"])
    model.load_state_dict(ck["model"])
    return model.eval()


# --------------------------------------------------------------------------------------------
# Evaluation and the loop
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(loss_module: nn.Module, windows: torch.Tensor, batch: int = 16, d: Dist | None = None) -> float:
    """Mean next-token loss (nats) over validation windows (N, T + 1); this process takes rows rank::world."""
    d = d or Dist()
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0.0
    mine = windows[d.rank::d.world]
    for i in range(0, mine.shape[0], batch):
        s, n = loss_module(mine[i:i + batch].to(d.device))
        total, count = total + float(s), count + float(n)
    total, count = _all_reduce_sum([total, count], d)
    loss_module.train(was_training)
    return total / max(count, 1.0)


def new_history() -> dict:
    return {"step": [], "loss": [], "lr": [], "grad_norm": [], "tokens": [], "time": [],
            "val_step": [], "val_loss": []}


def train(model: nn.Module, train_stream: torch.Tensor, val_stream: torch.Tensor | None, cfg: TrainConfig,
          out_dir: str | Path | None = None, resume: bool = False, stop_at: int | None = None,
          spec: dict | None = None, d: Dist | None = None, progress: bool = True, callback=None,
          desc: str = "train") -> dict:
    """Train `model` on windows of `train_stream`; returns the history (per step: loss, lr, grad
    norm; per evaluation: validation loss).

    out_dir:  where checkpoints go (every cfg.ckpt_every steps and at the end); None: none.
    resume:   continue from the latest checkpoint in out_dir (weights, optimizer, history, step).
    stop_at:  stop after this many steps (the schedule still runs to cfg.steps): an interruption.
    callback: called as callback(step, model, loss) after each optimizer step (for measurements).
    d:        the distributed setting (`init_distributed`); default: one process.
    """
    d = d or Dist()
    spec = spec or model_spec(model)
    world = d.world
    if cfg.batch_size % world or (cfg.batch_size // world) % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} must split into {world} processes × "
                         f"{cfg.grad_accum} micro-batches")
    model.to(d.device)
    loss_module = CausalLMLoss(model, cfg.loss_chunk, cfg.packed, cfg.bos_id)
    wrapped = wrap(loss_module, d)
    optimizer = make_optimizer(model, cfg)
    history, start = new_history(), 0
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is a file: checkpoints need a folder")
    if resume:
        if out_dir is None:
            raise ValueError("resume needs out_dir")
        found = latest_checkpoint(out_dir)
        if found is None:  # stop before anything is written: a fresh start would rotate the old files away
            names = [p.name for p in list_checkpoints(out_dir)]
            raise FileNotFoundError(
                f"resume: no readable checkpoint in {out_dir}" + (
                    f" ({', '.join(names)} could not be read as checkpoints); nothing was changed or deleted: "
                    "move them away to start again" if names else "; to start a new run, leave out resume"))
        ck = load_checkpoint(found, model, optimizer, d)
        history, start = ck["history"], ck["step"]
    elif out_dir is not None and list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints of a run: resume it, or give a new folder "
                              "(a new run here would delete them as it rotates its own)")
    val = None if val_stream is None else data_mod.eval_windows(val_stream, cfg.seq_len, cfg.eval_windows)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    sync = _sync_context(wrapped, d)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = None
    if progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start, desc=desc, leave=True)
    wrapped.train()

    def loss_sum(mb):  # the forward under the run's precision; the backward runs outside it
        with precision_context(cfg.precision, d.device):
            return wrapped(mb)[0]

    t0 = time.perf_counter()
    for step in range(start, end):
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = data_mod.window_batch(train_stream, cfg.batch_size, cfg.seq_len, cfg.seed, step, d.rank, world)
        rows = rows.to(d.device)
        n_local = rows.shape[0] * cfg.seq_len
        micro = rows.chunk(cfg.grad_accum)
        loss = accumulate_gradients(loss_sum, micro, n_local, sync)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = _all_reduce_sum([loss], d)[0] / world  # every process holds the same number of tokens
        history["step"].append(step + 1)
        history["loss"].append(loss)
        history["lr"].append(lr)
        history["grad_norm"].append(float(grad_norm))
        history["tokens"].append((step + 1) * tokens_per_step)
        history["time"].append(time.perf_counter() - t0)
        if callback is not None:
            callback(step + 1, model, loss)
        last, final = step + 1 == end, step + 1 == cfg.steps  # (end < steps: interrupted by stop_at)
        if val is not None and (final or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            history["val_step"].append(step + 1)
            with precision_context(cfg.precision, d.device):
                history["val_loss"].append(validation_loss(wrapped, val, d=d))
        if bar is not None:
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}"}
            if history["val_loss"]:
                post["val"] = f"{history['val_loss'][-1]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if not math.isfinite(loss):
            break  # diverged: nothing more to learn from this run
        if out_dir is not None and (last or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            saved = save_checkpoint(out_dir, model, optimizer, step + 1, spec, cfg, history, d)
            if d.main:  # rotation: only this run's older checkpoints go, never the one just written
                older = [p for p in list_checkpoints(out_dir) if p.name < saved.name]
                for old in older[:max(0, len(older) - (cfg.keep_checkpoints - 1))]:
                    old.unlink(missing_ok=True)
    if bar is not None:
        bar.close()
    if out_dir is not None and d.main:
        write_atomic(Path(out_dir) / "history.json", json.dumps(history))
    return history


# --------------------------------------------------------------------------------------------
# Data for a spec, and the command line
# --------------------------------------------------------------------------------------------
def spec_data(spec: dict):
    """(train ids, validation ids, tokenizer) for a spec's "data" section: the Shakespeare split,
    through a SentencePiece model trained on it ("spm", vocab_size) or Gemma 3's ("gemma3")."""
    kind = spec["data"].get("tokenizer", "spm")
    if kind == "gemma3":
        from .tokenizer import Tokenizer

        return data_mod.tokenized_corpus(Tokenizer.from_pretrained("gemma3-270m"))
    if kind != "spm":
        raise ValueError(f"data.tokenizer must be 'spm' or 'gemma3', got {kind!r}")
    return data_mod.tokenized_corpus(vocab_size=spec["data"].get("vocab_size", 4096))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigemma train",
                                 description="Train a model on the Shakespeare corpus (also under torchrun).")
    ap.add_argument("config", help=f"a recipe ({', '.join(RECIPES)}) or a JSON spec file")
    ap.add_argument("--steps", type=int, default=None, help="schedule length (default: the spec's, else 2000)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints and history.json")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step (the schedule keeps --steps)")
    for name in ("batch_size", "seq_len", "grad_accum", "warmup", "eval_every", "ckpt_every", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="float32 (default) or bf16-mixed (matrix products in bfloat16 under autocast)")
    ap.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state (FSDP2)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = load_spec(args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_kw = dict(spec["train"])
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "warmup", "eval_every", "ckpt_every", "seed", "lr",
                 "precision"):
        if getattr(args, name) is not None:
            train_kw[name] = getattr(args, name)
    try:
        cfg = TrainConfig(**train_kw)
    except ValueError as e:  # a bad --steps, --batch-size, ...: said before any data is read
        ap.error(str(e))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file: give a folder for the checkpoints")
    if args.resume and latest_checkpoint(args.out) is None:
        names = [p.name for p in list_checkpoints(args.out)] if Path(args.out).is_dir() else []
        ap.error(f"--resume: no readable checkpoint in {args.out}" + (
            f" ({', '.join(names)} could not be read); nothing was changed or deleted" if names else
            "; leave out --resume to start a new run"))
    if not args.resume and Path(args.out).is_dir() and list_checkpoints(args.out):
        ap.error(f"{args.out} already holds checkpoints: add --resume to continue that run, or give a new --out")
    d = init_distributed(args.fsdp, args.device)
    if d.main:
        train_ids, val_ids, _ = spec_data(spec)
    if d.world > 1:  # rank 0 prepares (and caches) the data first; the others then read the cache
        import torch.distributed as dist

        dist.barrier()
    if not d.main:
        train_ids, val_ids, _ = spec_data(spec)
    model = build_model(spec, cfg.seed)
    history = train(model, train_ids, val_ids, cfg, out_dir=args.out, resume=args.resume, stop_at=args.stop_at,
                    spec=spec, d=d, progress=not args.quiet)
    if d.main:
        msg = f"step {history['step'][-1] if history['step'] else 0}: train loss {history['loss'][-1]:.4f}" \
            if history["loss"] else "nothing to do"
        if history["val_loss"]:
            msg += f", val loss {history['val_loss'][-1]:.4f} (perplexity {math.exp(history['val_loss'][-1]):.1f})"
        print(f"{msg}; checkpoints in {args.out}")
    if d.world > 1 or d.mode == "fsdp":
        del model  # FSDP's mesh holds the group: free it while the interpreter is whole (see close_distributed)
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# A diagnostic for the stability ablations (chapter 08)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def max_attention_logits(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """The largest |q · k| · scale of each attention layer on a batch (B, T): the attention logits
    before any soft-cap, which QK-norm keeps bounded and which grow without it at a high learning
    rate. Uses a forward hook on each layer's `self_attn` (it receives (x, pos, cache)) and the
    layer's own `project`, so the model itself is untouched."""
    from .attention import GroupedQueryAttention, repeat_kv

    found: list[float] = []

    def hook(module, args, kwargs, output):
        x, pos = args[0], args[1]
        q, k, _ = module.project(x, pos)
        k = repeat_kv(k, module.n_heads // module.n_kv_heads)
        scores = (q.float() @ k.float().transpose(-2, -1)) * module.scale  # (B, H, T, T)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        found.append(float(scores.abs().masked_fill(~causal, 0).amax()))

    attn = [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attn]
    try:
        was = model.training
        model.eval()
        model(ids)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return found
