"""The embedding training loop, a recipe: setup -> resume -> train (validate, save) -> summary.

Receives an Accelerator; never creates one. What a checkpoint restores is a
:class:`TrainState`; when to stop is one :class:`Budget`; :func:`resume`,
:func:`save_checkpoint` and :func:`validate` take everything they touch as arguments.

One step, on every rank::

    uint8 (B, C, h, w) --to_model_input--> (B, C, S, S) --model--> (B, 128) unit vectors
      --gather all ranks--> (W·B, 128) --semi-hard mining (or a PML loss)--> loss (×W, see objectives.py)

Rank 0 alone validates (kNN), saves the best embedder and logs; the others wait for it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from toolkit.artifacts import CHECKPOINTS_DIR, EMBEDDER_FILE, EmbedderArtifact, run_outputs_in
from toolkit.checkpoint import CheckpointManager, capture_rng, restore_rng
from toolkit.files import atomic_torch_save, safe_load
from toolkit.config import LOWER_IS_BETTER, EmbedConfig
from toolkit.errors import CheckpointError, ConfigError, NonFiniteLossError
from toolkit.data.shards import ShardInfo, read_info
from toolkit.distributed import (all_gather_object, any_rank, buffers_from_main, float_from_main, from_main, state_from_main,
                                 waiting_group)
from toolkit.data.batching import PK_MAX_FIELDS
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import random_affine, to_model_input
from toolkit.evaluation import embed_split, gather_to_main, sharded_val_metrics, split_retrieval, split_roles, warn_missing
from toolkit.objectives import build_objective
from toolkit.models import build_embedder
from toolkit.progress import progress


def build_scheduler(optimizer, *, schedule: str, warmup_steps: int, total_steps: int, time_spent=None):
    """Linear warm-up, then constant or cosine decay to 0 over the budget.

    The cosine runs over the steps after warm-up; with ``time_spent`` (a callable giving the
    fraction of a wall-clock budget used, 0..1) it follows whichever of the two is further
    along, so a run stopped by the clock has annealed to 0 when it stops.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule != "cosine":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps) if total_steps > warmup_steps else 0.0
        if time_spent is not None:
            t = max(t, time_spent())
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(
    model, optimizer, scheduler, accelerator, images: torch.Tensor, labels: torch.Tensor, *,
    objective, input_size: int, grad_clip: float = 0.0, augment: bool = False, channels_last: bool = False, on_nonfinite: str = "stop",
) -> dict | None:
    """One optimisation step on this rank's batch; the loss covers every rank's embeddings.

    ``images``: uint8 (B, C, h, w) from the loader; ``labels``: (B,); ``objective``: from
    :func:`~toolkit.objectives.build_objective` (its parameters, if any, in ``optimizer``). Returns the loss stats,
    or None when the loss was non-finite and ``on_nonfinite="skip"`` (no update made).
    """
    device = accelerator.device
    x = to_model_input(images.to(device, non_blocking=True), input_size=input_size, channels_last=channels_last)
    if augment:
        x = random_affine(x)
    labels = labels.to(device, non_blocking=True)
    with accelerator.autocast():
        emb = model(x)  # (B, D) unit vectors
    loss, stats = objective(emb.float(), labels)
    # The global-batch loss is the same number on every rank, so all ranks take the same
    # branch here without talking (no rank is left waiting in backward).
    if not math.isfinite(stats["loss"]):
        if on_nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite loss ({stats['loss']}): stopped before the update")
        optimizer.zero_grad(set_to_none=True)
        return None
    accelerator.backward(loss)
    objective.sync_grads()  # a loss's own parameters (proxies): the same gradient on every rank
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def make_objective(cfg: EmbedConfig, *, num_classes: int, device) -> torch.nn.Module:
    """The config's loss on ``device`` (toolkit/objectives.py), with any parameters of its own
    (a proxy-based loss's proxies) rank 0's on every rank: they are outside DDP."""
    try:
        objective = build_objective(
            loss=cfg.loss, loss_kwargs=cfg.loss_kwargs, miner=cfg.miner, miner_kwargs=cfg.miner_kwargs, margin=cfg.margin,
            mining=cfg.mining, squared=cfg.squared, num_classes=num_classes, embedding_dim=cfg.embedding_dim,
        ).to(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    state_from_main(objective)
    return objective


def total_skips(stream: ShardStream, accelerator) -> dict[str, int]:
    """Samples ``stream`` skipped since its loader started, by kind, summed over loader workers
    and ranks. A collective: every rank calls it at the same point (after each epoch's loader)."""
    counts = stream.skip_counts()
    total = accelerator.reduce(torch.tensor(list(counts.values()), dtype=torch.int64, device=accelerator.device), reduction="sum")
    return dict(zip(counts, total.tolist()))


def total_pk_stats(stream: ShardStream, accelerator) -> dict[str, int]:
    """What the P×K batchers did since the loader started, over loader workers and ranks (a
    collective, like :func:`total_skips`): counts summed; ``peak_buffered``, ``bound`` and
    ``passes`` the largest of any loader slot. Empty for random batches."""
    if stream.batching != "pk":
        return {}
    counts = stream.pk_stats()
    rows = accelerator.gather(torch.tensor([list(counts.values())], dtype=torch.int64, device=accelerator.device)).cpu()
    return {name: int(rows[:, j].max() if name in PK_MAX_FIELDS else rows[:, j].sum()) for j, name in enumerate(counts)}


def report_pk_stats(epoch: int, step: int, pk: dict[str, int], totals: dict[str, int], *, tracker) -> None:
    """One metrics record per epoch of what the P×K batchers deferred, padded and buffered; ``totals`` accumulates."""
    if not pk:
        return
    for name in ("received", "emitted", "padded", "deferred", "duplicates"):
        totals[name] = totals.get(name, 0) + pk[name]
    for name in PK_MAX_FIELDS:
        totals[name] = max(totals.get(name, 0), pk[name])
    tracker.log({f"data/pk_{name}": pk[name] for name in ("deferred", "padded", "peak_buffered", "passes")}
                | {"data/pk_bound": pk["bound"], "epoch": epoch}, step=step)


def report_skips(epoch: int, step: int, skips: dict[str, int], totals: dict[str, int], *, accelerator, tracker) -> None:
    """One line (rank 0) and one metrics record for an epoch that skipped data; ``totals`` accumulates."""
    for kind, n in skips.items():
        totals[kind] = totals.get(kind, 0) + n
    if not any(skips.values()):
        return
    detail = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in skips.items() if n)
    accelerator.print(f"warning: epoch {epoch}: skipped {sum(skips.values())} training samples over all ranks ({detail}); "
                      "the warnings above name the shards")
    tracker.log({f"data/skipped_{kind}": n for kind, n in skips.items()} | {"epoch": epoch}, step=step)


