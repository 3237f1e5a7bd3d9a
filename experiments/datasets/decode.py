"""Image files decoded once into a tf.data cache: resized uint8, with unreadable files skipped and counted."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from experiments.datasets import Split

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module load
MIN_IMAGE_SIDE = 8  # smaller files (icons, 1x1 tracking pixels) carry no class: skipped and counted
# Larger files are skipped and counted before decoding (a decompression bomb would exhaust memory).
MAX_IMAGE_PIXELS = int(os.environ.get("CNN_MAX_IMAGE_PIXELS", 2**26))


def image_split(paths: list[str], labels: np.ndarray, root: Path, size: int, channels: int) -> Split:
    """Decode every file once into a tf.data cache, dropping (and counting) unreadable ones."""
    import tensorflow as tf

    def decode(path, label):
        contents = tf.io.read_file(path)
        tf.debugging.assert_less_equal(_declared_pixels(contents), tf.constant(MAX_IMAGE_PIXELS, tf.int64))
        # BMP and GIF decode to 3 channels only; greyscale datasets convert after.
        image = tf.io.decode_image(contents, channels=3 if channels == 1 else channels, expand_animations=False)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        tf.debugging.assert_greater_equal(tf.reduce_min(tf.shape(image)[:2]), MIN_IMAGE_SIDE)
        image = tf.image.resize(image, (size, size))
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    images = (
        tf.data.Dataset.from_tensor_slices((paths, labels))
        .map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .cache()
    )
    # One pass fills the cache (the first epoch would do it anyway) and tells which files decoded.
    kept = _fill_cache(images, len(paths), f"decoding {len(paths)} images from {root}")
    # ignore_errors() hides the length from Keras; we know it now.
    images = images.apply(tf.data.experimental.assert_cardinality(len(kept)))
    return Split(images=images, labels=kept, digest=_files_digest(paths, labels, root), skipped=len(paths) - len(kept))


def _declared_pixels(contents):
    """Width x height from a JPEG's, PNG's or WebP's header, without decoding (0 for other formats)."""
    import tensorflow as tf

    def png():
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 16, 8), tf.uint8), tf.int64)
        width = header[0] * 2**24 + header[1] * 2**16 + header[2] * 2**8 + header[3]
        height = header[4] * 2**24 + header[5] * 2**16 + header[6] * 2**8 + header[7]
        return width * height

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return shape[0] * shape[1]

    is_png = tf.logical_and(tf.strings.length(contents) >= 24,
                            tf.equal(tf.strings.substr(contents, 0, 8), b"\x89PNG\r\n\x1a\n"))
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")
    riff_type = tf.strings.substr(contents, 0, 4) + tf.strings.substr(contents, 8, 4)
    is_webp = tf.logical_and(tf.strings.length(contents) >= 30, tf.equal(riff_type, b"RIFFWEBP"))
    return tf.case([(is_png, png), (is_jpeg, jpeg), (is_webp, lambda: _webp_pixels(contents))],
                   default=lambda: tf.constant(0, tf.int64))


def _webp_pixels(contents):
    """Width x height from a WebP's first chunk: the canvas (VP8X), or a lossless (VP8L) or lossy (VP8) frame."""
    import tensorflow as tf

    b = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 20, 10), tf.uint8), tf.int64)  # the chunk's data
    chunk = tf.strings.substr(contents, 12, 4)

    def extended():  # 24-bit canvas width - 1 and height - 1
        return (1 + b[4] + b[5] * 2**8 + b[6] * 2**16) * (1 + b[7] + b[8] * 2**8 + b[9] * 2**16)

    def lossless():  # after the 0x2f signature: 14 bits of width - 1, then 14 of height - 1
        bits = b[1] + b[2] * 2**8 + b[3] * 2**16 + b[4] * 2**24
        return (bits % 2**14 + 1) * (bits // 2**14 % 2**14 + 1)

    def lossy():  # after the frame tag and start code: 14-bit width and height
        return ((b[6] + b[7] * 2**8) % 2**14) * ((b[8] + b[9] * 2**8) % 2**14)

    return tf.case([(tf.equal(chunk, b"VP8X"), extended), (tf.equal(chunk, b"VP8L"), lossless),
                    (tf.equal(chunk, b"VP8 "), lossy)], default=lambda: tf.constant(0, tf.int64))


def _fill_cache(images, total: int, title: str) -> np.ndarray:
    import keras

    print(title, flush=True)
    # A live bar on a terminal; in logs (mlflow run, CI) just the closing line.
    bar = keras.utils.Progbar(total, verbose=1 if sys.stdout.isatty() else 2)
    labels = []
    for _, batch_labels in images.batch(512):
        labels.append(batch_labels.numpy())
        bar.add(len(labels[-1]))
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)


def _files_digest(paths: list[str], labels: np.ndarray, root: Path) -> str:
    """Content-addressed enough to tell data sets apart: relative path, size and label of every file."""
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        h.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}:{label}\n".encode())
    return h.hexdigest()[:16]
