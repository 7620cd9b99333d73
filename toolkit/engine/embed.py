"""The embedding training loop. Receives an Accelerator; never creates one.

One step, on every rank::

    uint8 (B, C, h, w) --to_model_input--> (B, C, S, S) --model--> (B, 128) unit vectors
      --gather all ranks--> (W·B, 128) --semi-hard mining--> loss (×W, see losses.py)

Rank 0 alone validates (kNN), saves the best embedder and logs; the others wait for it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from toolkit.checkpoint import CheckpointManager, atomic_torch_save, capture_rng, restore_rng
from toolkit.config import ConfigError, EmbedConfig
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import random_affine, to_model_input
from toolkit.engine.validate import embed_split, evaluate_embeddings, gather_to_main, warn_missing
from toolkit.losses import distributed_triplet_loss
from toolkit.models import build_embedder
from toolkit.tracking import progress


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the weights were not updated with it."""


def resolve_precision(precision: str, *, cpu: bool) -> str:
    """Map the config's precision to Accelerate's ``mixed_precision``.

    ``auto``: bf16 on GPUs that support it, fp16 (with a grad scaler) on older GPUs, and fp32
    on CPU -- CPU bf16 autocast was measured 5-8× *slower* on CPUs without bf16 units.
    """
    if precision == "auto":
        if cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def build_scheduler(optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 0 over ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine" and total_steps > warmup_steps:
            t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _agree(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def embedder_payload(model, cfg: EmbedConfig, classes, metrics: dict, step: int, index=None) -> dict:
    """What a saved embedder holds: enough to evaluate and predict without the run."""
    payload = {
        "kind": "embedder",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(cfg),
        "classes": list(classes),
        "metrics": dict(metrics),
        "step": int(step),
    }
    if index is not None:  # train embeddings + labels: kNN prediction without re-embedding
        payload["index"] = {"embeddings": index[0].half(), "labels": index[1].to(torch.int32)}
    return payload


def train_step(
    model, optimizer, scheduler, accelerator, images: torch.Tensor, labels: torch.Tensor, *,
    input_size: int, margin: float = 0.2, mining: str = "semihard", squared: bool = False,
    grad_clip: float = 0.0, augment: bool = False, channels_last: bool = False, on_nonfinite: str = "stop",
) -> dict | None:
    """One optimisation step on this rank's batch; mining runs over every rank's embeddings.

    ``images``: uint8 (B, C, h, w) from the loader; ``labels``: (B,). Returns the loss stats,
    or None when the loss was non-finite and ``on_nonfinite="skip"`` (no update made).
    """
    device = accelerator.device
    x = to_model_input(images.to(device, non_blocking=True), input_size=input_size, channels_last=channels_last)
    if augment:
        x = random_affine(x)
    labels = labels.to(device, non_blocking=True)
    with accelerator.autocast():
        emb = model(x)  # (B, D) unit vectors
    loss, stats = distributed_triplet_loss(emb.float(), labels, margin=margin, strategy=mining, squared=squared)
    # The global-batch loss is the same number on every rank, so all ranks take the same
    # branch here without talking (no rank is left waiting in backward).
    if not math.isfinite(stats["loss"]):
        if on_nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite loss ({stats['loss']}): stopped before the update")
        optimizer.zero_grad(set_to_none=True)
        return None
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def total_skips(stream: ShardStream, accelerator) -> dict[str, int]:
    """Samples ``stream`` skipped since its loader started, by kind, summed over loader workers
    and ranks. A collective: every rank calls it at the same point (after each epoch's loader)."""
    counts = stream.skip_counts()
    total = accelerator.reduce(torch.tensor(list(counts.values()), dtype=torch.int64, device=accelerator.device), reduction="sum")
    return dict(zip(counts, total.tolist()))


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


def refuse_existing_message(run_dir) -> str:
    return f"{run_dir} already holds checkpoints: pass resume=true to continue or overwrite=true to start over"


def check_run_dir(cfg: EmbedConfig) -> None:
    """Refuse, before anything is written, to start afresh in a run folder with checkpoints.

    ``overwrite=true`` moves the previous run aside first (toolkit/rundir.py), so it cannot
    go with ``resume=true``: that would resume nothing.
    """
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true continues the run in run_dir, overwrite=true starts over there: pass one of them")
    if not cfg.resume and not cfg.overwrite and any((Path(cfg.run_dir) / "checkpoints").glob("step-*.pt")):
        raise ConfigError(refuse_existing_message(cfg.run_dir))


def fit(cfg: EmbedConfig, accelerator, tracker) -> dict:
    """Train an embedder per ``cfg``. Returns the final summary (best kNN accuracy, steps...)."""
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    info = read_info(cfg.shards)
    classes = info["classes"]
    in_channels = 1 if info["preprocess"].get("grayscale", True) else 3

    # --- data --------------------------------------------------------------------------
    stream = ShardStream(
        cfg.shards, split="train", mode="train", rank=rank, world_size=world, batch_size=cfg.batch_size,
        P=cfg.P, K=cfg.K, batching=cfg.batching, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
        strict=cfg.strict_data,  # unreadable samples / truncated shards: skip with a warning, or stop
    )
    steps_per_epoch = stream.steps_per_epoch()
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.epochs and cfg.max_steps:
        total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    # --- model, optimiser ----------------------------------------------------------------
    model = build_embedder(arch=cfg.arch, in_channels=in_channels, input_size=cfg.input_size, embedding_dim=cfg.embedding_dim)
    if cfg.sync_bn and device.type == "cpu":
        raise ConfigError("sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU")
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps)
    # The loader is NOT prepared: it is split by rank already (see toolkit.data.stream.make_loader).
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)

    # --- resume --------------------------------------------------------------------------
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.keep_last)
    step, epoch, epoch_step, best, best_map = 0, 0, 0, -1.0, -1.0
    state = ckpts.load_latest() if cfg.resume else None
    if state is not None:
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        best, best_map = state["best"], state.get("best_map", -1.0)
        restore_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        accelerator.print(f"resumed from step {step} (epoch {epoch}, batch {epoch_step}) in {run_dir}")
    elif cfg.resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting fresh")
    elif _agree(main and not cfg.overwrite and ckpts.latest() is not None, device):
        # Decided on rank 0 (the one that writes) and agreed, so every rank stops cleanly.
        raise ConfigError(refuse_existing_message(run_dir))

    def save_state() -> None:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, capture_rng())
        else:
            rngs = [capture_rng()]
        if main:
            ckpts.save(
                {
                    "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rng": rngs, "step": step, "epoch": epoch, "epoch_step": epoch_step, "best": best, "best_map": best_map,
                    "config": asdict(cfg),
                },
                step,
            )
        accelerator.wait_for_everyone()

    def validate() -> dict:
        nonlocal best, best_map
        parts = {}
        for split in ("train", "val"):
            local = embed_split(
                bare, shards=cfg.shards, split=split, rank=rank, world_size=world, device=device,
                input_size=cfg.input_size, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                autocast=accelerator.autocast, channels_last=cfg.channels_last,
            )
            parts[split] = gather_to_main(*local)
            if main:
                warn_missing(parts[split], expected=info["splits"][split]["num_samples"], split=split, print_fn=accelerator.print)
        metrics = {}
        if main:
            metrics = {f"val/{k}": v for k, v in evaluate_embeddings(parts["train"], parts["val"], k=cfg.knn_k).items()}
            metrics["epoch"] = epoch
            # kNN accuracy first; MAP@R breaks ties (accuracy often saturates on easy data).
            improved = (metrics["val/knn_accuracy"], metrics["val/map_at_r"]) > (best, best_map)
            if improved:
                best, best_map = metrics["val/knn_accuracy"], metrics["val/map_at_r"]
                index = (parts["train"][1], parts["train"][2])
                atomic_torch_save(embedder_payload(bare, cfg, classes, metrics, step, index), run_dir / "best_embedder.pt")
            metrics["val/best_knn_accuracy"] = best
            tracker.log(metrics, step=step)
            accelerator.print(
                f"step {step} epoch {epoch}: kNN@{cfg.knn_k} val acc {metrics['val/knn_accuracy']:.4f} "
                f"(best {best:.4f}{', saved' if improved else ''}), P@1 {metrics['val/precision_at_1']:.4f}, "
                f"MAP@R {metrics['val/map_at_r']:.4f}"
            )
        accelerator.wait_for_everyone()
        return metrics

    # --- train ---------------------------------------------------------------------------
    start, deadline = time.time(), (time.time() + 60 * cfg.max_minutes if cfg.max_minutes else None)
    bar = progress(total=total_steps, initial=step, desc="embed", enabled=main and cfg.progress, unit="step")
    images_seen, t_log, skipped_steps = 0, time.time(), 0
    skipped_data: dict[str, int] = {}  # samples skipped by the training stream, whole run (summary.json)
    stop = step >= total_steps
    model.train()
    while not stop:
        loader = make_loader(stream, num_workers=cfg.num_workers, epoch=epoch)
        for i, (_, images, labels) in enumerate(loader):
            if i < epoch_step:
                continue  # resuming mid-epoch: replay the data order up to the saved batch
            try:
                stats = train_step(
                    model, optimizer, scheduler, accelerator, images, labels, input_size=cfg.input_size,
                    margin=cfg.margin, mining=cfg.mining, squared=cfg.squared, grad_clip=cfg.grad_clip,
                    augment=cfg.augment, channels_last=cfg.channels_last, on_nonfinite=cfg.on_nonfinite,
                )
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"{exc} at step {step + 1}; last good checkpoint: {ckpts.latest() or 'none yet'} "
                    "(on_nonfinite=skip skips such steps instead)"
                ) from None
            if stats is None:  # non-finite loss, on_nonfinite=skip: nothing was updated
                skipped_steps, epoch_step = skipped_steps + 1, epoch_step + 1  # the batch is consumed
                accelerator.print(f"warning: non-finite loss at step {step + 1}, step skipped ({skipped_steps} so far)")
                continue
            step, epoch_step = step + 1, epoch_step + 1
            images_seen += images.shape[0] * world
            bar.update(1)
            if step % cfg.log_every == 0:
                dt = max(1e-9, time.time() - t_log)
                logs = {
                    "train/loss": float(stats["loss"]), "train/active_fraction": float(stats["active_fraction"]),
                    "train/lr": scheduler.get_last_lr()[0], "train/images_per_s": images_seen / dt, "epoch": epoch,
                }
                tracker.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", active=f"{logs['train/active_fraction']:.2f}")
                images_seen, t_log = 0, time.time()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_state()
            out_of_time = deadline is not None and _agree(time.time() > deadline, device)
            if step >= total_steps or out_of_time:
                stop = True
                break
        report_skips(epoch, step, total_skips(stream, accelerator), skipped_data, accelerator=accelerator, tracker=tracker)
        if epoch_step >= steps_per_epoch:  # a full epoch finished
            epoch, epoch_step = epoch + 1, 0
            if epoch % cfg.val_every == 0 or stop:
                validate()
                if not cfg.ckpt_every:
                    save_state()
        if cfg.epochs and epoch >= cfg.epochs:
            stop = True
    bar.close()
    if epoch_step:  # stopped mid-epoch (step or time budget): validate what we have
        validate()
    save_state()
    summary = {
        "best_knn_accuracy": best, "steps": step, "epochs": epoch, "minutes": (time.time() - start) / 60,
        "skipped_samples": skipped_data,
    }
    if main:
        tracker.summary(summary)
    return summary
