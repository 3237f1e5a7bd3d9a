"""What this CPU can do: matmul and convolution GFLOP/s in float32 and bfloat16.

The result is also kept in the cache (`peak.json`) so that other benchmarks report the fraction of
the peak they reach.
"""

from __future__ import annotations

import json
import time

from benchmarks.harness import benchmark
from experiments.cache import cache_dir

PEAK_FILE = "peak.json"


def _gflops(fn, flops: float, seconds: float) -> float:
    fn()  # trace and warm up
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn().numpy()  # .numpy() waits for the result
        count += 1
    return flops * count / (time.perf_counter() - start) / 1e9


@benchmark("peak", "Peak matmul and 3x3-conv throughput of this CPU in GFLOP/s, float32 and bfloat16")
def peak(seconds: float = 5.0, size: int = 2048, batch: int = 128) -> list[dict]:
    import tensorflow as tf

    rows = []
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.random.normal((size, size), dtype=tf.float32)
        a = tf.cast(a, dtype)
        matmul = tf.function(lambda: tf.matmul(a, a))
        rows.append({"op": f"matmul {size}x{size}", "dtype": dtype.name,
                     "gflops": _gflops(matmul, 2 * size**3, seconds)})

        # A CIFAR-scale layer (32x32 maps, 128 -> 128 channels) and a VGG16-scale one (block 3 at 160 px:
        # 40x40, 256 -> 256), forward only: the wider one runs nearer the peak, so the peak is the best.
        for images_shape, channels in (((batch, 32, 32), 128), ((max(1, batch // 4), 40, 40), 256)):
            images = tf.cast(tf.random.normal((*images_shape, channels)), dtype)
            kernel = tf.cast(tf.random.normal((3, 3, channels, channels)), dtype)
            conv = tf.function(lambda images=images, kernel=kernel: tf.nn.conv2d(images, kernel, 1, "SAME"))
            n, height, width = images_shape
            rows.append({"op": f"conv3x3 {n}x{height}x{width}x{channels}->{channels}", "dtype": dtype.name,
                         "gflops": _gflops(conv, 2 * n * height * width * channels * channels * 9, seconds)})
    best = {dtype: max(r["gflops"] for r in rows if r["dtype"] == dtype) for dtype in ("float32", "bfloat16")}
    path = cache_dir() / PEAK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(best))
    tmp.replace(path)
    return rows


def measured_peak() -> dict:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s} from the last `peak` run, or {} if it never ran."""
    try:
        return json.loads((cache_dir() / PEAK_FILE).read_text())
    except (OSError, ValueError):
        return {}
