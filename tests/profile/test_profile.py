"""perfml.profile: a profiled run of the reference LM on CPU (report, Markdown, trace, roofline
from the bench formulas, memory), the time split and roofline arithmetic on synthetic events,
the NVML sampler against a fake nvidia-ml-py, and `perfml profile` for a training config."""

import json
import math
import types

import pytest
import torch

from perfml import cli
from perfml.bench.cost import (
    cross_entropy_bytes,
    linear_cross_entropy_flops,
    rms_norm_bytes,
    rope_bytes,
)
from perfml.profile import analysis, nvml, profile_forward, report, roofline
from perfml.profile.capture import StepProfiler

STEPS = 2


@pytest.fixture(scope="module")
def forward_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    r = profile_forward(
        "tiny", out, steps=STEPS, wait=1, warmup=1, device="cpu", batch=2, seq=16,
        model_args={"num_layers": 1},
    )  # fmt: skip
    return r, out


def test_report_files_are_written(forward_report):
    r, out = forward_report
    page = (out / report.HTML_FILE).read_text()
    summary = (out / report.MARKDOWN_FILE).read_text()
    trace = json.loads((out / "trace.json").read_text())
    assert page.count('src="data:image/png;base64,') >= 4  # split, top ops, roofline, memory
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "not available: no GPU" in page and "not available: no GPU" in summary
    steps = [e for e in trace["traceEvents"] if str(e.get("name")).startswith("ProfilerStep#")]
    assert len(steps) == STEPS  # only the active steps are recorded
    assert len(r.step_ms) == STEPS and all(ms > 0 for ms in r.step_ms)
    assert f"{r.split.compute_ms:.2f} ms" in summary
    assert r.workload.tokens_per_step == 32 and r.tokens_per_s > 0


def test_time_split_covers_the_steps(forward_report):
    r, _ = forward_report
    split = r.split
    assert split.window_ms == pytest.approx(sum(r.step_ms), rel=1e-6)
    assert split.compute_ms + split.memory_ms + split.idle_ms == pytest.approx(split.window_ms)
    assert split.compute_ms > 0.5 * split.window_ms  # a forward pass is mostly ops


def test_top_ops_and_roofline_use_the_bench_formulas(forward_report):
    r, _ = forward_report
    names = [e.name for e in r.top]
    assert "perfml::rms_norm_fwd" in names and not any(n.startswith("ProfilerStep") for n in names)
    assert r.ceilings["copy_gbps"] > 0
    rows = {row.op: row for row in r.roofline}
    norm = rows["perfml::rms_norm_fwd"]
    assert norm.calls == 2 * STEPS  # the layer's input norm and the final norm
    assert norm.bytes_per_call == rms_norm_bytes((2, 16, 128), torch.float32, "fwd")
    assert norm.gbps == pytest.approx(norm.bytes_per_call / (norm.ms_per_call * 1e-3) / 1e9)
    assert norm.pct_of_copy == pytest.approx(100 * norm.gbps / r.ceilings["copy_gbps"])
    rope = rows["perfml::rope_fwd"]
    assert rope.bytes_per_call == rope_bytes((2, 4, 2, 16, 32), torch.float32, "fwd")
    matmuls = [row for row in r.roofline if row.op == "aten::mm"]
    assert matmuls and all(row.tflops > 0 and row.gbps is None for row in matmuls)


def test_memory_peak_and_timeline(forward_report):
    r, _ = forward_report
    assert r.memory_mib and len(r.memory_ms) == len(r.memory_mib)
    assert r.peak_mib == max(r.memory_mib) > 0
    # the logits of one step, 2 x 16 x 257 fp32, were allocated inside the window
    assert r.peak_mib >= 2 * 16 * 257 * 4 / 2**20


# --- the arithmetic, on synthetic traces and events --------------------------------------------