def refuse_existing_message(run_dir, found=(CHECKPOINTS_DIR,)) -> str:
    return (f"{run_dir} already holds a run ({', '.join(found)}): pass resume=true to continue or overwrite=true to "
            "start over (the previous run moves to a previous-* folder)")


def check_run_dir(cfg: EmbedConfig) -> None:
    """Refuse, before anything is written, to start afresh in a run folder holding an earlier run.

    ``overwrite=true`` moves the previous run aside first (toolkit/rundir.py), so it cannot
    go with ``resume=true``: that would resume nothing.
    """
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true continues the run in run_dir, overwrite=true starts over there: pass one of them")
    found = run_outputs_in(cfg.run_dir)  # not only checkpoints: a run killed before its first one left metrics
    if not cfg.resume and not cfg.overwrite and found:
        raise ConfigError(refuse_existing_message(cfg.run_dir, found))


def check_select_by(cfg: EmbedConfig, info: ShardInfo) -> None:
    """A test/ metric can choose the best embedder only when the shards have a test split."""
    if cfg.select_by.startswith("test/") and "test" not in info.splits:
        raise ConfigError(f"select_by={cfg.select_by} needs a test split of held-out classes in {cfg.shards} "
                          "(toolkit shard --holdout_classes ...)")


@dataclass
class TrainState:
    """Where a run is, besides weights and optimiser: what a checkpoint restores."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # full epochs done
    epoch_step: int = 0  # batches of the current epoch consumed (a mid-epoch resume replays up to here)
    best: float = -math.inf  # best value of select_by so far (negated when lower is better)
    best_map: float = -1.0  # its val MAP@R (breaks ties: accuracy often saturates on easy data)
    best_knn: float = -1.0  # val kNN accuracy of the saved best embedder
    seconds: float = 0.0  # wall-clock seconds of training so far (a time budget continues from here)
    # Where the last checkpoint written stands: a state already on disk is not saved again,
    # but one that moved since (a validation raised `best`, a batch was skipped) is. The
    # clock alone moving is not a new state.
    saved: dict | None = field(default=None, repr=False, compare=False)
    # Resumed: the metrics.jsonl records the checkpoint was written after (None: not recorded).
    metrics_records: int | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("saved", "metrics_records")}

    def position(self) -> dict:
        """:meth:`state_dict` without the clock: what decides whether a checkpoint is new."""
        return {k: v for k, v in self.state_dict().items() if k != "seconds"}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
        self.best, self.best_map = float(state["best"]), float(state.get("best_map", -1.0))
        self.best_knn = float(state.get("best_knn", self.best))
        self.seconds = float(state.get("seconds", 0.0))
        self.saved = self.position()


@dataclass
class Budget:
    """When to stop: whichever of steps, epochs and wall-clock minutes of training runs out first.

    The clock is rank 0's, read at every :meth:`spent` and shared with the other ranks, so
    all stop at the same step and a time-following schedule gives every rank the same rate.
    It counts training (validations included, setup not) across resumes.
    """

    total_steps: int  # 0: no step limit (a max_minutes-only run)
    epochs: int = 0  # 0: no epoch limit
    seconds: float = 0.0  # 0: no time limit
    elapsed: float = 0.0  # seconds of training so far (rank 0's clock, as of the last spent())
    _t0: float = field(default=0.0, repr=False)

    @classmethod
    def from_config(cls, cfg: EmbedConfig, steps_per_epoch: int) -> "Budget":
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        if cfg.epochs and cfg.max_steps:
            total = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
        return cls(total, cfg.epochs, 60.0 * cfg.max_minutes)

    def start(self, already: float = 0.0) -> None:
        """Start (or, resuming, continue) the clock with ``already`` seconds of earlier training."""
        self._t0, self.elapsed = time.monotonic() - already, already

    def tick(self, device) -> float:
        """Read rank 0's clock into :attr:`elapsed` on every rank (a collective) and return it."""
        self.elapsed = float_from_main(time.monotonic() - self._t0, device)
        return self.elapsed

    def spent(self, state: TrainState, device) -> bool:
        """The one stopping test. A collective when there is a time limit: every rank calls it
        at the same points, and all get the same answer."""
        if self.seconds:
            self.tick(device)
        out_of_time = bool(self.seconds) and self.elapsed >= self.seconds
        out_of_steps = bool(self.total_steps) and state.step >= self.total_steps
        return out_of_steps or bool(self.epochs and state.epoch >= self.epochs) or out_of_time

    def time_spent(self) -> float:
        """The fraction of the time limit used, 0..1 (0 without one)."""
        return min(1.0, self.elapsed / self.seconds) if self.seconds else 0.0


