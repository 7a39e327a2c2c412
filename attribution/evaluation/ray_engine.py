"""Ray as the engine for fan-outs (retraining subset models, computing model outputs on them).

- `RayCluster(address)`: a local Ray sized to the machine by default (`address=None` or `local`), or an existing
  cluster (`--ray-address HOST:PORT`, `ray://HOST:PORT`, or $RAY_ADDRESS). An address that does not answer fails within
  `PROBE_TIMEOUT_S` seconds with one line: the GCS port is probed with a plain socket before `ray.init`.
- `task_options()`: one CPU and one torch thread per task on CPU-only machines; a fraction of a GPU per task when
  CUDA is present. Failed tasks are retried (`max_retries` covers a killed worker process, `retry_exceptions` an
  exception raised by the task).
- `ProgressMeter`: done/total with a rate and the time left, sent to a `(done, total, message)` callback like the
  CLI's tqdm bar.
- A task whose retries are used up: the fan-outs quote it with `errors.one_line` (Ray's error carries the worker's
  traceback), keep going with the other tasks and end in one ConfigError line.

Idempotency is the tasks' own business: each checks for its completion marker (written last) before working, and
the driver does not submit work whose outputs exist, so a crash, kill or rerun never redoes a finished task.
Workers import `attribution` from this repository (it is put on their PYTHONPATH); on a multi-node cluster the
repository and the cache must be at the same path on every node (a shared filesystem).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 3.0
MAX_RETRIES = 3
GPU_FRACTION = 0.25  # four small retrains share one GPU


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `ray://HOST:PORT`; one ConfigError line otherwise."""
    rest = address.strip()
    for prefix in ("ray://", "http://", "https://"):
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError (one line) unless something accepts TCP connections at the address's port."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__)
        raise ConfigError(f"no Ray cluster answers at {address} ({reason} within {timeout:.0f} s); start one with "
                          "`ray start --head` or leave out --ray-address to use a local Ray") from None


def worker_env() -> dict[str, str]:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if os.environ.get("ATTRIBUTION_CACHE"):
        env["ATTRIBUTION_CACHE"] = os.environ["ATTRIBUTION_CACHE"]
    return env


class RayCluster:
    """A connection to Ray for the length of a `with` block (a local Ray is started and stopped with it)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = (address or os.environ.get("RAY_ADDRESS", "")).strip() or None
        if self.address is not None and self.address.lower() == "local":  # Ray's own word for a new local Ray
            self.address = None
        self.num_cpus = num_cpus
        self.started_here = False

    def __enter__(self) -> "RayCluster":
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        if self.address:
            probe_address(self.address)
        if ray.is_initialized():
            ray.shutdown()
        runtime_env = {"env_vars": worker_env()}
        if self.address:
            ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False,
                     logging_level="ERROR")
        else:
            # Ray starts its workers at niceness 15 by default; here the fan-out is the job, not background work,
            # so a local Ray's workers run at normal priority (read by the raylet this call starts).
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR",
                     object_store_memory=200 * 2**20)
            self.started_here = True
        return self

    def __exit__(self, *exc) -> None:
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        ray.shutdown()

    def describe(self) -> str:
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        res = ray.cluster_resources()
        where = f"Ray cluster at {self.address}" if self.address else "a local Ray"
        gpus = f", {res.get('GPU', 0):g} GPUs" if res.get("GPU") else ""
        return f"{where} ({res.get('CPU', 0):g} CPUs{gpus})"

    def slots(self) -> int:
        """How many tasks run at once with `task_options()`."""
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        res = ray.cluster_resources()
        if res.get("GPU"):
            return max(1, int(res["GPU"] / GPU_FRACTION))
        return max(1, int(res.get("CPU", 1)))

    def uses_gpu(self) -> bool:
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        return bool(ray.cluster_resources().get("GPU"))

    def task_options(self) -> dict:
        if self.uses_gpu():
            return {"num_cpus": 1, "num_gpus": GPU_FRACTION, "max_retries": MAX_RETRIES, "retry_exceptions": True}
        return {"num_cpus": 1, "max_retries": MAX_RETRIES, "retry_exceptions": True}


def single_thread() -> None:
    """Call first inside a CPU task: one torch thread per task (tasks, not threads, fill the cores)."""
    import torch  # lazy: `--ray-address` is probed before torch loads (fails in under a second)

    torch.set_num_threads(1)


def hardware(device: str = "cpu") -> str:
    """A one-line description of where a task ran."""
    import torch  # lazy: `--ray-address` is probed before torch loads (fails in under a second)

    if device.startswith("cuda") and torch.cuda.is_available():
        what = f"CUDA {torch.cuda.get_device_name(0)}"
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    return f"{what}; {platform.node()}; torch {torch.__version__}"


class ProgressMeter:
    """done/total with a rate and the time left, passed to `callback(done, total, message)`."""

    def __init__(self, total: int, callback: Callable[[int, int, str], None] | None, unit: str = "tasks"):
        self.total, self.callback, self.unit = total, callback, unit
        self.done = 0
        self.start = time.monotonic()

    def message(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.done == 0 or elapsed <= 0:
            return f"{self.done}/{self.total} {self.unit}"
        rate = self.done / elapsed
        left = (self.total - self.done) / rate
        return f"{self.done}/{self.total} {self.unit}, {rate * 60:.2f}/min, {_duration(left)} left"

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.callback:
            msg = self.message()
            self.callback(self.done, self.total, f"{msg}; {note}" if note else msg)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
