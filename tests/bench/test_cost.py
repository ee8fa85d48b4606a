"""perfml.bench.cost: the byte/FLOP formulas against counts derived by hand for tiny shapes, the
cases and the roofline using them, and the module standing alone (no case registered by it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perfml.bench import cost, get_case
from perfml.profile import roofline

ROOT = Path(__file__).resolve().parents[2]


def test_rms_norm_bytes():
    m, n = 3, 5
    # fwd: x read, y written (M*N each), w read (N); fp32 = 4 bytes
    assert cost.rms_norm_bytes((m, n), torch.float32, "fwd") == 4 * (2 * m * n + n)
    # bwd adds x, dy read and dx written (3*M*N), w read and dw written (2*N); bf16 = 2 bytes
    want = 2 * (2 * m * n + n) + 2 * (3 * m * n + 2 * n)
    assert cost.rms_norm_bytes((m, n), torch.bfloat16, "fwd+bwd") == want
    # leading dims fold into M
    assert cost.rms_norm_bytes((2, 3, n), torch.float32, "fwd") == 4 * (2 * 6 * n + n)


def test_add_rms_norm_and_layer_norm_bytes():
    m, n = 4, 7
    # x, residual read; y, s written; w read
    assert cost.add_rms_norm_bytes((m, n), torch.float32, "fwd") == 4 * (4 * m * n + n)
    # x read, y written, w and b read
    assert cost.layer_norm_bytes((m, n), torch.float16, "fwd") == 2 * (2 * m * n + 2 * n)
    # bwd: x, dy read, dx written; w read, dw and db written
    bwd = 2 * (3 * m * n + 3 * n)
    assert cost.layer_norm_bytes((m, n), torch.float16, "fwd+bwd") == 2 * (2 * m * n + 2 * n) + bwd


def test_elementwise_and_loss_bytes():
    shape = (2, 3, 4)
    elems = 2 * 3 * 4
    assert cost.softmax_bytes(shape, torch.float32, "fwd") == 4 * 2 * elems  # x in, y out
    assert cost.softmax_bytes(shape, torch.float32, "fwd+bwd") == 4 * 5 * elems  # + y, dy, dx
    assert cost.glu_bytes(shape, torch.bfloat16, "fwd") == 2 * 3 * elems  # gate, up, y
    assert cost.glu_bytes(shape, torch.bfloat16, "fwd+bwd") == 2 * 8 * elems  # + 3 in, 2 out
    n, v = 6, 11
    # logits read once (bf16) and int64 targets; fwd+bwd also writes the logits' gradient
    assert cost.cross_entropy_bytes((n, v), torch.bfloat16, "fwd") == 2 * n * v + 8 * n
    assert cost.cross_entropy_bytes((n, v), torch.bfloat16, "fwd+bwd") == 4 * n * v + 8 * n


def test_rope_bytes():
    b, hq, hk, t, d = 2, 4, 2, 3, 8
    qk = b * (hq + hk) * t * d  # elements of q and k together
    fwd = 4 * (2 * qk + 2 * t * d)  # q, k in; q_embed, k_embed out; cos, sin in
    assert cost.rope_bytes((b, hq, hk, t, d), torch.float32, "fwd") == fwd
    assert cost.rope_bytes((b, hq, hk, t, d), torch.float32, "fwd+bwd") == 2 * fwd


def test_matmul_formulas():
    m, n, k = 2, 3, 128
    assert cost.matmul_flops((m, n, k), "fwd") == 2 * m * n * k
    assert cost.linear_cross_entropy_flops((m, k, n), "fwd") == 2 * m * k * n
    assert cost.linear_cross_entropy_flops((m, k, n), "fwd+bwd") == 3 * 2 * m * k * n
    # int8 per channel, bf16 activations: x and y in bf16, one byte per weight, one scale per row
    int8 = cost.weight_only_matmul_bytes(1.0, None)
    assert int8((m, n, k), torch.bfloat16, "fwd") == 2 * (m * k + m * n) + n * k + 2 * n
    # int4 per group of 64: half a byte per weight, a bf16 scale and a uint8 zero per group
    int4 = cost.weight_only_matmul_bytes(0.5, 64)
    groups = n * (k // 64)
    assert int4((m, n, k), torch.bfloat16, "fwd") == 2 * (m * k + m * n) + n * k // 2 + 3 * groups
    # K = 65: a partial second group still has its scale and zero (2 groups per row); the
    # packed weight rounds its half byte per element down (3 * 65 / 2 = 97.5 -> 97)
    want = 2 * (m * 65 + m * n) + (n * 65) // 2 + 3 * n * 2
    assert int4((m, n, 65), torch.bfloat16, "fwd") == want


def test_adamw_bytes_count_seven_accesses_per_parameter():
    numel = sum(torch.Size(s).numel() for s in cost.gpt2_shapes(1))
    assert cost.adamw_bytes((1, 2), torch.float32, "fwd") == 7 * 4 * 2 * numel


def test_train_step_preset_and_flops():
    from perfml.models.llama import Llama, LlamaConfig

    assert [cost.preset_for(t) for t in (64, 257, 2048)] == ["tiny", "small", "llama-1b"]
    with pytest.raises(ValueError, match="4096 tokens"):
        cost.preset_for(4096)
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("tiny"))
    assert cost.train_step_flops((3, 10), "fwd+bwd") == model.flops_per_token(10) * 30


@pytest.mark.parametrize(
    "case, formula",
    [
        ("rms_norm", cost.rms_norm_bytes),
        ("add_rms_norm", cost.add_rms_norm_bytes),
        ("layer_norm", cost.layer_norm_bytes),
        ("softmax", cost.softmax_bytes),
        ("cross_entropy", cost.cross_entropy_bytes),
        ("rope", cost.rope_bytes),
        ("swiglu", cost.glu_bytes),
        ("adamw", cost.adamw_bytes),
    ],
)
def test_cases_use_the_cost_formulas(case, formula):
    assert get_case(case).bytes is formula


def test_flop_cases_use_the_cost_formulas():
    assert get_case("linear_cross_entropy").flops is cost.linear_cross_entropy_flops
    assert get_case("sparse24_linear").flops is cost.matmul_flops
    assert get_case("quant_int8_matmul").flops is cost.matmul_flops
    assert get_case("train_step").flops is cost.train_step_flops


def test_roofline_uses_the_cost_formulas():
    assert roofline.TRAFFIC["perfml::rms_norm_fwd"].formula is cost.rms_norm_bytes
    assert roofline.TRAFFIC["perfml::glu_bwd"].formula is cost.glu_bytes


def test_cost_imports_no_case_and_no_profile():
    code = (
        "import json, sys\n"
        "import perfml.bench.cost as c\n"
        "c.rms_norm_bytes((4, 4), __import__('torch').float32, 'fwd')\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.startswith(('perfml.bench.cases', 'perfml.profile')))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