# Config keys a resumed run may change: budgets and bookkeeping. Any other difference from the
# checkpoint's config (data, model, loss, optimiser, batching, workers, seed, precision,
# selection) would make the continued run a different one, so resume refuses it.
RESUME_MAY_CHANGE = frozenset({
    "epochs", "max_steps", "max_minutes", "val_every", "ckpt_every", "keep_last", "resume", "overwrite", "run_dir",
    "shards", "tracker", "project", "name", "log_every", "collective_timeout_s", "progress", "eval_batch_size",
    "strict_data", "on_nonfinite", "validation_timeout_s", "read_timeout_s",
})


def resume_mismatch(saved: dict, cfg: EmbedConfig, world: int) -> str:
    """Why ``saved`` cannot continue as this run ('' when it can): world size, then config keys."""
    step = saved.get("step")
    rngs = saved.get("rng")
    written_by = len(rngs) if isinstance(rngs, list) else None
    if written_by is not None and written_by != world:
        return (f"the checkpoint of step {step} was written by {written_by} processes, this run has {world}: resume "
                f"with num_processes={written_by} (each rank's data share and random state depend on it)")
    old = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    now = asdict(cfg)
    changed = [k for k in now if k in old and k not in RESUME_MAY_CHANGE and old[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k} {old[k]!r} -> {now[k]!r}" for k in changed[:6]) + (" ..." if len(changed) > 6 else "")
        return (f"the checkpoint of step {step} was trained with a different config ({detail}): resume with the "
                f"run's own (--config RUN/config.yaml), or start over with overwrite=true")
    return ""


def best_saved(run_dir: Path, select_by: str) -> tuple[float, float, float] | None:
    """(score, MAP@R, kNN accuracy) of the run's best_embedder.pt by ``select_by``; None when absent or unreadable."""
    from toolkit.artifacts import load_artifact

    path = run_dir / EMBEDDER_FILE
    if not path.is_file():
        return None
    try:
        saved = load_artifact(path)
    except Exception:  # noqa: BLE001 - an unreadable file is replaced at the next validation, as before
        return None
    if not isinstance(saved, EmbedderArtifact):
        return None
    m = saved.metrics
    return selection_score(m, select_by), float(m.get("val/map_at_r", -1.0)), float(m.get("val/knn_accuracy", -1.0))


def resume(ckpts: CheckpointManager, state: TrainState, *, model, optimizer, scheduler, accelerator, cfg: EmbedConfig,
           objective=None) -> bool:
    """Continue from the checkpoint rank 0 picks (its newest loadable one), on every rank; False when there is none.

    Rank 0 decides the step and broadcasts it; every rank loads that step's file (a rank
    whose run folder lacks it, on machines with local folders, cannot silently take another),
    and checks the world size and the config against the run's. Any rank's problem stops every
    rank with the same line. A best_embedder.pt saved after the checkpoint (a kill between the
    two writes) keeps its score as the best, so the resumed run never replaces it with a worse one.
    """
    rank, world, device, main = accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.is_main_process
    saved = ckpts.load_latest() if main else None
    step = int(from_main(-1 if saved is None else int(saved.get("step", -1)), device))
    if step < 0:
        return False
    problem = ""
    if not main:
        path = ckpts.directory / ckpts.filename(step)
        try:
            saved = safe_load(path)
        except CheckpointError as exc:
            problem = (f"cannot load the checkpoint of step {step} that rank 0 resumes from: {exc}; every rank needs "
                       "it (a run_dir shared by the machines, or a copy of it on each)")
    if not problem:
        problem = resume_mismatch(saved, cfg, world)
    for r, p in enumerate(all_gather_object(problem)):
        if p:
            raise ConfigError(f"resume=true: rank {r}: {p}")
    model.load_state_dict(saved["model"])
    if objective is not None:
        load_objective(objective, saved.get("objective"), step)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    state.load_state_dict(saved)
    records = saved.get("metrics_records")
    state.metrics_records = records if isinstance(records, int) and not isinstance(records, bool) else None
    best = best_saved(Path(cfg.run_dir), cfg.select_by) if main else None
    if best is not None and (best[0], best[1]) > (state.best, state.best_map):
        state.best, state.best_map, state.best_knn = best
    state.best, state.best_map, state.best_knn = from_main((state.best, state.best_map, state.best_knn), device)
    restore_rng(saved["rng"][rank])
    return True


def load_objective(objective: torch.nn.Module, saved, step: int) -> None:
    """A checkpoint's loss parameters (proxies) into ``objective``; one line when they do not fit."""
    try:
        objective.load_state_dict(saved if isinstance(saved, dict) else {})
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"the checkpoint of step {step} holds other loss parameters than loss={type(objective).__name__} "
                              f"here ({first[-1].strip() if first else exc}): the number of classes or the loss changed") from None


