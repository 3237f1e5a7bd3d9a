"""Choosing examples: stratified samples, train/test and holdout splits, and images read back out of a split."""

from __future__ import annotations

import hashlib

import numpy as np

from experiments.datasets import Split


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices drawn at random with each class in proportion to its size (sorted)."""
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    # Largest remainders get the leftover slots, so the total is exactly `count`.
    quota[np.argsort(quota - exact)[: count - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def split_train_test(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split for trees that ship without train/test folders (Caltech-101)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
        test.extend(members[:n_test])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def fit_splits(data, validation_fraction: float, seed: int, calibration_fraction: float = 0.0) -> tuple:
    """((split, context), (split, context)[, (split, "calibration")]): what a model fits on, what it is
    validated on, and the images its temperature is fitted on (experiments/calibration.py) when that is
    not the validation split."""
    if validation_fraction:  # a tuner trial: fits on part of train, scored on the rest; test unseen
        fit_split, validation_split = holdout(data.train, validation_fraction, seed)
        return (fit_split, "training"), (validation_split, "validation")
    if calibration_fraction:  # the tutorial's way, less a seeded share kept out of training for calibration
        fit_split, calibration = holdout(data.train, calibration_fraction, seed)
        return (fit_split, "training"), (data.test, "testing"), (calibration, "calibration")
    return (data.train, "training"), (data.test, "testing")  # the tutorial's way


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded stratified (rest, held-out) parts of a split: validation data that is not the test split."""
    import tensorflow as tf

    rest, held = split_train_test(split.labels, fraction, seed)

    def part(indices: np.ndarray, role: str) -> Split:
        keep = np.zeros(len(split), bool)
        keep[indices] = True
        mask = tf.constant(keep)

        def kept(index, example):
            return mask[index]

        def drop_index(index, example):
            return example

        images = split.images.enumerate().filter(kept).map(drop_index)
        images = images.apply(tf.data.experimental.assert_cardinality(len(indices)))
        digest = hashlib.sha256(f"{split.digest}:{role}:{fraction}:{seed}".encode()).hexdigest()[:16]
        return Split(images=images, labels=split.labels[indices], digest=digest)

    return part(rest, "rest"), part(held, "holdout")


def sample_images(split: Split, count: int) -> np.ndarray:
    """About `count` images spread evenly over the split (so over every class of a class-sorted one)."""
    every = max(1, len(split) // count)
    return np.concatenate([x for x, _ in split.images.shard(every, 0).take(count).batch(1000).as_numpy_iterator()])


def take_images(split: Split, indices: np.ndarray) -> np.ndarray:
    """The images at `indices` (in the caller's order) from a split's pipeline, read in batches."""
    if not len(indices):
        return np.zeros((0, 1, 1, 1), np.uint8)
    wanted, found, offset = np.asarray(indices), {}, 0
    for images, _ in split.images.batch(1024).as_numpy_iterator():
        for index in wanted[(wanted >= offset) & (wanted < offset + len(images))]:
            found[int(index)] = images[index - offset]
        offset += len(images)
        if len(found) == len(set(wanted.tolist())):
            break
    return np.stack([found[int(i)] for i in wanted])
