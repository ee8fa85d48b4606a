"""The Trainer on the real model and data: run directory, metrics, accumulation equivalence, exact
resume after SIGTERM, early stopping, checkpoint retention, evaluation, switches and errors."""

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perfml import data
from perfml.runs import evaluate as evaluate_run
from perfml.train import (
    Callback,
    CheckpointError,
    ConfigError,
    Trainer,
    load_checkpoint,
    load_config,
)
from perfml.train.schedule import lr_multiplier
from tests.train.conftest import config_args, perfml_command, read_rows, subprocess_env


def final_weights(run_dir):
    return load_file(
        str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "model.safetensors")
    )


class SignalAt(Callback):
    """Sends this process `signum` at the end of step `step` (as a scheduler preempting it)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step:
            signal.raise_signal(self.signum)


def test_run_directory_metrics_and_schedule(make_config):
    config = make_config(max_steps=8, eval_every=4, ckpt_every=4, keep_last=5, schedule="cosine")
    result = Trainer(config).fit()
    run = result.run_dir
    assert result.step == 8 and result.stop_reason == "max_steps"
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "tokenizer.json",
        "checkpoints",
    }
    assert load_config(run / "config.yaml") == config
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "tokens"} <= set(row)
        assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0 and row["mfu"] > 0
    multiplier = lr_multiplier("cosine", max_steps=8, warmup_steps=2, min_lr_ratio=0.1)
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * multiplier(s) for s in range(8)])
    assert rows[-1]["tokens"] == 8 * 4 * 16
    val = read_rows(run, "val")
    assert [r["step"] for r in val] == [4, 8] and all(
        r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in val
    )
    assert result.val_loss == val[-1]["loss"]
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000008"]
    assert result.last_checkpoint.name == "step-00000008"
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.meta["data"]["fingerprint"] == data.load_corpus(config.data).fingerprint
    assert ckpt.meta["config"] == config.to_dict() and ckpt.step == 8


def test_loss_goes_down(make_config):
    result = Trainer(make_config(max_steps=40, eval_every=0, ckpt_every=0, lr=1e-2)).fit()
    rows = read_rows(result.run_dir)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)


class MaskSpaces(data.TokenLoader):
    """Labels that are spaces are ignored (-100): micro-batches then hold unequal numbers of
    counted tokens, so only a normalization by the whole step's token count matches one batch."""

    def batch(self, epoch, index):
        input_ids, labels = super().batch(epoch, index)
        return input_ids, labels.masked_fill(labels == ord(" "), -100)


def test_accumulation_equals_one_big_batch(make_config, monkeypatch):
    monkeypatch.setattr(data, "TokenLoader", MaskSpaces)
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        config = make_config(
            f"b{batch}x{accum}",
            batch_size=batch,
            grad_accum=accum,
            max_steps=6,
            eval_every=0,
            ckpt_every=0,
            lr=1e-2,
        )
        runs[batch, accum] = Trainer(config).fit().run_dir
    losses = {k: [r["loss"] for r in read_rows(run)] for k, run in runs.items()}
    norms = {k: [r["grad_norm"] for r in read_rows(run)] for k, run in runs.items()}
    weights = {k: final_weights(run) for k, run in runs.items()}
    for key in ((2, 2), (1, 4)):
        assert losses[key] == pytest.approx(losses[4, 1], rel=1e-5)
        assert norms[key] == pytest.approx(norms[4, 1], rel=1e-4)
        for name, w in weights[4, 1].items():
            torch.testing.assert_close(weights[key][name], w, rtol=1e-4, atol=1e-5)


