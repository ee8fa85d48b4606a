"""Worker of test_finetune's torchrun test: `python -m torch.distributed.run --nproc_per_node 2
-m tests.sparsity.dist_finetune PARALLEL CORPUS ROOT` fine-tunes a magnitude-pruned model on two
CPU processes (gloo); rank 0 writes ROOT/PARALLEL.json: whether the last checkpoint's zeros are
the pruned ones and which fraction of the kept weights moved."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from perfml import sparsity
from perfml.models.llama import Llama, LlamaConfig
from perfml.train import TrainConfig

MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_seq_len": 64,
}


def main(parallel: str, corpus: str, root: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every rank prunes the same weights
    model = Llama(LlamaConfig.preset("tiny", fused=False, **MODEL))
    sparsity.prune(model, sparsity.MagnitudeConfig(amount=0.5))
    before = {
        f"{fqn}.weight": m.weight.detach().clone()
        for fqn, m in model.named_modules()
        if sparsity.default_filter(m, fqn)
    }
    config = TrainConfig(
        model="tiny",
        model_args=MODEL,
        fused=False,
        data=corpus,
        cache_dir=str(root / "cache"),
        seq_len=16,
        batch_size=2,
        max_steps=4,
        lr=3e-3,
        warmup_steps=0,
        precision="fp32",
        device="cpu",
        eval_every=2,
        eval_batches=2,
        ckpt_every=2,
        progress=False,
        parallel=parallel,
        out_dir=str(root / parallel),
    )
    result = sparsity.finetune(model, config)
    if int(os.environ.get("RANK", "0")) != 0:  # (the trainer has closed the process group)
        return
    saved = load_file(str(result.last_checkpoint / "model.safetensors"))
    report = {"step": result.step, "same_zeros": {}, "moved": {}}
    for name, w0 in before.items():
        zeros = w0 == 0
        report["same_zeros"][name] = bool(torch.equal(saved[name] == 0, zeros))
        report["moved"][name] = (saved[name][~zeros] != w0[~zeros]).float().mean().item()
    (root / f"{parallel}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