def save_checkpoint(ckpts: CheckpointManager, state: TrainState, *, model, optimizer, scheduler, accelerator,
                    config: dict, metrics_records: int = 0, objective=None) -> None:
    """A complete checkpoint of ``state.step`` (rank 0 writes; every rank's RNG goes in). A collective."""
    if state.saved == state.position():
        return  # exactly this state is on disk already (the same on every rank: no rank skips alone)
    rngs = all_gather_object(capture_rng())  # every rank's RNG, so each resumes its own streams
    if accelerator.is_main_process:
        ckpts.save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "objective": objective.state_dict() if objective is not None else {},  # a loss's proxies
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rngs, **state.state_dict(), "config": config,
                "metrics_records": int(metrics_records),  # metrics.jsonl records so far: a resume keeps these
            },
            state.step,
        )
    state.saved = state.position()
    accelerator.wait_for_everyone()


def selection_score(metrics: dict, select_by: str) -> float:
    """``metrics[select_by]`` as a higher-is-better score (-inf when it could not be computed)."""
    value = float(metrics.get(select_by, math.nan))
    if math.isnan(value):
        return -math.inf
    return -value if select_by in LOWER_IS_BETTER else value


def best_value(state: TrainState, select_by: str) -> float:
    """The best ``select_by`` so far, as the metric reads (``state.best`` is negated when lower is better)."""
    return -state.best if select_by in LOWER_IS_BETTER else state.best


