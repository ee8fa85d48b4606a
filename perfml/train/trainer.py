"""The training loop: one Trainer that reads top to bottom, from config to a finished run directory.

    Trainer(config).fit()                     a new run in config.out_dir
    Trainer(config, resume=RUN_DIR).fit()     continue from the run's latest checkpoint
    Trainer(config, model=llama).fit()        train a given perfml Llama (e.g. a pruned one,
                                              fine-tuned) instead of a new one from config.model

A given model is trained in place: moved to the config's device, wrapped, compiled and optimized
like a built one; the run's checkpoints record its own config (model.config) and that it was given
("model_source"). Resuming such a run needs a model of the same structure again (its values are
replaced by the checkpoint's): a structurally pruned model is not what its model_config builds, and
a magnitude-pruned one needs its masks kept by a callback, so a resume without `model=` is refused
with an error that says so, and a model whose tensor shapes differ from the checkpoint's is refused
naming the first tensor that differs.

One optimizer step = grad_accum micro-batches of batch_size sequences on each of world_size
processes. The loss of every micro-batch is the model's SUM over its tokens, divided by the token
count of the whole step (all micro-batches, all ranks, counted before the first forward), so the
gradient is exactly that of one big batch of the same tokens whatever the split (DDP averages
gradients over ranks, hence the extra factor world_size).

Exact resume: a checkpoint holds everything the next step depends on (weights, optimizer,
scheduler, grad scaler, python/numpy/torch/cuda RNG, the loader's position, the step, the
early-stopping record), metrics rows written after it are dropped on resume, so an interrupted and
resumed run logs the same losses as an uninterrupted one (bit for bit on CPU). SIGTERM/SIGINT only
set a flag: the step in flight completes, a checkpoint is written, fit() returns normally (the
command exits 0), which is what a preemptible job needs. A second SIGINT aborts at once.

Trade-offs: the loss of each step is read back to the host (one sync per step) because every step
is a metrics row; mixed precision is autocast over fp32 weights (also under FSDP, which therefore
all-gathers fp32: simple and exact, twice the bytes of a bf16 param policy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import perfml
from perfml._dtypes import torch_dtypes
from perfml.train import checkpoint as ckpt
from perfml.train import distributed
from perfml.train.callbacks import Callback, EarlyStopping
from perfml.train.config import ConfigError, TrainConfig, save_config
from perfml.train.loggers import (
    METRICS_FILE,
    PLOT_FILE,
    Logger,
    build_loggers,
    import_mlflow,
    plot_loss_curve,
)
from perfml.train.result import TrainResult
from perfml.train.schedule import build_scheduler

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = torch_dtypes()  # the one map of perfml._dtypes: {"fp32": torch.float32, ...}


@dataclass
class DataBundle:
    fingerprint: str
    tokenizer: Any
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor


# --- pieces shared by training and `perfml eval` ---------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_data(config: TrainConfig) -> DataBundle:
    """Corpus -> tokenizer -> token stream -> train/val split, all cached by corpus fingerprint."""
    from perfml import data

    try:
        corpus = data.load_corpus(config.data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    try:
        tokenizer = data.get_tokenizer(
            config.tokenizer, corpus, vocab_size=config.vocab_size, cache_dir=config.cache_dir
        )
    except ValueError as exc:
        raise ConfigError(f"vocab_size: {exc}") from None
    tokens = data.tokenize_corpus(corpus, tokenizer, cache_dir=config.cache_dir)
    train, val = data.train_val_split(tokens, config.val_fraction)
    return DataBundle(corpus.fingerprint, tokenizer, train, val)


def model_config(config: TrainConfig, vocab_size: int | None = None) -> Any:
    """The LlamaConfig of the run: the preset, model_args, fused; checked against the data."""
    from perfml.models.llama import LlamaConfig

    try:
        cfg = LlamaConfig.preset(config.model, fused=config.fused, **config.model_args)
    except (TypeError, ValueError) as exc:
        key = "model_args" if config.model in LlamaConfig.presets() else "model"
        raise ConfigError(f"{key}: {exc}") from None
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"model_args.vocab_size: the {config.tokenizer} tokenizer has {vocab_size} tokens, "
            f"more than the model's vocab_size {cfg.vocab_size} (--set "
            f"model_args.vocab_size={vocab_size})"
        )
    _check_seq_len(config, cfg, "the model's")
    return cfg


def _check_seq_len(config: TrainConfig, cfg: Any, whose: str) -> None:
    if config.seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len {config.seq_len} exceeds {whose} max_seq_len {cfg.max_seq_len}")


def check_given_model(model: Any) -> None:
    """The model a Trainer is given: a perfml Llama whose trainable weights are fp32 (mixed
    precision is autocast over fp32 weights)."""
    from perfml.models.llama import Llama

    if not isinstance(model, Llama):
        raise TypeError(
            f"Trainer: model must be a perfml.models.llama.Llama, got {type(model).__name__}"
        )
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            raise ConfigError(
                f"model: {name} is {p.dtype}; the Trainer trains fp32 weights (mixed precision "
                "is the config's precision, autocast over them): pass model.float()"
            )


def structure_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None when `state` has exactly the model's tensor names and shapes, else what differs first
    (the model unwrapped: full, unsharded shapes)."""
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in state.items()}
    for name, shape in own.items():
        if name not in theirs:
            return f"the checkpoint has no {name}"
        if theirs[name] != shape:
            return f"{name} is {list(theirs[name])} in the checkpoint, {list(shape)} in the model"
    extra = [name for name in theirs if name not in own]
    if extra:
        return f"the checkpoint has {extra[0]}, which the model lacks"
    return None


