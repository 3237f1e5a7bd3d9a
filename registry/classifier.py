"""The served model: a pyfunc around a trained Keras image classifier.

MLflow loads this file as "models from code" (registry/promote.py logs it), so it must stay
self-contained: no imports from this project. It accepts, through `mlflow models serve` or
`mlflow.pyfunc.load_model(...).predict(...)`:

- uint8 pixels shaped (N, H, W, C), as `{"inputs": ...}` or `{"instances": ...}`;
- encoded images (JPEG, PNG, or anything Pillow decodes) as base64 strings (a `data:` URL prefix is
  fine), or raw bytes locally. They are decoded, converted to the model's channels and resized to
  its input size exactly as training did (tf.image.resize, bilinear).

It answers one record (a dict) per image: `class_index`, `label` (the class name), `confidence` and
`probabilities` (in class order). With `"params": {"explain": true}` each record also has `heatmap`: the
Grad-CAM of the predicted class (gradcam.py, shipped beside this file) as a base64 greyscale PNG of the
image's size, the size it was sent at. A network without convolutions refuses explain requests whole.
Bad input raises an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server turns into
HTTP 400 with the message, and keeps serving.

Caps (model config, overridable at serving time by environment variables):
`max_batch` (CNN_SERVE_MAX_BATCH) images per request, `max_image_pixels`
(CNN_SERVE_MAX_IMAGE_PIXELS) per encoded image, checked before decoding (decompression bombs), and
under `mlflow models serve` `max_request_bytes` (CNN_SERVE_MAX_REQUEST_BYTES) per request body,
checked before the body is kept or parsed (HTTP 413).
"""

import base64
import binascii
import io
import os
import queue
import threading

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # 256 pixel-JSON images of 160x160x3 fit in about 80% of it
SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"  # set by `mlflow models serve` for its uvicorn workers


class BadInput(MlflowException):
    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RequestTooLarge(MlflowException):
    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    def get_http_status_code(self) -> int:
        return 413  # Payload Too Large


def cap_request_bodies(max_bytes: int) -> None:
    """Refuse request bodies over `max_bytes` with HTTP 413, never holding more than that in memory.

    MLflow's scoring server reads and JSON-parses the whole body before the model sees it, so the
    batch and pixel caps would come too late for a body of gigabytes. Its endpoint turns an
    MlflowException into a JSON answer with the exception's status. An oversized body is still read
    to its end (and dropped) so the client gets the answer, not a reset connection; the server's
    request timeout bounds that.
    """
    from starlette.requests import Request

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            declared = self.headers.get("content-length", "")
            chunks, size = [], 0
            too_large = declared.isdigit() and int(declared) > max_bytes
            async for chunk in self.stream():
                size += len(chunk)
                too_large = too_large or size > max_bytes
                if not too_large:
                    chunks.append(chunk)
            if too_large:
                raise RequestTooLarge(
                    f"request body of {size:,} bytes is over the cap of {max_bytes:,}; send fewer images per "
                    "request, encoded images (base64 PNG/JPEG) instead of pixel lists, or raise "
                    "CNN_SERVE_MAX_REQUEST_BYTES")
            self._body = b"".join(chunks)
        return self._body

    Request.body = body


