"""Prometheus metrics of the engine (namespace `spo_`). prometheus-client directly, no BentoML.

Under `bentoml serve` PROMETHEUS_MULTIPROC_DIR is set for every worker, so these values are written
to per-process files and BentoML's `/metrics` sums them: gauges declare how workers combine.

Every label takes its values from a closed set, so no request can add a series: `size` is a pixel class
(`size_class`), `scheduler`, `reason`, `state` and `device` are enumerations, `adapter` names a loaded adapter
(its series is removed when it is unloaded). The HTTP series BentoML adds are bounded in service/paths.py.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# The `size` label of spo_images_total: the smallest of these squares with at least the image's pixels
# (1152x896 and 1216x832 count as 1024x1024, 640x480 as 768x768); larger images count as the last one.
SIZE_CLASSES = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048)


def size_class(width: int, height: int) -> str:
    """The `size` label of an image: 'NxN', the smallest class holding width x height pixels."""
    pixels = width * height
    side = next((s for s in SIZE_CLASSES if pixels <= s * s), SIZE_CLASSES[-1])
    return f"{side}x{side}"


class Metrics:
    def __init__(self, registry=None):
        kw = {"namespace": "spo"} | ({"registry": registry} if registry is not None else {})
        self.queue_depth = Gauge("queue_depth", "Images waiting for a batch slot", multiprocess_mode="livesum", **kw)
        self.running = Gauge("running_images", "Images in the running batch", multiprocess_mode="livesum", **kw)
        self.queue_cost = Gauge("queue_cost", "Cost of the waiting and running images (UNet passes over a default-size "
                                "image still to run), what SPO_MAX_QUEUE_COST bounds", multiprocess_mode="livesum", **kw)
        self.batch_size = Histogram("batch_size", "Images per UNet step", buckets=BATCH_BUCKETS, **kw)
        self.step_seconds = Histogram("step_seconds", "Seconds per denoising step (one UNet call)", buckets=STEP_BUCKETS, **kw)
        self.queue_wait = Histogram("queue_wait_seconds", "Seconds from submit to admission", buckets=LATENCY_BUCKETS, **kw)
        self.encode = Histogram("encode_seconds", "Seconds of text encoding per admitted request", buckets=LATENCY_BUCKETS, **kw)
        self.denoise = Histogram("denoise_seconds", "Seconds from admission to the last step", buckets=LATENCY_BUCKETS, **kw)
        self.decode = Histogram("decode_seconds", "Seconds of VAE decoding per finished request", buckets=LATENCY_BUCKETS, **kw)
        self.images = Counter("images_total", "Images generated, by size class (size_class) and scheduler", ["size", "scheduler"], **kw)
        self.rejected = Counter("rejected_total", "Requests refused or failed, by reason", ["reason"], **kw)
        self.lora_scale = Gauge("default_lora_scale", "Current default LoRA scale", multiprocess_mode="mostrecent", **kw)
        self.adapters = Gauge("adapters_loaded", "Loaded LoRA adapters", multiprocess_mode="max", **kw)
        self.adapter_bytes = Gauge("adapter_memory_bytes", "Memory of the loaded adapters", ["adapter"], multiprocess_mode="max", **kw)
        self.mem_allocated = Gauge("device_memory_allocated_bytes", "Device memory allocated by tensors", ["device"], multiprocess_mode="livesum", **kw)
        self.mem_reserved = Gauge("device_memory_reserved_bytes", "Device memory reserved by the allocator", ["device"], multiprocess_mode="livesum", **kw)
        self.train_jobs = Gauge("train_jobs", "Training jobs by state", ["state"], multiprocess_mode="max", **kw)
        self.train_round = Histogram("train_round_seconds", "Seconds per SPO training round", buckets=LATENCY_BUCKETS, **kw)


@lru_cache(maxsize=1)
def default_metrics() -> Metrics:
    """The process-wide metrics in prometheus_client's default registry (created once)."""
    return Metrics()
