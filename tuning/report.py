"""A search's trials as a table, and a plot of score against trial coloured by the main hyperparameters."""

from __future__ import annotations

from tuning.spaces import Space, params_of

# The hyperparameters that most change a score, each given its own panel in the plot.
MAIN_HYPERPARAMETERS = ("optimizer", "learning_rate", "batch_norm", "augment", "blocks", "batch_size")


def trials_table(trials: list, runs: dict, space: Space):
    """One row per Keras Tuner trial: id, status, score, best epoch, MLflow run id, and the trial's params
    (`tuning.spaces.trial_params`: the same columns, all filled, whichever optimizer or depth it chose)."""
    import pandas as pd

    rows = []
    for trial in sorted(trials, key=lambda t: t.trial_id):
        run = runs.get(trial.trial_id)
        values = params_of(trial.hyperparameters, space)
        rows.append({
            "trial_id": trial.trial_id,
            "status": str(trial.status),
            "score": trial.score,
            "best_epoch": run.data.metrics.get("best_epoch") if run else None,
            "run_id": run.info.run_id if run else None,
            **values,
        })
    return pd.DataFrame(rows)


def plot_scores(table):
    """Score against trial number, one panel per main hyperparameter, points coloured by its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in MAIN_HYPERPARAMETERS if n in table and table[n].notna().any()]
    columns = 3
    rows = max(1, -(-len(names) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    order = np.arange(1, len(table) + 1)
    for ax, name in zip(axes.flat, names):
        values = table[name]
        if name == "learning_rate":
            points = ax.scatter(order, table["score"], c=np.log10(values.astype(float)), cmap="viridis")
            figure.colorbar(points, ax=ax, label="log10 learning rate")
        else:
            for value in _sorted(values.dropna().unique()):
                picked = values == value
                ax.scatter(order[picked.to_numpy()], table["score"][picked], label=str(value))
            ax.legend(title=name, fontsize=7, title_fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("trial")
        ax.set_ylabel("val_accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    figure.suptitle("Search: validation accuracy by trial")
    figure.tight_layout()
    return figure


def _sorted(values) -> list:
    try:
        return sorted(values)  # numbers in numeric order
    except TypeError:
        return sorted(values, key=str)
