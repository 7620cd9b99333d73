"""The classifier-head loop on a frozen embedder. Receives an Accelerator; never creates one.

One step, on every rank::

    uint8 (B, C, h, w) --to_model_input--> (B, C, S, S) --frozen embedder, no_grad--> (B, 128)
      --head (dropout, 128->64, ReLU, dropout, 64->C, log_softmax)--> (B, C) --NLLLoss--> loss

Only the head and its optimiser go through ``accelerator.prepare`` (DDP averages the head's
gradients); the embedder never trains, so it stays a plain module on the device, in eval
mode (BatchNorm running statistics never move) with ``requires_grad`` off. The loader is not
prepared either: ShardStream already splits by rank with equal batch counts (see toolkit/data/stream.py).

The validation split is embedded once (the embedder is frozen, so its embeddings never
change): every rank embeds its share, rank 0 assembles them and, after each epoch, scores
the head on them (accuracy, NLL), keeping the best head in ``run_dir/best_head.pt``.
Likewise each rank keeps the train embeddings of its first epoch (``cache_embeddings``, on
the CPU: N / world × D floats) and replays them, reshuffled, in later epochs, so the
embedder runs once over the train split instead of once per epoch.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.artifacts import (
    EMBEDDER_FILE, HEAD_FILE, HeadArtifact, check_classes, load_embedder, open_run, recorded_shards, run_outputs_in,
)
from toolkit.config import ClassifyConfig
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import to_model_input
from toolkit.errors import ConfigError
from toolkit.evaluation import embed_split, gather_to_main
from toolkit.knn import knn_vote
from toolkit.files import atomic_torch_save
from toolkit.models import build_head
from toolkit.progress import progress


def check_run_dir(run_dir: str | Path, *, overwrite: bool) -> None:
    """Refuse to reuse a finished classifier run folder unless ``overwrite``, and an embedding run's folder always.

    ``overwrite=true`` then moves the previous run aside (toolkit/rundir.py), never deletes it.
    """
    if (Path(run_dir) / EMBEDDER_FILE).exists():
        # overwrite would move the embedding run's files aside; and a folder holding both
        # models would make `run` ambiguous for evaluate/predict
        raise ConfigError(f"run_dir {run_dir} holds an embedding run ({EMBEDDER_FILE}): give the classifier its own folder")
    found = run_outputs_in(run_dir)
    if found and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}): pass overwrite=true to start over")


def _train_batch_size(requested: int, *, num_samples: int, world: int, workers: int) -> int:
    """Shrink the batch for tiny datasets so every loader slot can form one."""
    per_slot = num_samples // (world * max(1, workers))
    return max(1, min(requested, per_slot))


class TrainBatches:
    """One epoch of (embeddings (B, D), labels (B,)) batches for the head, on the device.

    Epoch 1 streams the train split and runs the frozen embedder; with ``cache`` the embeddings
    of a complete epoch are kept on the CPU (N / world × D floats per process) and later
    epochs replay them, reshuffled per (seed, epoch, rank): the embedder is frozen and there is
    no augmentation, so they never change. Every rank yields ``steps_per_epoch`` batches.
    """

    def __init__(self, embedder, stream: ShardStream, *, accelerator, input_size: int, batch_size: int,
                 num_workers: int, seed: int, cache: bool):
        self.embedder, self.stream, self.accelerator = embedder, stream, accelerator
        self.input_size, self.batch_size, self.num_workers, self.seed, self.use_cache = input_size, batch_size, num_workers, seed, cache
        self.steps_per_epoch = stream.steps_per_epoch()
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, D), (n,) of this process, CPU

    def epoch(self, epoch: int):
        device = self.accelerator.device
        if self.cached is not None:  # replay, reshuffled per (seed, epoch, rank)
            emb_all, y_all = self.cached
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7_919 + self.accelerator.process_index)
            perm = torch.randperm(len(y_all), generator=gen)
            for i in range(self.steps_per_epoch):  # the same number of batches on every rank
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                yield emb_all[idx].to(device, non_blocking=True), y_all[idx].to(device, non_blocking=True)
            return
        fresh = []
        for _, images, labels in make_loader(self.stream, num_workers=self.num_workers, epoch=epoch):
            x = to_model_input(images.to(device, non_blocking=True), input_size=self.input_size)  # (B, C, S, S)
            y = labels.to(device, non_blocking=True)  # (B,)
            with torch.no_grad(), self.accelerator.autocast():
                emb = self.embedder(x).float()  # (B, D), no graph: nothing flows back into the embedder
            if self.use_cache:
                fresh.append((emb.cpu(), y.cpu()))
            yield emb, y
        if self.use_cache and len(fresh) == self.steps_per_epoch:  # a complete epoch only
            self.cached = (torch.cat([e for e, _ in fresh]), torch.cat([y for _, y in fresh]))


def validate_head(head, best: dict, *, val: tuple[torch.Tensor, torch.Tensor] | None, epoch: float, step: int,
                  train_stats: dict, save_best, tracker, accelerator) -> None:
    """Rank 0 scores ``head`` on the (fixed) val embeddings, keeps the best, logs; the others wait.

    ``val``: (embeddings (N, D), labels (N,)) on the device, rank 0 only; ``best`` is updated in
    place; ``save_best(metrics, epoch, step)`` writes ``best_head.pt``.
    """
    if accelerator.is_main_process:
        val_emb, val_y = val
        head.eval()  # dropout off
        with torch.no_grad():
            logp = head(val_emb)  # (N, C)
        head.train()
        metrics = {
            **train_stats,
            "val/loss": float(F.nll_loss(logp, val_y)),
            "val/accuracy": float((logp.argmax(1) == val_y).float().mean()),
            "epoch": epoch,
        }
        # Best = highest accuracy; on a tie, the lower NLL (tiny val sets tie often).
        improved = (metrics["val/accuracy"], -metrics["val/loss"]) > (best["val/accuracy"], -best["val/loss"])
        if improved:
            best.update({k: metrics[k] for k in ("val/accuracy", "val/loss", "epoch")})
            save_best(metrics, epoch, step)
        metrics["val/best_accuracy"] = best["val/accuracy"]
        tracker.log(metrics, step=step)
        accelerator.print(
            f"epoch {epoch} step {step}: train loss {metrics.get('train/loss', float('nan')):.4f} "
            f"acc {metrics.get('train/accuracy', float('nan')):.4f} | val loss {metrics['val/loss']:.4f} "
            f"acc {metrics['val/accuracy']:.4f} (best {best['val/accuracy']:.4f}{', saved' if improved else ''})"
        )
    accelerator.wait_for_everyone()


def fit_head(cfg: ClassifyConfig, accelerator, tracker) -> dict:
    """Train a classifier head on the frozen embedder ``cfg.embedder``: setup -> train (validate, save best) -> summary."""
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    run_dir = Path(cfg.run_dir)

    # --- setup: frozen embedder, data, head --------------------------------------------------
    run = open_run(cfg.embedder)  # a run folder, best_embedder.pt, or a classifier run (its embedder)
    embedder, saved = load_embedder(run, device)  # eval mode, requires_grad False
    ecfg = saved.config
    shards = str(cfg.shards or recorded_shards(ecfg, run.embedder_path))
    info = read_info(shards)
    check_classes(info.classes, saved.classes, shards=shards)
    n_train = info.split("train", folder=shards).num_samples
    batch_size = _train_batch_size(cfg.batch_size, num_samples=n_train, world=world, workers=cfg.num_workers)
    if batch_size < cfg.batch_size:
        accelerator.print(f"classify: {n_train} train images: batch_size {cfg.batch_size} -> {batch_size} per process")
    stream = ShardStream(
        shards, split="train", mode="train", rank=accelerator.process_index, world_size=world, batch_size=batch_size,
        batching="random", shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
    )
    batches = TrainBatches(embedder, stream, accelerator=accelerator, input_size=ecfg["input_size"], batch_size=batch_size,
                           num_workers=cfg.num_workers, seed=cfg.seed, cache=cfg.cache_embeddings)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.epochs and cfg.max_steps:
        total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    # The head and its optimiser are the only things Accelerate prepares.
    head = build_head(embedding_dim=ecfg["embedding_dim"], hidden=cfg.hidden, num_classes=len(saved.classes), dropout=cfg.dropout)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head, optimizer = accelerator.prepare(head, optimizer)
    bare = accelerator.unwrap_model(head)
    loss_fn = torch.nn.NLLLoss()

    # --- validation embeddings: once, since the embedder is frozen -----------------------------
    local = embed_split(
        embedder, shards=shards, split="val", rank=accelerator.process_index, world_size=world, device=device,
        input_size=ecfg["input_size"], batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
        autocast=accelerator.autocast,
    )
    gathered = gather_to_main(*local)  # rank 0: (keys, (N, D), (N,)); others: None
    val, knn_acc = None, None
    if main:
        val = (gathered[1].to(device), gathered[2].to(device))
        if saved.index is not None:  # the embedding stage's own score on the same split, for comparison
            ref, ref_y = saved.reference()  # (N_train, D), (N_train,)
            pred, _ = knn_vote(ref.to(device), ref_y, val[0], k=cfg.knn_k)
            knn_acc = float((pred == val[1].cpu()).float().mean())
            tracker.log({"val/knn_accuracy": knn_acc, "epoch": 0}, step=0)

    def save_best(metrics: dict, epoch: float, step: int) -> None:
        artifact = HeadArtifact.from_model(
            bare, config={**asdict(cfg), "shards": shards}, embedder_path=run.embedder_path, embedder=saved,
            preprocess=info.preprocess, metrics=metrics, epoch=epoch, step=step,
        )
        atomic_torch_save(artifact.to_payload(), run_dir / HEAD_FILE)

    # --- train ---------------------------------------------------------------------------------
    start = time.time()
    best = {"val/accuracy": -1.0, "val/loss": float("inf"), "epoch": 0}
    bar = progress(total=total_steps, desc="classify", enabled=main and cfg.progress, unit="step")
    step, epoch, stop = 0, 0, total_steps <= 0
    head.train()
    while not stop:
        # [sum of loss × batch, correct, samples] over this epoch, reduced across ranks at the end;
        # measured with dropout on (train mode), as Keras-style training curves are.
        sums = torch.zeros(3, device=device)  # float32: exact counts up to 2^24, and MPS has no float64
        epoch_step = 0
        for emb, y in batches.epoch(epoch):  # (B, D) frozen embeddings, (B,) labels
            with accelerator.autocast():
                logp = head(emb.float())  # (B, C) log-probabilities
            loss = loss_fn(logp.float(), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, epoch_step = step + 1, epoch_step + 1
            sums[0] += loss.detach().float() * len(y)
            sums[1] += (logp.argmax(1) == y).sum()
            sums[2] += len(y)
            bar.update(1)
            if step % cfg.log_every == 0:
                tracker.log({"train/batch_loss": loss.item(), "epoch": epoch}, step=step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step >= total_steps:
                stop = True
                break
        finished = epoch_step >= steps_per_epoch
        epoch += int(finished)
        total = accelerator.reduce(sums, reduction="sum")  # every rank ran the same number of batches
        train_stats = {"train/loss": float(total[0] / total[2]), "train/accuracy": float(total[1] / total[2])} if total[2] > 0 else {}
        # a max_steps stop mid-epoch is validated too, at a fractional epoch
        validate_head(bare, best, val=val, epoch=epoch if finished else epoch + epoch_step / steps_per_epoch, step=step,
                      train_stats=train_stats, save_best=save_best, tracker=tracker, accelerator=accelerator)
        if cfg.epochs and epoch >= cfg.epochs:
            stop = True
    bar.close()

    summary = {
        "best_val_accuracy": best["val/accuracy"],
        "best_val_loss": best["val/loss"],
        "best_epoch": best["epoch"],
        "val_knn_accuracy": knn_acc,
        "steps": step,
        "epochs": epoch,
        "world_size": world,
        "minutes": (time.time() - start) / 60,
    }
    if main:
        tracker.summary(summary)
    return summary