class Probe(Callback):
    """Draws from every RNG a resume restores at each step end (a model with dropout would),
    and at step 2 lowers the fp16 loss scale (as an overflow would), so that a resume that
    skipped either state would diverge from the straight run."""

    def __init__(self):
        self.draws = {}

    def on_step_end(self, trainer, metrics):
        self.draws[metrics["step"]] = (torch.rand(1).item(), random.random(), np.random.rand())  # noqa: NPY002
        if metrics["step"] == 2 and trainer.scaler.is_enabled():
            trainer.scaler.update(1024.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sigterm_then_resume_equals_the_straight_run(make_config, precision):
    settings = dict(
        max_steps=12,
        grad_accum=2,
        eval_every=4,
        ckpt_every=5,
        warmup_steps=3,
        precision=precision,
        early_stop_patience=10,
    )
    straight_probe = Probe()
    straight = Trainer(make_config("straight", **settings), callbacks=[straight_probe]).fit()

    config = make_config("interrupted", **settings)
    stopped = Trainer(config, callbacks=[SignalAt(6), Probe()]).fit()
    assert (stopped.stop_reason, stopped.step) == ("SIGTERM", 6)
    assert stopped.last_checkpoint.name == "step-00000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed_probe = Probe()
    resumed = Trainer(config, resume=config.out_dir, callbacks=[resumed_probe]).fit()
    assert (resumed.stop_reason, resumed.step) == ("max_steps", 12)

    for split in ("train", "val"):
        a, b = read_rows(straight.run_dir, split), read_rows(resumed.run_dir, split)
        keys = ("step", "loss", "lr", "grad_norm", "tokens", "loss_scale", "ppl")
        assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    if precision == "fp16":
        assert [r["loss_scale"] for r in read_rows(straight.run_dir)][1:3] == [65536.0, 1024.0]
    assert resumed_probe.draws == {k: v for k, v in straight_probe.draws.items() if k > 6}
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_metrics_written_after_the_checkpoint(make_config):
    config = make_config(max_steps=10, ckpt_every=4, eval_every=0)
    Trainer(config, callbacks=[SignalAt(6)]).fit()
    # as if the process had died at step 6 before its checkpoint: the latest is step 4
    checkpoints = config.out_dir + "/checkpoints"
    load_checkpoint(checkpoints + "/step-00000006")
    import shutil

    shutil.rmtree(checkpoints + "/step-00000006")
    resumed = Trainer(config, resume=config.out_dir).fit()
    assert resumed.step == 10
    assert [r["step"] for r in read_rows(resumed.run_dir)] == list(range(1, 11))


def test_sigterm_in_a_subprocess_exits_0_with_a_checkpoint_then_resumes(make_config, tmp_path):
    config = make_config("sub", max_steps=300, eval_every=0, ckpt_every=0)
    metrics = tmp_path / "sub" / "metrics.jsonl"
    child = subprocess.Popen(
        perfml_command("train", *config_args(config)),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "SIGTERM: finishing step" in err and "stopped by SIGTERM" in out
    stopped_at = len(read_rows(tmp_path / "sub"))
    assert 3 <= stopped_at < 300
    ckpt = load_checkpoint(tmp_path / "sub" / "checkpoints" / f"step-{stopped_at:08d}")
    assert ckpt.step == stopped_at

    from perfml import cli

    assert cli.main(["train", "--resume", config.out_dir]) == 0
    straight = Trainer(make_config("straight", max_steps=300, eval_every=0, ckpt_every=0)).fit()
    assert [r["loss"] for r in read_rows(tmp_path / "sub")] == [
        r["loss"] for r in read_rows(straight.run_dir)
    ]


def test_early_stopping_keeps_the_best_checkpoint(make_config):
    # with a min_delta this large only the first evaluation counts as an improvement
    config = make_config(
        max_steps=40, eval_every=2, ckpt_every=0, early_stop_patience=2, min_delta=1e9, keep_last=1
    )
    result = Trainer(config).fit()
    assert (result.stop_reason, result.step) == ("early_stop", 6)
    val = read_rows(result.run_dir, "val")
    assert [(r["step"], r["best"]) for r in val] == [(2, True), (4, False), (6, False)]
    assert result.best_checkpoint.name == "step-00000002"
    assert result.best_val_loss == val[0]["loss"]
    best = json.loads((result.run_dir / "checkpoints" / "best.json").read_text())
    assert best == {"name": "step-00000002", "step": 2, "val_loss": val[0]["loss"]}
    names = sorted(p.name for p in (result.run_dir / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000006"]  # keep_last=1 plus the best


def test_keep_last_prunes_older_checkpoints(make_config):
    result = Trainer(make_config(max_steps=10, ckpt_every=2, eval_every=0, keep_last=2)).fit()
    names = sorted(p.name for p in (result.run_dir / "checkpoints").glob("step-*"))
    assert names == ["step-00000008", "step-00000010"]


def test_eval_reproduces_the_logged_validation_loss(make_config):
    result = Trainer(make_config(max_steps=6, eval_every=3, ckpt_every=3, keep_last=0)).fit()
    val = read_rows(result.run_dir, "val")
    latest = evaluate_run(result.run_dir)
    assert latest["step"] == 6 and latest["val_loss"] == val[-1]["loss"]
    assert latest["ppl"] == pytest.approx(math.exp(val[-1]["loss"]))
    at_3 = evaluate_run(result.run_dir, str(result.run_dir / "checkpoints" / "step-00000003"))
    assert at_3["val_loss"] == val[0]["loss"]
    more = evaluate_run(result.run_dir, batches=4)
    assert more["tokens"] == 2 * latest["tokens"]


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_train_start(self, trainer):
        self.events.append(("start", trainer.step))

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", metrics["step"]))
        if metrics["step"] == self.stop_at:
            trainer.request_stop("enough")

    def on_eval(self, trainer, metrics):
        self.events.append(("eval", metrics["step"]))

    def on_checkpoint(self, trainer, path):
        self.events.append(("checkpoint", int(path.name.split("-")[1])))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result.stop_reason))


def test_callbacks_see_every_event_and_can_stop_the_run(make_config):
    recorder = Recorder(stop_at=5)
    result = Trainer(
        make_config(max_steps=8, eval_every=2, ckpt_every=4, save_best=False), callbacks=[recorder]
    ).fit()
    assert (result.stop_reason, result.step) == ("enough", 5)
    assert recorder.events == [
        ("start", 0),
        ("step", 1),
        ("step", 2),
        ("eval", 2),
        ("step", 3),
        ("step", 4),
        ("eval", 4),
        ("checkpoint", 4),
        ("step", 5),
        ("checkpoint", 5),
        ("end", "enough"),
    ]


def test_clipping_bounds_the_gradient(make_config):
    runs = {}
    for clip in (None, 1e-12):
        config = make_config(
            f"clip{clip}",
            clip_grad=clip,
            max_steps=1,
            weight_decay=0.0,
            warmup_steps=0,
            schedule="constant",
            eval_every=0,
        )
        runs[clip] = Trainer(config).fit().run_dir
    assert read_rows(runs[None])[0]["grad_norm"] == read_rows(runs[1e-12])[0]["grad_norm"]
    torch.manual_seed(0)
    from perfml.models.llama import Llama
    from perfml.train.trainer import model_config

    initial = Llama(model_config(make_config())).state_dict()
    moved = {
        clip: max((final_weights(run)[k] - initial[k]).abs().max().item() for k in initial)
        for clip, run in runs.items()
    }
    # Adam moves every weight by ~lr whatever the gradient's scale, unless the gradient is
    # clipped far below eps
    assert moved[None] == pytest.approx(3e-3, rel=0.05)
    assert moved[1e-12] < 1e-5


def test_activation_checkpointing_changes_nothing_but_memory(make_config):
    runs = [
        Trainer(make_config(f"ac{ac}", activation_checkpointing=ac, max_steps=3, eval_every=0))
        .fit()
        .run_dir
        for ac in (False, True)
    ]
    assert [r["loss"] for r in read_rows(runs[0])] == [r["loss"] for r in read_rows(runs[1])]


def test_fused_model_trains_like_the_unfused_one(make_config):
    # fused=True runs the Triton kernels through the interpreter here: two steps only
    losses = {}
    for fused in (False, True):
        config = make_config(f"fused{fused}", fused=fused, max_steps=2, eval_every=0)
        losses[fused] = [r["loss"] for r in read_rows(Trainer(config).fit().run_dir)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.slow
def test_compile_trains_like_eager(make_config):
    losses = {}
    for compiled in (False, True):
        config = make_config(f"compile{compiled}", compile=compiled, max_steps=3, eval_every=0)
        losses[compiled] = [r["loss"] for r in read_rows(Trainer(config).fit().run_dir)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_deterministic_mode_is_set_for_the_run_and_restored(make_config):
    seen = []

    class Probe(Callback):
        def on_step_end(self, trainer, metrics):
            seen.append(torch.are_deterministic_algorithms_enabled())

    before = torch.are_deterministic_algorithms_enabled()
    Trainer(make_config(deterministic=True, max_steps=2, eval_every=0), callbacks=[Probe()]).fit()
    assert seen == [True, True] and torch.are_deterministic_algorithms_enabled() == before


def test_tensorboard_logger_gets_the_same_rows(make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = Trainer(make_config(loggers=["jsonl", "tensorboard"], max_steps=4)).fit()
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("train/loss")]
    rows = read_rows(result.run_dir)
    assert train == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [e.step for e in events.Scalars("val/loss")] == [4]


def test_mlflow_missing_is_a_clear_error_before_any_work(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    config = make_config(loggers=["jsonl", "mlflow"])
    with pytest.raises(ConfigError, match=r"mlflow package.*pip install 'perfml\[mlflow\]'"):
        Trainer(config).fit()
    assert not Path(config.out_dir).exists()


def test_perfml_optimizer_trains_and_resumes_like_torch_adamw(make_config):
    pytest.importorskip("perfml.optim")
    torch_run = Trainer(make_config("torch", max_steps=6, eval_every=0)).fit()
    config = make_config("perfml", optimizer="perfml", max_steps=6, eval_every=0)
    Trainer(config, callbacks=[SignalAt(3)]).fit()
    resumed = Trainer(config, resume=config.out_dir).fit()
    losses = [r["loss"] for r in read_rows(resumed.run_dir)]
    assert losses == pytest.approx([r["loss"] for r in read_rows(torch_run.run_dir)], rel=1e-5)


def test_perfml_optimizer_missing_is_a_clear_error(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "perfml.optim", None)
    with pytest.raises(ConfigError, match="optimizer: 'perfml' needs perfml.optim"):
        Trainer(make_config(optimizer="perfml")).fit()


def test_a_new_run_refuses_an_existing_run_directory(make_config):
    config = make_config(max_steps=1, eval_every=0)
    Trainer(config).fit()
    with pytest.raises(
        ConfigError, match="already holds a run; continue it with `perfml train --resume"
    ):
        Trainer(config).fit()


def test_resume_on_changed_data_is_refused(make_config, tmp_path):
    config = make_config(max_steps=2, eval_every=0)
    Trainer(config).fit()
    other = tmp_path / "other.txt"
    other.write_text(open(config.data).read() + "\n# one more line\n")
    changed = load_config(tmp_path / "run" / "config.yaml", [f"data={other}", "max_steps=4"])
    with pytest.raises(ConfigError, match="data: the corpus changed since"):
        Trainer(changed, resume=config.out_dir).fit()


def test_resume_from_a_damaged_checkpoint_names_the_file(make_config):
    config = make_config(max_steps=2, eval_every=0)
    result = Trainer(config).fit()
    model_file = result.last_checkpoint / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{model_file}: 100 bytes where DONE records"):
        Trainer(config, resume=config.out_dir).fit()


def test_model_args_errors_name_the_key(make_config):
    with pytest.raises(ConfigError, match="model_args: LlamaConfig: unknown key 'hidden'"):
        Trainer(make_config(model_args={"hidden": 3})).fit()
    with pytest.raises(ConfigError, match="seq_len 100 exceeds the model's max_seq_len 64"):
        Trainer(make_config(seq_len=100)).fit()


class FakeMlflow:
    """The slice of the mlflow API the logger uses, recording the calls."""

    def __init__(self):
        self.calls, self.runs = [], 0

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def start_run(self, run_id=None, run_name=None):
        self.runs += 1
        self.calls.append(("start", run_id, run_name))
        info = type("Info", (), {"run_id": run_id or f"run{self.runs}"})
        return type("Run", (), {"info": info})

    def log_params(self, params):
        self.calls.append(("params", params["lr"]))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", step, sorted(metrics)))

    def end_run(self):
        self.calls.append(("end",))


def test_mlflow_logger_logs_into_one_run_across_a_resume(make_config, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    config = make_config(loggers=["jsonl", "mlflow"], max_steps=4, eval_every=2, ckpt_every=2)
    Trainer(config, callbacks=[SignalAt(2)]).fit()
    run_dir = Path(config.out_dir).resolve()
    assert fake.calls[0] == ("uri", (run_dir / "mlruns").as_uri())
    assert fake.calls[1] == ("start", None, run_dir.name) and fake.calls[2] == ("params", "0.003")
    assert (
        "metrics",
        1,
        [
            "train/elapsed_s",
            "train/grad_norm",
            "train/loss",
            "train/lr",
            "train/mfu",
            "train/tokens",
            "train/tokens_per_s",
        ],
    ) in fake.calls
    assert ("metrics", 2, ["val/best", "val/loss", "val/ppl", "val/tokens"]) not in fake.calls
    assert ("metrics", 2, ["val/loss", "val/ppl", "val/tokens"]) in fake.calls
    assert fake.calls[-1] == ("end",)
    fake.calls.clear()
    Trainer(config, resume=config.out_dir).fit()
    assert fake.calls[1] == ("start", "run1", None)  # the same MLflow run continues
    assert not any(call[0] == "params" for call in fake.calls)  # params are write-once
    assert [c[1] for c in fake.calls if c[0] == "metrics" and "train/loss" in c[2]] == [3, 4]


def test_sigint_stops_like_sigterm_and_a_second_one_aborts(make_config):
    result = Trainer(
        make_config("once", eval_every=0), callbacks=[SignalAt(3, signal.SIGINT)]
    ).fit()
    assert (result.stop_reason, result.step, result.last_checkpoint.name) == (
        "SIGINT",
        3,
        "step-00000003",
    )

    class Twice(Callback):
        def on_step_end(self, trainer, metrics):
            if metrics["step"] == 2:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Trainer(make_config("twice", eval_every=0), callbacks=[Twice()]).fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_progress_bar_shows_loss_speed_mfu_and_eta(make_config, capsys):
    Trainer(make_config(progress=True, max_steps=3, eval_every=3)).fit()
    captured = capsys.readouterr()
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "loss " in last and " tok/s" in last and "MFU " in last
    assert "<00:00" in last  # the remaining-time estimate
    assert "step 3: val loss " in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_without_cuda_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="device: cuda was asked for but no CUDA device"):
        Trainer(make_config(device="cuda")).fit()


# --- a given model: Trainer(config, model=...) ------------------------------------------------


def new_model(config, seed=None, **model_args):
    """The Llama of config's preset with its model_args (and these) overridden, initialized
    from `seed`."""
    from perfml.models.llama import Llama, LlamaConfig

    if seed is not None:
        torch.manual_seed(seed)
    args = {**config.model_args, **model_args}
    return Llama(LlamaConfig.preset(config.model, fused=config.fused, **args))


def test_a_given_model_trains_like_the_one_built_from_the_config(make_config):
    built = Trainer(make_config("built", max_steps=4, eval_every=2)).fit()
    config = make_config("given", max_steps=4, eval_every=2)
    model = new_model(config, seed=config.seed)  # the weights _build_model would draw
    model.eval()  # the trainer puts it in training mode itself
    given = Trainer(config, model=model).fit()
    for split in ("train", "val"):
        keys = ("step", "loss", "lr", "grad_norm")
        a, b = read_rows(built.run_dir, split), read_rows(given.run_dir, split)
        assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    final = final_weights(given.run_dir)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())  # in place
    assert torch.equal(final["norm.weight"], final_weights(built.run_dir)["norm.weight"])
    assert load_checkpoint(built.last_checkpoint).meta["model_source"] == "config"
    assert load_checkpoint(given.last_checkpoint).meta["model_source"] == "given"


def test_the_checkpoint_describes_the_given_model(make_config):
    config = make_config(max_steps=2, eval_every=2)
    model = new_model(config, hidden_size=48, intermediate_size=80, num_heads=4, num_kv_heads=2)
    result = Trainer(config, model=model).fit()
    meta = load_checkpoint(result.last_checkpoint).meta
    assert meta["model_config"] == model.config.to_dict()
    assert meta["model_config"]["hidden_size"] == 48 and config.model_args["hidden_size"] == 32
    # so `perfml eval` rebuilds it and reproduces the logged validation loss
    assert evaluate_run(result.run_dir)["val_loss"] == read_rows(result.run_dir, "val")[-1]["loss"]


def test_resuming_a_given_model_run_needs_a_model_of_its_structure(make_config):
    args = dict(max_steps=6, eval_every=0, ckpt_every=3)
    other = dict(intermediate_size=48)  # not the config's 64
    straight = new_model(make_config(), seed=5, **other)
    Trainer(make_config("straight", **args), model=straight).fit()

    config = make_config("cut", **args)
    stopped = Trainer(config, model=new_model(config, seed=5, **other), callbacks=[SignalAt(3)])
    assert stopped.fit().step == 3
    with pytest.raises(ConfigError, match=r"trained a model passed to Trainer\(model=\.\.\.\)"):
        Trainer(config, resume=config.out_dir).fit()
    with pytest.raises(
        ConfigError,
        match=r"do not fit the model given: layers\.0\.mlp\.gate_proj\.weight is \[48, 32\] in "
        r"the checkpoint, \[64, 32\] in the model",
    ):
        Trainer(config, model=new_model(config), resume=config.out_dir).fit()
    resumed = new_model(config, seed=123, **other)  # other values: the checkpoint's replace them
    assert Trainer(config, model=resumed, resume=config.out_dir).fit().step == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_given_model_is_a_clear_error(make_config):
    config = make_config(max_steps=1, eval_every=0)
    with pytest.raises(TypeError, match="model must be a perfml.models.llama.Llama, got Linear"):
        Trainer(config, model=torch.nn.Linear(2, 2))
    with pytest.raises(
        ConfigError, match=r"model: embed_tokens.weight is torch.bfloat16.*float\(\)"
    ):
        Trainer(config, model=new_model(config).bfloat16())
    with pytest.raises(ConfigError, match="more than the given model's vocab_size 100"):
        Trainer(config, model=new_model(config, vocab_size=100)).fit()
    with pytest.raises(ConfigError, match="seq_len 16 exceeds the given model's max_seq_len 8"):
        Trainer(config, model=new_model(config, max_seq_len=8)).fit()


class BeforeOptimizerStep(Callback):
    """Records, at the hook, the gradient norm and whether the weights are still the last step's."""

    def __init__(self):
        self.events, self.norms, self.unchanged = [], [], []
        self._last = None

    def on_train_start(self, trainer):
        self._last = [p.detach().clone() for p in trainer.model.parameters()]

    def on_before_optimizer_step(self, trainer):
        params = list(trainer.model.parameters())
        self.events.append(("before_optimizer_step", trainer.step + 1))
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))
        self.norms.append(norm.item())
        self.unchanged.append(
            all(torch.equal(p, q) for p, q in zip(params, self._last, strict=True))
        )

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", metrics["step"]))
        self._last = [p.detach().clone() for p in trainer.model.parameters()]


def test_before_optimizer_step_sees_the_unclipped_gradients_before_the_update(make_config):
    hook = BeforeOptimizerStep()
    # clipping far below the gradient norm: a hook after clipping would see a norm of 1e-3
    config = make_config(max_steps=3, eval_every=0, grad_accum=2, clip_grad=1e-3)
    result = Trainer(config, callbacks=[hook]).fit()
    assert hook.events == [(e, s) for s in (1, 2, 3) for e in ("before_optimizer_step", "step")]
    assert hook.unchanged == [True, True, True]
    logged = [r["grad_norm"] for r in read_rows(result.run_dir)]
    assert hook.norms == pytest.approx(logged, rel=1e-5) and min(logged) > 1e-2