def validate(model, state: TrainState, *, cfg: EmbedConfig, info: ShardInfo, accelerator, tracker, wait=None) -> dict:
    """Every rank embeds its share of train, val (and test); the scoring is sharded; rank 0 keeps the best, logs.

    val/: kNN accuracy and ranking metrics of the val queries against the train split, from
    :func:`~toolkit.evaluation.sharded_val_metrics` (each rank searches the train references
    it embedded; rank 0 merges the candidates). test/ (when the shards hold a split of
    held-out classes): open-set retrieval inside it, query vs gallery, on rank 0. The best
    embedder (by ``select_by``, val MAP@R breaking ties) is saved with the "unknown" distance
    calibrated on val and, with ``save_index`` (the default), the train embeddings as its kNN
    index: the one time they are gathered on rank 0. Returns the metrics on rank 0 (``{}``
    elsewhere); ``state.best`` moves when it improves. ``wait`` (:func:`~toolkit.distributed.waiting_group`):
    the group the other ranks wait in while rank 0 scores the test split and saves the best
    embedder, with ``validation_timeout_s`` instead of the lockstep collective timeout.
    """
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    buffers_from_main(model)  # every share embedded by the model rank 0 saves (its BatchNorm statistics)
    local = {}
    for split in ("train", "val", "test") if "test" in info.splits else ("train", "val"):
        local[split] = embed_split(
            model, shards=cfg.shards, split=split, rank=rank, world_size=world, device=accelerator.device,
            input_size=cfg.input_size, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
            autocast=accelerator.autocast, channels_last=cfg.channels_last, sort_by_key=True,
        )
    # val against train, sharded: the train embeddings stay on their ranks, candidates travel
    scored = sharded_val_metrics(local["train"], local["val"], k=cfg.knn_k, unknown_fmr=cfg.unknown_fmr)
    # the held-out test split (open-set retrieval inside it, pair metrics) is scored on rank 0
    test = gather_to_main(*local["test"]) if "test" in local else None
    metrics: dict = {}
    improved = False
    if main:
        found, unknown, counts = scored
        for split, n in counts.items():
            warn_missing([range(n)], expected=info.splits[split].num_samples, split=split, print_fn=accelerator.print)
        metrics = {f"val/{k}": v for k, v in found.items()}
        if test is not None:
            warn_missing(test, expected=info.splits["test"].num_samples, split="test", print_fn=accelerator.print)
            if len(test[0]):
                keys, emb, labels = test
                metrics.update({f"test/{k}": v for k, v in split_retrieval(emb, labels, *split_roles(info, "test", keys)).metrics.items()})
        metrics["epoch"] = state.epoch
        score = selection_score(metrics, cfg.select_by)
        improved = (score, metrics["val/map_at_r"]) > (state.best, state.best_map)
        if improved:
            state.best, state.best_map, state.best_knn = score, metrics["val/map_at_r"], metrics["val/knn_accuracy"]
    # the saved kNN index is the one place the whole train split meets on rank 0 (save_index)
    improved = bool(from_main(improved, accelerator.device, group=wait))  # the others waited for rank 0's test scoring
    train = gather_to_main(*local["train"]) if improved and cfg.save_index else None
    if main:
        if improved:
            index = None if train is None else (train[1], train[2])
            saved = EmbedderArtifact.from_model(model, config=asdict(cfg), classes=info.classes, metrics=metrics,
                                                step=state.step, index=index, unknown=unknown)
            atomic_torch_save(saved.to_payload(), Path(cfg.run_dir) / EMBEDDER_FILE)
        metrics["val/best_knn_accuracy"] = state.best_knn
        metrics[f"best/{cfg.select_by}"] = best_value(state, cfg.select_by)
        tracker.log(metrics, step=state.step)
        shown = ("val/knn_accuracy", "val/precision_at_1", "val/map_at_r", "test/recall_at_1")  # printed anyway
        chosen = "" if cfg.select_by in shown else f", {cfg.select_by} {metrics.get(cfg.select_by, math.nan):.4f}"
        unseen = f", unseen classes R@1 {metrics['test/recall_at_1']:.4f}" if "test/recall_at_1" in metrics else ""
        accelerator.print(
            f"step {state.step} epoch {state.epoch}: kNN@{cfg.knn_k} val acc {metrics['val/knn_accuracy']:.4f} "
            f"(best {state.best_knn:.4f}{', saved' if improved else ''}), P@1 {metrics['val/precision_at_1']:.4f}, "
            f"MAP@R {metrics['val/map_at_r']:.4f}{unseen}{chosen}"
        )
    # Every rank keeps the same TrainState (save_checkpoint decides on it alike); the broadcast
    # is also the barrier that holds the others while rank 0 scores.
    state.best, state.best_map, state.best_knn = from_main((state.best, state.best_map, state.best_knn), accelerator.device,
                                                           group=wait)
    return metrics


