"""Search spaces: which `convnet` architectures and training recipes a tuner may pick, per dataset.

Every space is centred on the tutorial's model for that dataset: its layer sizes, dropout rates and
recipe (Adam at 1e-3, batch 128, no augmentation) are the defaults, and the tuner runs that point
first, then that point with each of its `steps`. A search can therefore only match or beat
the tutorial on its validation score.
"""

from __future__ import annotations

import dataclasses

from experiments.errors import UserError


@dataclasses.dataclass(frozen=True)
class Space:
    tutorial_arch: str  # the seed architecture this space contains
    blocks: list  # its conv blocks: [(widths, dropout)], the defaults
    dense: list  # its dense layers: [(units, dropout)], the defaults
    min_blocks: int
    max_blocks: int
    widths: tuple  # per block, the filter counts its convs may pick: wider only where the maps are small
    dense_units: tuple
    max_dense: int = 2
    max_convs: tuple = (2, 2, 2, 2, 2)  # per block, how many convs it may stack
    steps: tuple = ()  # the changes to the tutorial's point tried first, one trial each: {hp name: value}


# After the tutorial's point, the tuner tries it with one modern change at a time (those that most often
# help a plain CNN), then explores: a local search first, so the few trials a CPU affords start near
# what is known to work.
STEPS_FROM_TUTORIAL = ({"batch_norm": True}, {"schedule": "cosine"}, {"augment": 0.0625})

SPACES = {
    "cifar10": Space(
        tutorial_arch="cnn_deep",
        blocks=[((50, 75), 0.25), ((125,), 0.25)],
        dense=[(500, 0.4), (250, 0.3)],
        min_blocks=2,
        max_blocks=3,
        widths=((32, 50, 64, 75, 96), (64, 96, 125, 128, 192), (128, 192, 256)),
        dense_units=(128, 250, 256, 500, 512),
        steps=STEPS_FROM_TUTORIAL,
    ),
    "imagenette": Space(
        tutorial_arch="cnn_basic",
        blocks=[((32,), 0.0), ((64,), 0.0), ((128,), 0.25), ((128,), 0.25), ((256,), 0.25)],
        dense=[(256, 0.5)],
        min_blocks=3,
        max_blocks=5,
        widths=((16, 32, 48, 64), (32, 64, 96, 128), (64, 128, 192), (128, 192, 256), (128, 256, 384)),
        dense_units=(128, 256, 512),
        # A second conv at 128x128 costs as much as the rest of the net: keep block 1 single.
        max_convs=(1, 2, 2, 2, 2),
        # cnn_basic still underfits at epoch 10 (train 75%, val 72.5%) and none of the three modern
        # changes helped there, so next come the changes that make it learn faster: twice the steps
        # per epoch, a higher rate (constant, and cosine-decayed), less dropout.
        steps=STEPS_FROM_TUTORIAL + (
            {"batch_size": 64},
            {"adam_learning_rate": 0.002},
            {"adam_learning_rate": 0.002, "schedule": "cosine"},
            {"block3_dropout": 0.1, "block4_dropout": 0.1, "block5_dropout": 0.1, "dense1_dropout": 0.25},
        ),
    ),
}

DROPOUTS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
# Decoupled weight decay that suits each optimizer; plain Adam (the tutorial's) has none.
WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.05, "sgd": 5e-4}


def get_space(dataset: str) -> Space:
    if dataset not in SPACES:
        raise UserError(f"no search space for dataset {dataset!r}; choose one of: {', '.join(sorted(SPACES))}")
    return SPACES[dataset]


