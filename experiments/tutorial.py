"""The tutorial's experiments, in its order, with the test accuracy it reports for each.

Light on purpose (no Keras): the report and the `main` pipeline read it at start-up, and every
training run shows its figure in the run's description.
"""

# (dataset, architecture): the tutorial's figure
TUTORIAL_FIGURES = {
    ("mnist", "mlp"): "about 97%",
    ("mnist", "cnn_simple"): "98%+",
    ("cifar10", "cnn_simple"): "about 60%",
    ("cifar10", "cnn_deep"): "78-80%",
    ("imagenette", "cnn_basic"): "40-50%",
    ("imagenette", "vgg16_head"): "94%+",
}
TUTORIAL_EXPERIMENTS = list(TUTORIAL_FIGURES)
TUTORIAL_DATASETS = list(dict.fromkeys(dataset for dataset, _ in TUTORIAL_EXPERIMENTS))