def set_nodelay_on_every_tcp_socket() -> None:
    """Make asyncio disable Nagle's algorithm on every accepted TCP connection of this process.

    With MLFLOW_MODELS_WORKERS > 1, uvicorn's workers accept on a listener whose `proto` is 0, and
    asyncio sets TCP_NODELAY only when `proto` is IPPROTO_TCP: every keep-alive answer then waits
    ~40 ms for the client's delayed ACK (uvicorn issue #3149; measured in BENCHMARKS.md). The model
    is loaded in each worker before it serves, so this is the place to fix it.
    """
    import asyncio.base_events
    import socket

    def set_nodelay(sock):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # a stream socket that is not TCP
                pass

    asyncio.base_events._set_nodelay = set_nodelay


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras
        import tensorflow as tf

        config = context.model_config or {}
        self.class_names = list(config["class_names"])
        self.image_shape = tuple(config["image_shape"])  # (H, W, C)
        self.max_batch = int(os.environ.get("CNN_SERVE_MAX_BATCH") or config.get("max_batch", DEFAULT_MAX_BATCH))
        self.max_image_pixels = int(
            os.environ.get("CNN_SERVE_MAX_IMAGE_PIXELS") or config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        )
        if os.environ.get(SERVER_MODEL_PATH_ENV):  # in the scoring server, not in a user's own process
            set_nodelay_on_every_tcp_socket()
            cap_request_bodies(int(os.environ.get("CNN_SERVE_MAX_REQUEST_BYTES")
                                   or config.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)))
        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        # One traced graph for every batch size: Keras predict() per request costs milliseconds of setup.
        self._forward = tf.function(
            lambda images: self.model(images, training=False),
            input_signature=[tf.TensorSpec((None, *self.image_shape), tf.uint8)],
        )
        self._forward(np.zeros((1, *self.image_shape), np.uint8))  # trace now, not on the first request
        explain = config.get("explain") or {}
        self.explain_refusal = explain.get("refusal", "this model has no Grad-CAM settings; promote it again")
        self._explainer = None
        if explain.get("layer"):
            import gradcam  # a code path of the logged model

            net = self.model.get_layer(explain["net"]) if explain.get("net") else self.model
            self._explainer = gradcam.explainer(net, explain["layer"])
        self._jobs = queue.Queue()
        threading.Thread(target=self._run_batches, daemon=True, name="batcher").start()

    # np.ndarray is what the server passes for `inputs`/`instances` bodies (a DataFrame for `dataframe_*`
    # ones; lists or bytes locally: to_pixels takes them all). MLflow infers no schema from it, so it
    # neither validates inputs by the hint nor warns that predict has none.
    def predict(self, context, model_input: np.ndarray, params=None):
        explain = bool((params or {}).get("explain", False))
        if explain and self._explainer is None:
            raise BadInput(f"explain is not available: {self.explain_refusal}")
        images, sizes = self.to_pixels_and_sizes(model_input)
        probabilities = self._infer(images)
        classes = probabilities.argmax(axis=1)
        # Plain records, not a DataFrame: building and serialising one cost ~0.45 ms a request, a
        # quarter of the server's single-threaded work per image (`pd.DataFrame(rows)` locally).
        records = [
            {"class_index": index, "label": self.class_names[index], "confidence": row[index], "probabilities": row}
            for index, row in zip(classes.tolist(), probabilities.tolist())
        ]
        if explain:
            for record, heatmap in zip(records, self._heatmaps(images, classes, sizes)):
                record["heatmap"] = heatmap
        return records

    def _heatmaps(self, images: np.ndarray, classes: np.ndarray, sizes: list) -> list:
        """Base64 PNG heatmaps of `classes`, each resized to its image's size as sent."""
        import gradcam
        import tensorflow as tf

        heatmaps = gradcam.heatmaps(self._explainer, images, classes)
        return [gradcam.png(heatmap if tuple(size) == heatmap.shape else
                            tf.image.resize(heatmap[..., None], size).numpy()[..., 0])
                for heatmap, size in zip(heatmaps, sizes)]

    # --- Batching: concurrent requests share one forward pass ------------------------------------

    def _infer(self, images: np.ndarray) -> np.ndarray:
        job = {"images": images, "done": threading.Event()}
        self._jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["probabilities"]

    def _run_batches(self):
        """Take every request waiting when the last pass ended and run them as one batch.

        One image costs a CPU nearly as much as eight (6.5 vs 15 ms for cnn_modern here), so under load
        this multiplies throughput; a lone request waits for nothing.
        """
        while True:
            jobs = [self._jobs.get()]
            size = len(jobs[0]["images"])
            while size < self.max_batch and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
                size += len(jobs[-1]["images"])
            try:
                batch = np.concatenate([job["images"] for job in jobs]) if len(jobs) > 1 else jobs[0]["images"]
                probabilities = np.asarray(self._forward(batch), dtype=np.float32)
                offsets = np.cumsum([0] + [len(job["images"]) for job in jobs])
                for job, start, end in zip(jobs, offsets[:-1], offsets[1:]):
                    job["probabilities"] = probabilities[start:end]
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for job in jobs:
                    job["error"] = exc
            for job in jobs:
                job["done"].set()

    # --- Input -----------------------------------------------------------------------------------

    def to_pixels(self, data) -> np.ndarray:
        """A uint8 (N, H, W, C) batch from whatever form the request came in, or BadInput."""
        return self.to_pixels_and_sizes(data)[0]

    def to_pixels_and_sizes(self, data) -> tuple:
        """(to_pixels(data), the (height, width) each image was sent at, before any resize)."""
        if isinstance(data, pd.DataFrame):
            if data.shape[1] != 1:
                raise BadInput(f"expected one column of base64 images, got columns {list(data.columns)}")
            data = data.iloc[:, 0].tolist()
        if isinstance(data, dict):
            if len(data) != 1:
                raise BadInput(f"expected a single input (the images), got inputs {sorted(data)}")
            data = next(iter(data.values()))
        if isinstance(data, (str, bytes)):
            data = [data]
        if isinstance(data, list) and data and all(isinstance(item, (str, bytes)) for item in data):
            return self._decode_all(data)
        try:
            array = np.asarray(data)
        except ValueError as exc:  # ragged nested lists
            raise BadInput(f"images must form a rectangular (N, H, W, C) array: {exc}") from None
        if array.dtype.kind in "USO":
            return self._decode_all(array.ravel().tolist())
        array = self._check_tensor(array)
        return array, [array.shape[1:3]] * len(array)

    def _check_batch_size(self, count: int) -> None:
        if count == 0:
            raise BadInput("empty batch: send at least one image")
        if count > self.max_batch:
            raise BadInput(
                f"batch of {count} images is over the cap of {self.max_batch}; "
                "split it, or raise CNN_SERVE_MAX_BATCH on the server"
            )

    def _check_tensor(self, array: np.ndarray) -> np.ndarray:
        height, width, channels = self.image_shape
        expected = f"(N, {height}, {width}, {channels})"
        if array.ndim == 0 or array.size == 0:
            self._check_batch_size(0)
        if array.ndim != 4:
            raise BadInput(f"expected uint8 images shaped {expected}, got an array of shape {array.shape}")
        self._check_batch_size(len(array))
        if array.shape[3] != channels:
            raise BadInput(
                f"images have {array.shape[3]} channels, the model takes {channels} "
                f"({'RGB' if channels == 3 else 'grayscale'}): expected shape {expected}, got {array.shape}"
            )
        if array.shape[1:3] != (height, width):
            raise BadInput(
                f"images are {array.shape[1]}x{array.shape[2]}, the model takes {height}x{width}: "
                f"expected shape {expected}, got {array.shape}; send encoded images to have them resized"
            )
        if array.dtype == np.uint8:
            return array
        if array.dtype.kind not in "iu":
            raise BadInput(
                f"pixels must be uint8 integers 0-255, got dtype {array.dtype}; "
                "send raw pixels, the model rescales inside"
            )
        if array.min() < 0 or array.max() > 255:
            raise BadInput(f"pixels must be uint8 integers 0-255, got values from {array.min()} to {array.max()}")
        return array.astype(np.uint8)

    def _decode_all(self, items: list) -> tuple:
        self._check_batch_size(len(items))
        pixels, sizes = [], []
        for n, item in enumerate(items):  # each resized at once: never a batch of full-size images in memory
            image = self._decode(item, n)
            sizes.append(image.shape[:2])
            pixels.append(self._resize(image))
        return np.stack(pixels), sizes

    def _decode(self, item, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if isinstance(item, str):
            text = item.strip()
            if text.startswith("data:") and "," in text:  # data:image/png;base64,....
                text = text.split(",", 1)[1]
            try:
                item = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise BadInput(f"image {index} is not valid base64") from None
        try:
            with Image.open(io.BytesIO(item)) as image:
                width, height = image.size
                if width * height > self.max_image_pixels:
                    raise BadInput(
                        f"image {index} is {width}x{height} ({width * height:,} pixels), over the cap of "
                        f"{self.max_image_pixels:,} pixels; downscale it, or raise CNN_SERVE_MAX_IMAGE_PIXELS"
                    )
                image.load()  # decodes fully: a truncated file fails here
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit greyscale: keep the high byte, as TensorFlow's decoder did in training
                    # (Pillow's convert would clip everything above 255 to white).
                    image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
                image = image.convert("L" if self.image_shape[2] == 1 else "RGB")
                pixels = np.asarray(image, dtype=np.uint8)
        except Image.DecompressionBombError:
            raise BadInput(f"image {index} is over Pillow's decompression-bomb limit") from None
        except UnidentifiedImageError:
            raise BadInput(f"image {index} is not an image Pillow can read (JPEG, PNG, ...)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadInput(f"image {index} could not be decoded ({exc}); is the file complete?") from None
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def _resize(self, pixels: np.ndarray) -> np.ndarray:
        height, width = self.image_shape[:2]
        if pixels.shape[:2] == (height, width):
            return pixels
        import tensorflow as tf

        # The training pipeline's resize (experiments/datasets/decode.py), so pixels match what the model saw.
        resized = tf.image.resize(pixels, (height, width))
        return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


mlflow.models.set_model(ImageClassifier())
