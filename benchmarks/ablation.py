"""Where the airbench port differs from airbench94 (issue 19's line-by-line read): each difference switched
on alone, on the short recipe (airbench at widths 32/64/128, 5 epochs), against the port as it is."""

from __future__ import annotations

import time

from benchmarks.harness import benchmark

SHORT = {"widths": [32, 64, 128]}  # airbench_s's widths, through the airbench builder, which takes every option
# name: (architecture options, recipe changes)
VARIANTS = {
    "port as is": ({}, {}),
    "triangular schedule (0.2 -> 1 -> 0.07)": ({}, {"schedule": "triangular"}),
    "uniform whole-pixel shifts, reflected": ({"shift": "uniform"}, {}),
    "lookahead (every 5,120 images) for the weight average": ({}, {"ema": 0.0, "lookahead_images": 5120}),
    "whitening bias trained for 3 epochs": ({"whiten_bias_epochs": 3}, {}),
    "norm epsilon 1e-12": ({"norm_eps": 1e-12}, {}),
    "PyTorch initialisation": ({"init": "torch"}, {}),
    "test-time views average logits": ({}, {"test_time_logits": True}),
}


@benchmark("airbench_ablation", "airbench94's differences from the port, each alone on the short recipe "
                                "(airbench at widths 32/64/128, 5 epochs), tracking on")
def airbench_ablation(variants: str = "", seeds: str = "0", epochs: int = 5, data_dir: str = "",
                      precision: str = "auto", options: str = "", recipe: str = "") -> list[dict]:
    """`variants`: comma-separated indexes into VARIANTS (default: all). `options`/`recipe` (JSON) apply to
    every variant, e.g. to ablate on top of changes already kept."""
    import mlflow

    from benchmarks.recipes import json_option
    from experiments.train import TrainConfig, load_data, train

    names = list(VARIANTS)
    chosen = [names[int(i)] for i in variants.split(",")] if variants else names
    base_options, base_recipe = json_option("options", options), json_option("recipe", recipe)
    rows = []
    for seed in (int(s) for s in seeds.split(",")):
        for name in chosen:
            variant_options, variant_recipe = VARIANTS[name]
            config = TrainConfig("cifar10", "airbench", epochs=epochs, seed=seed, data_dir=data_dir,
                                 precision=precision, options={**SHORT, **base_options, **variant_options},
                                 recipe={**base_recipe, **variant_recipe})
            config.validate()
            load_data(config)
            start = time.perf_counter()
            with mlflow.start_run(nested=True, run_name=f"ablation: {name}, seed {seed}"):
                result = train(config)
            rows.append({"variant": name, "seed": seed, "test_accuracy": result.test_accuracy,
                         "wall_s": time.perf_counter() - start, "run_id": result.run_id})
            print(rows[-1], flush=True)
    return rows