def fit(cfg: EmbedConfig, accelerator, tracker) -> dict:
    """Train an embedder per ``cfg``: setup -> resume -> train (validate, save) -> summary."""
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    info = read_info(cfg.shards, read_timeout_s=cfg.read_timeout_s)
    check_select_by(cfg, info)
    in_channels = 1 if info.grayscale else 3

    # --- setup: data, model, optimiser ------------------------------------------------------
    stream = ShardStream(
        cfg.shards, split="train", mode="train", rank=accelerator.process_index, world_size=world,
        batch_size=cfg.batch_size, P=cfg.P, K=cfg.K, batching=cfg.batching, shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed, strict=cfg.strict_data,  # unreadable samples / truncated shards: skip with a warning, or stop
        read_timeout_s=cfg.read_timeout_s,  # a stalled pipe:/http shard: one line, not a hang
    )
    steps_per_epoch = stream.steps_per_epoch()
    budget = Budget.from_config(cfg, steps_per_epoch)
    model = build_embedder(arch=cfg.arch, in_channels=in_channels, input_size=cfg.input_size, embedding_dim=cfg.embedding_dim,
                           pretrained=cfg.pretrained)  # timm: archs (a resume then loads its checkpoint over them)
    if cfg.sync_bn and device.type == "cpu":
        raise ConfigError("sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU")
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = make_objective(cfg, num_classes=len(info.classes), device=device)
    groups = [{"params": list(model.parameters())}]
    if list(objective.parameters()):  # a proxy-based loss: its parameters train with the model
        groups.append({"params": list(objective.parameters()), "lr": cfg.loss_lr or cfg.lr})
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # With max_minutes the cosine decay follows the clock too: it reaches 0 when the budget
    # ends, whichever of steps and time ends it (a slower machine still anneals fully).
    scheduler = build_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                                total_steps=budget.total_steps, time_spent=budget.time_spent if cfg.max_minutes else None)
    # The loader is NOT prepared: it is split by rank already (see toolkit.data.stream.make_loader).
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)
    if cfg.compile:
        # Compiled last, on the DDP-wrapped model, as Accelerate's dynamo_backend does (DDP's
        # bucketed all-reduce then overlaps the compiled backward). Not through dynamo_backend:
        # its unwrap_model keeps the compiled wrapper ("_orig_mod." weight names in checkpoints)
        # and it would compile whatever the Accelerator prepares. `bare` stays eager (validation).
        model = torch.compile(model)

    wait = waiting_group(cfg.validation_timeout_s)  # for rank 0's part of each validation (a collective)

    # --- resume, or refuse to start over an earlier run -------------------------------------
    ckpts = CheckpointManager(run_dir / CHECKPOINTS_DIR, keep_last=cfg.keep_last)
    state = TrainState()
    if cfg.resume and resume(ckpts, state, model=bare, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=cfg,
                             objective=objective):
        tracker.rewind(state.step, state.metrics_records)  # metrics.jsonl: what was logged after the checkpoint goes
        accelerator.print(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.epoch_step}) in {run_dir}")
    elif cfg.resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR}, starting fresh")
    elif any_rank(main and not cfg.overwrite and ckpts.latest() is not None, device):
        # Decided on rank 0 (the one that writes) and agreed, so every rank stops cleanly.
        raise ConfigError(refuse_existing_message(run_dir))

    def save() -> None:  # a collective (save_checkpoint): every rank calls it at the same points
        state.seconds = budget.tick(device)  # validations included
        save_checkpoint(ckpts, state, model=bare, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                        config=asdict(cfg), metrics_records=tracker.records, objective=objective)

    # --- train: epochs of exactly steps_per_epoch batches on every rank -----------------------
    start = time.time()
    budget.start(state.seconds)
    bar = progress(total=budget.total_steps or None, initial=state.step, desc="embed", enabled=main and cfg.progress, unit="step")
    images_seen, t_log, skipped_steps = 0, time.time(), 0
    skipped_data: dict[str, int] = {}  # samples skipped by the training stream, whole run (summary.json)
    pk_data: dict[str, int] = {}  # what the P×K batchers deferred, padded, buffered: whole run (summary.json)
    stop = budget.spent(state, device)
    model.train()
    while not stop:
        for i, (_, images, labels) in enumerate(make_loader(stream, num_workers=cfg.num_workers, epoch=state.epoch)):
            if i < state.epoch_step:
                continue  # resuming mid-epoch: replay the data order up to the saved batch
            try:
                stats = train_step(
                    model, optimizer, scheduler, accelerator, images, labels, objective=objective,
                    input_size=cfg.input_size, grad_clip=cfg.grad_clip, augment=cfg.augment, channels_last=cfg.channels_last, on_nonfinite=cfg.on_nonfinite,
                )
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"{exc} at step {state.step + 1}; last good checkpoint: {ckpts.latest() or 'none yet'} "
                    "(on_nonfinite=skip skips such steps instead)"
                ) from None
            state.epoch_step += 1  # the batch is consumed, whether or not it updated the weights
            if stats is None:  # non-finite loss, on_nonfinite=skip: nothing was updated
                skipped_steps += 1
                accelerator.print(f"warning: non-finite loss at step {state.step + 1}, step skipped ({skipped_steps} so far)")
                continue
            state.step += 1
            images_seen += images.shape[0] * world
            bar.update(1)
            if state.step % cfg.log_every == 0:
                dt = max(1e-9, time.time() - t_log)
                logs = {
                    "train/loss": float(stats["loss"]), "train/lr": scheduler.get_last_lr()[0],
                    "train/images_per_s": images_seen / dt, "epoch": state.epoch,
                }
                shown = {"loss": f"{logs['train/loss']:.4f}"}
                if "active_fraction" in stats:  # the triplet loss's share of terms still inside the margin
                    logs["train/active_fraction"] = float(stats["active_fraction"])
                    shown["active"] = f"{logs['train/active_fraction']:.2f}"
                tracker.log(logs, step=state.step)
                bar.set_postfix(**shown)
                images_seen, t_log = 0, time.time()
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
                save()
            if budget.spent(state, device):
                break
        report_skips(state.epoch, state.step, total_skips(stream, accelerator), skipped_data, accelerator=accelerator, tracker=tracker)
        report_pk_stats(state.epoch, state.step, total_pk_stats(stream, accelerator), pk_data, tracker=tracker)
        epoch_done = state.epoch_step >= steps_per_epoch
        if epoch_done:
            state.epoch, state.epoch_step = state.epoch + 1, 0
        stop = budget.spent(state, device)
        # Validate every val_every epochs and whenever the run stops (mid-epoch too); without
        # ckpt_every a checkpoint goes with each validation, and the last step is always saved.
        if stop or (epoch_done and state.epoch % cfg.val_every == 0):
            validate(bare, state, cfg=cfg, info=info, accelerator=accelerator, tracker=tracker, wait=wait)
            if stop or not cfg.ckpt_every:
                save()
    bar.close()
    save()  # a run that had nothing left to do (resumed at its end) still leaves its checkpoint
    summary = {
        "best_knn_accuracy": state.best_knn, "steps": state.step, "epochs": state.epoch,
        f"best/{cfg.select_by}": best_value(state, cfg.select_by),
        "minutes": (time.time() - start) / 60, "skipped_samples": skipped_data,
        "pk_batches": pk_data,
    }
    if main:
        tracker.summary(summary)
    return summary