def _x(name, ts, dur, cat="cpu_op", tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_cpu_time_split_on_a_synthetic_trace():
    trace = {
        "traceEvents": [
            _x("ProfilerStep#2", 0, 100, cat="user_annotation"),
            _x("ProfilerStep#3", 100, 100, cat="user_annotation"),
            _x("aten::linear", 10, 40),  # 10..50, top level
            _x("aten::copy_", 20, 10),  # nested in linear: not top level
            _x("aten::add", 40, 15, tid=2),  # another thread, overlaps linear: 50..55 new
            _x("aten::copy_", 60, 10),  # memory 60..70
            _x("aten::mul", 120, 30),  # compute 120..150
            _x("aten::empty", 190, 30),  # memory, clipped to the window: 190..200
        ]
    }
    split = analysis.time_split(trace, torch.device("cpu"))
    assert split.window_ms == pytest.approx(0.200)
    assert split.compute_ms == pytest.approx(0.045 + 0.030)
    assert split.memory_ms == pytest.approx(0.010 + 0.010)
    assert split.idle_ms == pytest.approx(0.200 - 0.095)


def test_cuda_time_split_on_a_synthetic_trace():
    trace = {
        "traceEvents": [
            _x("ProfilerStep#1", 0, 100, cat="user_annotation"),
            _x("gemm", 10, 20, cat="kernel"),  # 10..30
            _x("norm", 25, 15, cat="kernel"),  # 25..40
            _x("Memcpy DtoD", 35, 15, cat="gpu_memcpy"),  # only 40..50 is copy-only
            _x("late", 110, 10, cat="kernel"),  # the GPU ran past the CPU step: window to 120
        ]
    }
    split = analysis.time_split(trace, torch.device("cuda"))
    assert split.window_ms == pytest.approx(0.120)
    assert split.compute_ms == pytest.approx(0.030 + 0.010)
    assert split.memory_ms == pytest.approx(0.010)
    assert split.idle_ms == pytest.approx(0.070)


def _event(name, shapes, dtypes, us, concrete=(), flops=0, parent=None):
    return types.SimpleNamespace(
        name=name, input_shapes=shapes, input_dtypes=dtypes, concrete_inputs=list(concrete),
        cpu_time_total=us, device_time_total=us, flops=flops, cpu_parent=parent,
    )  # fmt: skip


def test_roofline_rows_from_synthetic_events():
    bf16 = "c10::BFloat16"
    fwd = _event("perfml::rms_norm_fwd", [[8, 1024], [1024]], [bf16, bf16], 10.0)
    events = [
        fwd,
        _event("perfml::rms_norm_fwd", [[8, 1024], [1024]], [bf16, bf16], 2.0, parent=fwd),
        _event("perfml::rms_norm_bwd", [[8, 1024]] * 2 + [[1024], [8]], [bf16] * 3, 20.0),
        _event(
            "perfml::rope_fwd",
            [[2, 16, 4, 64], [2, 16, 2, 64], [1, 16, 64], [1, 16, 64], []],
            [bf16] * 4,
            5.0,
            concrete=["", "", "", "", "", "2"],  # unsqueeze_dim=2: [B, T, H, D]
        ),
        _event(
            "perfml::cross_entropy_fwd",
            [[4, 8, 1000], [32]],
            [bf16, "long int"],
            8.0,
            concrete=["", "", "-100", "mean", "0.", "0.", "", "True"],  # computes the grad
        ),
        _event(
            "perfml::linear_cross_entropy_fwd",
            [[32, 64], [1000, 64], [32]],
            ["float", "float"],
            40.0,
            concrete=[""] * 11 + ["True", "False", "False"],
        ),
        _event("aten::mm", [[64, 64], [64, 64]], ["float", "float"], 4.0, flops=2 * 64**3),
    ]
    ceilings = {"copy_gbps": 100.0, "matmul_fp32_tflops": 0.5}
    rows = {r.op: r for r in roofline.roofline_rows(events, torch.device("cpu"), ceilings)}
    assert rows["perfml::rms_norm_fwd"].calls == 1  # its inner same-name record is skipped
    b = torch.bfloat16
    assert rows["perfml::rms_norm_fwd"].bytes_per_call == rms_norm_bytes((8, 1024), b, "fwd")
    assert rows["perfml::rms_norm_fwd"].gbps == pytest.approx(
        rms_norm_bytes((8, 1024), b, "fwd") / 10e-6 / 1e9
    )
    assert rows["perfml::rms_norm_bwd"].bytes_per_call == rms_norm_bytes(
        (8, 1024), b, "fwd+bwd"
    ) - rms_norm_bytes((8, 1024), b, "fwd")
    assert rows["perfml::rope_fwd"].bytes_per_call == rope_bytes((2, 4, 2, 16, 64), b, "fwd")
    assert rows["perfml::cross_entropy_fwd"].bytes_per_call == cross_entropy_bytes(
        (32, 1000), b, "fwd+bwd"
    )
    lce = rows["perfml::linear_cross_entropy_fwd"]
    assert lce.flops_per_call == linear_cross_entropy_flops((32, 64, 1000), "fwd+bwd")
    mm = rows["aten::mm"]
    assert mm.tflops == pytest.approx(2 * 64**3 / 4e-6 / 1e12)
    assert mm.pct_of_matmul == pytest.approx(100 * mm.tflops / 0.5)


# --- NVML --------------------------------------------------------------------------------------


class FakeNvml:
    """The slice of pynvml the sampler calls; power is 'not supported' on this board."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        self.shut_down = False
        self.uuid = None

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.uuid = uuid
        return "handle"

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlDeviceGetPowerUsage(self, handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=87)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61


def test_nvml_sampler_reads_every_field_it_can(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setattr(nvml, "_import_pynvml", lambda: fake)
    props = types.SimpleNamespace(uuid="1234-abcd")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    sampler = nvml.NvmlSampler(torch.device("cuda", 0), interval_s=0.01)
    sampler.start()
    import time

    time.sleep(0.1)
    sampler.stop()
    assert sampler.unavailable is None and fake.shut_down
    assert fake.uuid == "GPU-1234-abcd" and sampler.gpu_name == "Fake H100"
    assert len(sampler.samples) >= 3
    last = sampler.samples[-1]
    assert last["power_w"] is None  # not supported: recorded as missing, sampling goes on
    assert last["memory_used_mib"] == 3072 and last["gpu_busy_pct"] == 87
    assert last["sm_clock_mhz"] == 1980 and last["memory_clock_mhz"] == 2619
    assert last["temperature_c"] == 61
    ts = [s["t"] for s in sampler.samples]
    assert ts == sorted(ts)


def test_nvml_unavailable_reasons(monkeypatch):
    cpu = nvml.NvmlSampler(torch.device("cpu"))
    cpu.start()
    cpu.stop()
    assert cpu.unavailable == "no GPU: the profiled work ran on cpu" and not cpu.samples

    def missing():
        raise ImportError("no pynvml")

    monkeypatch.setattr(nvml, "_import_pynvml", missing)
    no_package = nvml.NvmlSampler(torch.device("cuda", 0))
    no_package.start()
    assert "nvidia-ml-py is not installed" in no_package.unavailable

    broken = FakeNvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("Driver Not Loaded"))
    monkeypatch.setattr(nvml, "_import_pynvml", lambda: broken)
    no_driver = nvml.NvmlSampler(torch.device("cuda", 0))
    no_driver.start()
    assert no_driver.unavailable == "NVML could not start: Driver Not Loaded"


def test_report_renders_nvml_samples(forward_report, tmp_path):
    r, _ = forward_report
    samples = [
        {"t": 0.05 * i, "power_w": 300.0 + i, "memory_used_mib": 1000.0, "gpu_busy_pct": 90.0,
         "sm_clock_mhz": 1980.0, "memory_clock_mhz": None, "temperature_c": 60.0 + i}
        for i in range(10)
    ]  # fmt: skip
    with_gpu = report.ProfileReport(
        **{**vars(r), "nvml_samples": samples, "nvml_unavailable": None}
    )
    page = report.render_html(with_gpu)
    assert 'alt="NVML samples"' in page and "not available" not in page
    summary = report.render_markdown(with_gpu)
    assert "| power (W) | 300.0 | 304.5 | 309.0 |" in summary
    assert "memory clock" not in summary  # a field with no reading is left out


def test_step_profiler_rejects_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="at least one active step"):
        StepProfiler(torch.device("cpu"), tmp_path, wait=1, warmup=1, active=0)


def test_step_profiler_keeps_the_native_profiler_noise_off_stderr(tmp_path, capfd):
    """The profiler library prints USDT/STAGE lines to file descriptor 2 at start and stop; they
    are dropped, while anything else written to stderr in the profiled steps still shows."""
    import os

    prof = StepProfiler(torch.device("cpu"), tmp_path, wait=0, warmup=0, active=1)
    capfd.readouterr()
    step = prof.profiler.step
    # written from inside the filtered region, as a library warning during a step would be
    prof.profiler.step = lambda: (os.write(2, b"a real warning\n"), step())
    prof.start()
    torch.ones(4).sum()
    prof.step()
    prof.stop()
    err = capfd.readouterr().err
    assert "USDT:" not in err and "STAGE:" not in err
    assert "a real warning" in err


# --- the command -------------------------------------------------------------------------------


def test_cli_profiles_a_training_config(tmp_path, capsys):
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((stdlib / "textwrap.py").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: tiny\n"
        "model_args: {hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2,"
        " num_kv_heads: 1, max_seq_len: 64}\n"
        f"data: {corpus}\ncache_dir: {tmp_path / 'cache'}\n"
        "seq_len: 16\nbatch_size: 2\nprecision: fp32\ndevice: cpu\n"
    )
    out = tmp_path / "prof"
    argv = ["profile", "--config", str(config), "--set", "fused=true", "--steps", "2",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training steps of Llama tiny (fused)" in printed and "tokens/s" in printed
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    summary = (out / "summary.md").read_text()
    # the backward kernels are on the roofline too
    assert "perfml::rms_norm_bwd" in summary and "perfml::glu_bwd_inplace" in summary
    trace = json.loads((out / "trace.json").read_text())
    assert sum(str(e.get("name")).startswith("ProfilerStep#") for e in trace["traceEvents"]) == 2
    assert math.isfinite(float(printed.split(" ms/step")[0].split()[-1]))
    # the profiled run is a documented part of the output, and the command says where it is
    assert (out / "run" / "config.yaml").is_file() and f"run      {out / 'run'}" in printed


def test_cli_profile_usage_errors(tmp_path, capsys):
    assert cli.main(["profile", "--model", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert cli.main(["profile", "--model", "tiny", "--set", "lr=1", "--out", str(tmp_path)]) == 2
    assert "use it with --config" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_profile_attributes_kernels_and_samples_nvml(tmp_path):
    r = profile_forward(
        "tiny", tmp_path, steps=3, device="cuda", batch=4, seq=128, dtype=torch.bfloat16
    )
    assert r.split.compute_ms > 0 and r.split.window_ms >= r.split.compute_ms
    assert r.top and not any(e.name.startswith(("aten::", "perfml::")) for e in r.top)
    norm = next(row for row in r.roofline if row.op == "perfml::rms_norm_fwd")
    assert norm.dtype == "bfloat16" and norm.gbps > 0 and norm.pct_of_copy > 0
    assert r.peak_mib > 0 and r.memory_mib
    page = (tmp_path / report.HTML_FILE).read_text()
    if r.nvml_unavailable is None:
        assert len(r.nvml_samples) >= 2 and 'alt="NVML samples"' in page
    else:  # only an image without nvidia-ml-py may lack the samples
        assert "nvidia-ml-py" in r.nvml_unavailable
