"""NVML samples over time (power, memory used, utilization, clocks, temperature) from a background
thread, through nvidia-ml-py (`import pynvml`).

The sampler reads the GPU the profiled tensors live on, found by UUID (so CUDA_VISIBLE_DEVICES
renumbering cannot point it at another card), every `interval_s` seconds while the profiled steps
run. NVML's "utilization.gpu" is the share of the last sample period during which at least one
kernel was running on the GPU: it says the GPU was busy, not how many SMs were (a one-block kernel
counts as 100%); the report labels it that way. A field the board does not report (power on some
cards) is None in every sample; a machine without a GPU, without nvidia-ml-py or whose driver
refuses NVML gets `unavailable` set to the reason and no samples.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

# (sample key, label for the report)
FIELDS = (
    ("power_w", "power (W)"),
    ("memory_used_mib", "memory used (MiB)"),
    ("gpu_busy_pct", "GPU busy (%): NVML utilization.gpu, time with a kernel running"),
    ("sm_clock_mhz", "SM clock (MHz)"),
    ("memory_clock_mhz", "memory clock (MHz)"),
    ("temperature_c", "temperature (C)"),
)


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


class NvmlSampler:
    """start() / stop() around the work; then `samples` (dicts with "t" in seconds since start
    and the FIELDS keys) or `unavailable` (why there are none)."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[dict[str, float | None]] = []
        self.unavailable: str | None = None
        self.gpu_name: str | None = None
        self.t0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def _open(self) -> str | None:
        """Initialize NVML for self.device; the reason it cannot be used, or None."""
        if self.device.type != "cuda":
            return f"no GPU: the profiled work ran on {self.device.type}"
        try:
            nvml = _import_pynvml()
        except ImportError:
            return "nvidia-ml-py is not installed (pip install 'perfml[profile]')"
        try:
            nvml.nvmlInit()
        except Exception as exc:  # pynvml raises its own NVMLError subclasses
            return f"NVML could not start: {exc}"
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            )
        except Exception:  # older drivers spell UUIDs differently: fall back to the index
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._nvml, self._handle = nvml, handle
        name = nvml.nvmlDeviceGetName(handle)
        self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        return None

    def _read(self) -> dict[str, float | None]:
        nvml, h = self._nvml, self._handle
        readers = {
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "memory_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "gpu_busy_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            "sm_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
            "memory_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)),
            "temperature_c": lambda: float(
                nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            ),
        }
        sample: dict[str, float | None] = {"t": time.perf_counter() - self.t0}
        for key, read in readers.items():
            try:
                sample[key] = read()
            except Exception:  # NVMLError_NotSupported and friends: this board lacks the field
                sample[key] = None
        return sample

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.unavailable = self._open()
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._run, name="perfml-nvml", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.samples.append(self._read())  # the state right at the end
            self._nvml.nvmlShutdown()