def token_loader(
    tokens: torch.Tensor, config: TrainConfig, env: distributed.DistEnv, *, split: str
) -> Any:
    """The training loader (shuffled each epoch) or the validation one (a fixed order; full
    batches only, so under FSDP every rank runs the same number of forwards)."""
    from perfml import data

    try:
        return data.TokenLoader(
            tokens,
            config.batch_size,
            config.seq_len,
            seed=config.seed,
            shuffle=split == "train",
            drop_last=True,
            rank=env.rank,
            world_size=env.world_size,
        )
    except ValueError as exc:
        key = "val_fraction" if split == "val" else "data"
        raise ConfigError(f"{key}: the {split} split is too small: {exc}") from None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    *,
    device: torch.device,
    precision: str,
    max_batches: int | None,
    env: distributed.DistEnv,
) -> dict[str, float]:
    """Mean loss over the non-ignored tokens of the first max_batches batches of the loader's
    first epoch (all of them when None), on every rank."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, tokens]
    batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    for index in range(batches):
        input_ids, labels = loader.batch(0, index)
        input_ids, labels = input_ids.to(device), labels.to(device)
        with _autocast(device, precision):
            loss_sum = model(input_ids, labels, reduction="sum")
        total[0] += loss_sum.double()
        total[1] += (labels != -100).sum()
    distributed.all_reduce_sum(total, env)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Trains config.model on config.data into the run directory config.out_dir."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        callbacks: Sequence[Callback] = (),
        resume: str | Path | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        if model is not None:
            check_given_model(model)
        self.config = config
        # a perfml Llama to train instead of a new one (trained in place); under torchrun every
        # rank passes the same weights (DDP broadcasts rank 0's, FSDP shards each rank's own)
        self.given_model = model
        self.callbacks = list(callbacks)
        self.resume_from = None if resume is None else Path(resume)
        self.run_dir = Path(config.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens = 0
        self.elapsed_s = 0.0
        self.early_stopping = EarlyStopping(config.early_stop_patience, config.min_delta)
        self.last_val_loss: float | None = None
        self.last_train_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self._requested_stop: str | None = None  # a signal or request_stop(), on this rank
        self._agreed_stop = False  # some rank asked to stop before this step's all-reduce
        self._stop_reason: str | None = None
        self._loggers: list[Logger] = []
        self._progress: Any = None

    # --- public --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        try:
            self._setup()
            with self._signal_handlers():
                return self._loop()
        finally:
            self._close()

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (under torchrun: after the step in which every
        rank has heard of it), with a checkpoint."""
        if self._requested_stop is None:
            self._requested_stop = reason

    def log(self, row: dict[str, Any]) -> None:
        if self.env.is_main:
            for logger in self._loggers:
                logger.log(row)

    # --- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        config = self.config
        # optional packages asked for by the config: fail before any work or file
        if "mlflow" in config.loggers:
            import_mlflow()
        if config.optimizer == "perfml":
            _perfml_optim()
        self.env, self._created_group = distributed.setup(config.device)
        self.device = self.env.device
        self.precision = resolve_precision(config.precision, self.device)
        if (
            self.precision == "bf16"
            and self.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise ConfigError(f"precision: bf16 is not supported on {torch.cuda.get_device_name()}")
        ckpt.seed_everything(config.seed)
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

        checkpoint = self._find_resume_checkpoint()
        self._check_run_dir(resuming=checkpoint is not None)

        # rank 0 tokenizes (and trains a BPE) into the cache first; the other ranks then read it
        if not self.env.is_main:
            distributed.barrier(self.env)
        self.data = build_data(config)
        if self.env.is_main:
            distributed.barrier(self.env)
        self.model_config = self._model_config()
        self.model = self._build_model()
        if checkpoint is not None:
            self._check_resume_structure(checkpoint)
        # model: the weights (state dicts); wrapped: DDP / FSDP (gradient sync); train_module:
        # what the step calls, compiled when asked
        self.wrapped = distributed.wrap(self.model, config.parallel, self.env)
        self.train_module = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(
            self.optimizer,
            config.schedule,
            max_steps=config.max_steps,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            decay_fraction=config.decay_fraction,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loader = token_loader(self.data.train_tokens, config, self.env, split="train")
        self.val_loader = token_loader(self.data.val_tokens, config, self.env, split="val")
        if checkpoint is not None:
            self._restore(checkpoint)
        self.tokens_per_step = (
            config.batch_size * config.seq_len * config.grad_accum * self.env.world_size
        )
        self.flops_per_token = self.model.flops_per_token(config.seq_len)
        from perfml.bench.ceilings import peak_flops  # the bench package only when training

        self.peak_flops, self.peak_source = peak_flops(self.device, self.precision)

        # nothing is written before here: a bad preset, model_args key or data path leaves no
        # run directory behind
        self._prepare_run_dir()
        if self.env.is_main:
            save_config(config, self.run_dir / CONFIG_FILE)
            self.data.tokenizer.save(self.run_dir / TOKENIZER_FILE)
            self._loggers = build_loggers(
                config.loggers,
                self.run_dir,
                mlflow_uri=config.mlflow_uri,
                resume_step=None if checkpoint is None else self.step,
            )
            for logger in self._loggers:
                logger.log_config(config.to_dict())

    def _find_resume_checkpoint(self) -> ckpt.Checkpoint | None:
        if self.resume_from is None:
            return None
        path = ckpt.resolve_checkpoint(self.resume_from)
        return ckpt.load_checkpoint(path)

    def _check_run_dir(self, resuming: bool) -> None:
        if not resuming and (self.run_dir / CONFIG_FILE).exists():
            raise ConfigError(
                f"out_dir: {self.run_dir} already holds a run; continue it with "
                f"`perfml train --resume {self.run_dir}` or choose another out_dir"
            )

    def _prepare_run_dir(self) -> None:
        if self.env.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_leftovers(self.ckpt_root)
        distributed.barrier(self.env)

    def _model_config(self) -> Any:
        """The LlamaConfig of the model trained: config's preset, or the given model's own."""
        vocab_size = self.data.tokenizer.vocab_size
        if self.given_model is None:
            return model_config(self.config, vocab_size)
        cfg = self.given_model.config
        if vocab_size > cfg.vocab_size:
            raise ConfigError(
                f"model: the {self.config.tokenizer} tokenizer has {vocab_size} tokens, more "
                f"than the given model's vocab_size {cfg.vocab_size}"
            )
        _check_seq_len(self.config, cfg, "the given model's")
        return cfg

    def _build_model(self) -> torch.nn.Module:
        from perfml.models.llama import Llama

        if self.given_model is not None:
            model = self.given_model.to(self.device)
        else:
            # the same seed on every rank: FSDP2 shards each rank's own copy of the initial weights
            torch.manual_seed(self.config.seed)
            model = Llama(self.model_config).to(self.device)
        model.train()
        model.set_activation_checkpointing(self.config.activation_checkpointing)
        return model

    def _check_resume_structure(self, checkpoint: ckpt.Checkpoint) -> None:
        """The model about to receive the checkpoint's weights has their structure."""
        given = checkpoint.meta.get("model_source") == "given"
        if given and self.given_model is None:
            raise ConfigError(
                f"cannot resume from {checkpoint.path}: its run trained a model passed to "
                "Trainer(model=...) (e.g. a pruned one), not one built from model_config; resume "
                "with a model of the same structure: Trainer(config, model=..., resume=...) "
                "(perfml.sparsity.finetune(model, config, resume=...) keeps pruning masks)"
            )
        problem = structure_mismatch(self.model, checkpoint.model)
        if problem is not None:
            what = "the model given" if self.given_model is not None else "the model config builds"
            raise ConfigError(
                f"cannot resume from {checkpoint.path}: its weights do not fit {what}: {problem}"
            )

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        # weight decay on matrices only: norms (1-D) are scales that decay would pull to 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        betas = (config.beta1, config.beta2)
        if config.optimizer == "perfml":
            return _perfml_optim().AdamW(groups, lr=config.lr, betas=betas)
        # torch's fused AdamW (CUDA and CPU) is its fastest; FSDP's DTensor params take foreach
        fused = not distributed.is_fsdp(self.model)
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=fused)

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        recorded = checkpoint.meta["data"]["fingerprint"]
        if recorded != self.data.fingerprint:
            raise ConfigError(
                f"data: the corpus changed since {checkpoint.path} (fingerprint "
                f"{self.data.fingerprint}, the run used {recorded}); resuming would not "
                "continue the same run"
            )
        state = checkpoint.state
        distributed.load_model_state(self.model, checkpoint.model)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as exc:  # batch_size, seq_len or world size changed since the checkpoint
            raise ConfigError(f"cannot resume from {checkpoint.path}: {exc}") from None
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.step, self.tokens, self.elapsed_s = state["step"], state["tokens"], state["elapsed_s"]
        self.last_val_loss = state["last_val_loss"]
        self.last_checkpoint = checkpoint.path
        ckpt.set_rng_state(state["rng"])  # last: nothing above may draw from the generators again

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> TrainResult:
        config = self.config
        for callback in self.callbacks:
            callback.on_train_start(self)
        self._progress = self._progress_bar()
        # a resumed run's checkpoint step needs neither a new checkpoint nor a final evaluation
        resumed_at = self.step if self.last_checkpoint is not None else -1
        saved_step = evaluated_step = resumed_at
        while self.step < config.max_steps and self._stop_reason is None:
            start = time.perf_counter()
            loss, grad_norm, lr = self._train_step()
            seconds = time.perf_counter() - start
            self.step += 1
            self.tokens += self.tokens_per_step
            self.elapsed_s += seconds
            self.last_train_loss = loss
            row = self._step_row(loss, grad_norm, lr, seconds)
            self.log(row)
            self._update_progress(row)
            for callback in self.callbacks:
                callback.on_step_end(self, row)

            improved = False
            if config.eval_every and self.step % config.eval_every == 0:
                improved = self._evaluate()
                evaluated_step = self.step
                if self.early_stopping.should_stop and self._stop_reason is None:
                    self._stop_reason = "early_stop"
            if self._stop_reason is None and self._stop_requested():
                self._stop_reason = self._requested_stop or "stop requested on another rank"
            periodic = config.ckpt_every and self.step % config.ckpt_every == 0
            if periodic or (improved and config.save_best):
                self._save(best=improved and config.save_best)
                saved_step = self.step

        stop_reason = self._stop_reason or "max_steps"
        if stop_reason == "max_steps" and evaluated_step != self.step:
            improved = self._evaluate()
            if improved and config.save_best:
                self._save(best=True)
                saved_step = self.step
        if saved_step != self.step:
            self._save(best=False)
        if self.env.is_main:
            plot_loss_curve(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE, self._title())
        best = ckpt.best_checkpoint(self.ckpt_root)
        result = TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            stop_reason=stop_reason,
            train_loss=self.last_train_loss,
            val_loss=self.last_val_loss,
            best_val_loss=None
            if math.isinf(self.early_stopping.best)
            else self.early_stopping.best,
            last_checkpoint=self.last_checkpoint,
            best_checkpoint=best,
            tokens=self.tokens,
            elapsed_s=self.elapsed_s,
        )
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        return result

    def _stop_requested(self) -> bool:
        # under torchrun every rank must leave the loop after the same step: only the flag summed
        # over ranks inside the step counts, never a request that arrived after that all-reduce
        if self.env.distributed:
            return self._agreed_stop
        return self._requested_stop is not None

    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, lr)."""
        micro = [next(self.loader) for _ in range(self.config.grad_accum)]
        device = self.device
        # the step's token count over all micro-batches and ranks, before any backward: every
        # micro-batch's summed loss is divided by it (times world_size: DDP/FSDP average grads)
        local_tokens = sum(int((labels != -100).sum()) for _, labels in micro)
        tokens = torch.tensor(float(local_tokens), dtype=torch.float64, device=device)
        distributed.all_reduce_sum(tokens, self.env)
        scale = self.env.world_size / tokens
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        lr = self.optimizer.param_groups[0]["lr"]
        for i, (input_ids, labels) in enumerate(micro):
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            last = i == len(micro) - 1
            with distributed.gradient_sync(self.wrapped, enabled=last):
                with _autocast(device, self.precision):
                    micro_loss = self.train_module(input_ids, labels, reduction="sum")
                self.scaler.scale(micro_loss.float() * scale).backward()
            loss_sum += micro_loss.detach().double()
        self.scaler.unscale_(self.optimizer)
        for callback in self.callbacks:
            callback.on_before_optimizer_step(self)
        max_norm = self.config.clip_grad or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # [loss sum, stop requests] summed over ranks: the logged loss, and whether any rank
        # was asked to stop during this step
        stop = float(self._requested_stop is not None)
        stats = torch.stack([loss_sum, torch.tensor(stop, dtype=torch.float64, device=device)])
        loss_total, stops = distributed.all_reduce_sum(stats, self.env).tolist()
        self._agreed_stop = stops > 0
        return loss_total / tokens.item(), float(grad_norm), lr

    def _step_row(self, loss: float, grad_norm: float, lr: float, seconds: float) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / seconds
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)
        row = {
            "split": "train",
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 4),
        }
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        return row

    def _evaluate(self) -> bool:
        """Validation loss now; logs it and returns whether it is a new best."""
        metrics = evaluate(
            self.model,
            self.val_loader,
            device=self.device,
            precision=self.precision,
            max_batches=self.config.eval_batches,
            env=self.env,
        )
        self.last_val_loss = metrics["loss"]
        improved = self.early_stopping.update(metrics["loss"], self.step)
        row = {
            "split": "val",
            "step": self.step,
            "loss": metrics["loss"],
            "ppl": metrics["ppl"],
            "tokens": metrics["tokens"],
            "best": improved,
        }
        self.log(row)
        if self.env.is_main and self.config.progress:
            self._progress.write(
                f"step {self.step}: val loss {metrics['loss']:.4f} (ppl {metrics['ppl']:.2f})"
                + (" best" if improved else "")
            )
        for callback in self.callbacks:
            callback.on_eval(self, row)
        return improved

    # --- checkpoints ---------------------------------------------------------------------------

    def _save(self, best: bool) -> Path:
        """A checkpoint of this step (collective: every rank calls it; rank 0 writes)."""
        model_state = distributed.full_model_state(self.model)
        optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        path = self.ckpt_root / ckpt.checkpoint_name(self.step)
        if self.env.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "elapsed_s": self.elapsed_s,
                "last_val_loss": self.last_val_loss,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(),
                "loader": self.loader.state_dict(),
                "early_stopping": self.early_stopping.state_dict(),
            }
            ckpt.save_checkpoint(path, model_state, state, self._meta())
            if best:
                ckpt.write_json_atomic(
                    self.ckpt_root / ckpt.BEST_FILE,
                    {"name": path.name, "step": self.step, "val_loss": self.last_val_loss},
                )
            ckpt.prune_checkpoints(self.ckpt_root, self.config.keep_last)
        distributed.barrier(self.env)
        self.last_checkpoint = path
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "model_source": "config" if self.given_model is None else "given",
            "data": {
                "fingerprint": self.data.fingerprint,
                "tokenizer": self.config.tokenizer,
                "vocab_size": self.data.tokenizer.vocab_size,
                "train_tokens": self.data.train_tokens.numel(),
                "val_tokens": self.data.val_tokens.numel(),
            },
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val_loss,
            "world_size": self.env.world_size,
            "precision": self.precision,
            "mfu_peak": {"flops": self.peak_flops, "source": self.peak_source},
            "versions": {"perfml": perfml.__version__, "torch": torch.__version__},
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _title(self) -> str:
        model = self.config.model if self.given_model is None else "given model"
        fused = self.model_config.fused
        return f"{self.run_dir.name}: {model}, fused={fused}, {self.precision}"

    # --- signals, progress, teardown -------------------------------------------------------------

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGTERM/SIGINT: finish the step, checkpoint, return; a second SIGINT aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._requested_stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self._requested_stop is None:
                self._requested_stop = name
                message = f"{name}: finishing step {self.step + 1}, then writing a checkpoint"
                print(message, file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        enabled = self.config.progress and self.env.is_main
        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            unit="step",
            desc=self.run_dir.name,
            dynamic_ncols=True,
            disable=not enabled,
            mininterval=0.5,
            file=sys.stderr,
        )

    def _update_progress(self, row: dict[str, Any]) -> None:
        bar = self._progress
        speed = f"{_si(row['tokens_per_s'])} tok/s"
        bar.set_postfix_str(
            f"loss {row['loss']:.4f}, {speed}, MFU {100 * row['mfu']:.1f}%", refresh=False
        )
        bar.update(1)

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        for logger in self._loggers:
            logger.close()
        self._loggers = []
        if hasattr(self, "_deterministic_before"):
            torch.use_deterministic_algorithms(self._deterministic_before)
        distributed.teardown(getattr(self, "_created_group", False))


def _perfml_optim() -> Any:
    try:
        return importlib.import_module("perfml.optim")
    except ImportError as exc:
        raise ConfigError(
            f"optimizer: 'perfml' needs perfml.optim, which is not available here ({exc}); "
            "use optimizer: adamw"
        ) from None


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


# --- `perfml eval` ---------------------------------------------------------------------------


def validation_metrics(
    model: torch.nn.Module,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    batches: int | None = None,
    world_size: int = 1,
    fingerprint: str | None = None,
    source: str = "the model",
) -> dict[str, Any]:
    """Validation loss and perplexity of `model` on the held-out split of the run `config`
    describes, over the batches the run's own evaluations used (its global batch: batch_size x
    the `world_size` it trained with); `batches` caps them (default: the run's eval_batches).
    `fingerprint`, when given, is the corpus fingerprint the model was trained on: a corpus that
    changed since is a ConfigError naming `source`. perfml.runs.evaluate opens a run or model
    directory and calls this."""
    device = torch.device(_device_name(device) if isinstance(device, str) else device)
    env = distributed.DistEnv(0, 1, 0, device)
    data = build_data(config)
    if fingerprint is not None and data.fingerprint != fingerprint:
        raise ConfigError(
            f"data: the corpus changed since {source} was written (fingerprint "
            f"{data.fingerprint}, the run used {fingerprint})"
        )
    val_config = dataclasses.replace(config, batch_size=config.batch_size * world_size)
    metrics = evaluate(
        model.to(device),
        token_loader(data.val_tokens, val_config, env, split="val"),
        device=device,
        precision=resolve_precision(config.precision, device),
        max_batches=batches or config.eval_batches,
        env=env,
    )
    return {"val_loss": metrics["loss"], "ppl": metrics["ppl"], "tokens": metrics["tokens"]}


def _device_name(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