def choose(hp, space: Space) -> dict:
    """Register the space's hyperparameters on `hp` and return the chosen TrainConfig fields.

    Conditional hyperparameters (block 3's widths, SGD's learning rate) are active only in trials that
    use them; a trial's MLflow params are `trial_params()` of this choice, the same keys in every trial.
    """
    n_blocks = hp.Int("conv_blocks", space.min_blocks, space.max_blocks, default=len(space.blocks))
    blocks = []
    for i in range(1, space.max_blocks + 1):
        tutorial_widths, tutorial_dropout = space.blocks[i - 1] if i <= len(space.blocks) else ((space.widths[i - 1][-1],), 0.25)
        with hp.conditional_scope("conv_blocks", list(range(i, space.max_blocks + 1))):
            max_convs = space.max_convs[i - 1]
            if max_convs == 1:
                n_convs = hp.Fixed(f"block{i}_convs", 1)
            else:
                n_convs = hp.Int(f"block{i}_convs", 1, max_convs, default=len(tutorial_widths))
            widths = []
            for j in range(1, max_convs + 1):
                with hp.conditional_scope(f"block{i}_convs", list(range(j, max_convs + 1))):
                    default = tutorial_widths[min(j, len(tutorial_widths)) - 1]
                    widths.append(hp.Choice(f"block{i}_width{j}", space.widths[i - 1], default=default))
            dropout = hp.Choice(f"block{i}_dropout", DROPOUTS, default=tutorial_dropout)
        if i <= n_blocks:
            blocks.append((tuple(widths[:n_convs]), dropout))

    n_dense = hp.Int("dense_layers", 1, space.max_dense, default=len(space.dense))
    dense = []
    for k in range(1, space.max_dense + 1):
        tutorial_units, tutorial_dropout = space.dense[k - 1] if k <= len(space.dense) else (space.dense_units[0], 0.5)
        with hp.conditional_scope("dense_layers", list(range(k, space.max_dense + 1))):
            units = hp.Choice(f"dense{k}_units", space.dense_units, default=tutorial_units)
            dropout = hp.Choice(f"dense{k}_dropout", DROPOUTS, default=tutorial_dropout)
        if k <= n_dense:
            dense.append((units, dropout))

    options = {
        "blocks": blocks,
        "dense": dense,
        "kernel_size": hp.Choice("kernel_size", (3, 5), default=3),
        "batch_norm": hp.Boolean("batch_norm", default=False),
        "augment": hp.Choice("augment", (0.0, 0.0625, 0.125), default=0.0),  # shift, as a fraction of the side
    }
    optimizer = hp.Choice("optimizer", ("adam", "adamw", "sgd"), default="adam")
    with hp.conditional_scope("optimizer", ["adam", "adamw"]):
        adam_rate = hp.Float("adam_learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3)
    with hp.conditional_scope("optimizer", ["sgd"]):
        sgd_rate = hp.Float("sgd_learning_rate", 1e-3, 0.3, sampling="log", default=0.05)
    schedule = hp.Choice("schedule", ("constant", "cosine"), default="constant")
    recipe = {
        "optimizer": optimizer,
        "schedule": schedule,
        "weight_decay": WEIGHT_DECAY[optimizer],
        "warmup_fraction": 0.05 if schedule == "cosine" else 0.0,
        "label_smoothing": hp.Choice("label_smoothing", (0.0, 0.1), default=0.0),
    }
    return {
        "options": options,
        "recipe": recipe,
        "learning_rate": sgd_rate if optimizer == "sgd" else adam_rate,
        "batch_size": hp.Choice("batch_size", (64, 128, 256), default=128),
    }


# A trial's params, one column per idea whatever the conditional hyperparameters that chose it, so that
# every trial (and the retrained best) of every search logs these keys and no others.
TRIAL_PARAMS = ("optimizer", "learning_rate", "schedule", "batch_size", "weight_decay", "label_smoothing",
                "warmup_fraction", "blocks", "widths", "block_dropouts", "dense_layers", "dense_units",
                "dense_dropouts", "kernel_size", "batch_norm", "augment")


def trial_params(choice: dict) -> dict:
    """Flat scalar params of the TrainConfig fields `choose()` returned.

    `widths` is the convs' filter counts, ',' within a block and '|' between blocks ("50,75|125");
    `block_dropouts` one rate per block ("0.25|0.25"); `dense_units` and `dense_dropouts` one per dense
    layer ("500,250", "0.4,0.3"). `learning_rate` and `batch_size` are the very objects the TrainConfig
    gets, so they read the same as train() logs them.
    """
    options, recipe = choice["options"], choice["recipe"]
    blocks, dense = options["blocks"], options["dense"]
    return {
        "optimizer": recipe["optimizer"],
        "learning_rate": choice["learning_rate"],
        "schedule": recipe["schedule"],
        "batch_size": choice["batch_size"],
        "weight_decay": recipe["weight_decay"],
        "label_smoothing": recipe["label_smoothing"],
        "warmup_fraction": recipe["warmup_fraction"],
        "blocks": len(blocks),
        "widths": "|".join(",".join(str(width) for width in widths) for widths, _ in blocks),
        "block_dropouts": "|".join(str(dropout) for _, dropout in blocks),
        "dense_layers": len(dense),
        "dense_units": ",".join(str(units) for units, _ in dense),
        "dense_dropouts": ",".join(str(dropout) for _, dropout in dense),
        "kernel_size": options["kernel_size"],
        "batch_norm": str(bool(options["batch_norm"])).lower(),
        "augment": options["augment"],
    }


def params_of(hp, space: Space) -> dict:
    """`trial_params()` of the point `hp` holds (a trial's hyperparameters), leaving `hp` untouched."""
    return trial_params(choose(hp.copy(), space))
