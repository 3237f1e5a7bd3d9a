"""The Keras Tuner side of a search: a hypermodel whose trials train through `experiments.train`,
oracles that run the tutorial's point and its steps first, and tuners whose hooks log every trial.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING

import keras
import keras_tuner as kt
from keras_tuner.engine.trial import Trial, TrialStatus

from experiments.train import load_data, train
from tuning.spaces import choose, get_space, params_of
from tuning.state import OBJECTIVE, TUNERS, tuner_dir
from tuning.tracking import Tracker

if TYPE_CHECKING:
    from tuning.search import SearchConfig

@dataclasses.dataclass
class SearchState:
    """What this process's search shares between its hypermodel, oracle and tuner."""

    config: SearchConfig
    tracker: Tracker | None  # None on a distributed chief: its workers log the trials
    started: float = 0.0
    deadline: float = 0.0  # when the time budget runs out; 0: no limit
    trial_id: str | None = None  # the trial this process is running
    # trial id -> (best score, its epoch) of each execution, until the trial ends
    results: dict[str, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)


class ConvnetHyperModel(kt.HyperModel):
    """The `convnet` family over the dataset's search space; fit() is one train() call per execution."""

    def __init__(self, state: SearchState):
        super().__init__(name=f"{state.config.dataset}-convnet")
        self.search_state = state
        self.executions: dict[str, int] = {}

    def build(self, hp):
        from experiments.models import create_model
        from experiments.precision import POLICIES

        config = self.search_state.config
        spec = load_data(config.train_config(1)).spec
        options = choose(hp, get_space(config.dataset))["options"]
        return create_model("convnet", spec, POLICIES[config.precision], **options)

    def fit(self, hp, model, *args, epochs=1, initial_epoch=0, callbacks=(), **kwargs):
        state, config = self.search_state, self.search_state.config
        trial_id = state.trial_id
        execution = self.executions[trial_id] = self.executions.get(trial_id, -1) + 1
        train_config = config.train_config(epochs, **choose(hp, get_space(config.dataset)))
        # Each execution of a trial is a fresh seed, else repeats would be identical.
        train_config.seed = config.seed + execution
        result = train(train_config, model=model, callbacks=callbacks, initial_epoch=initial_epoch,
                       evaluate=False)
        scores = result.history[OBJECTIVE]
        best = max(range(len(scores)), key=scores.__getitem__)
        state.results.setdefault(trial_id, []).append((scores[best], initial_epoch + best + 1))
        history = keras.callbacks.History()
        history.history = result.history
        return history


class Deadline(keras.callbacks.Callback):
    """Stops a trial after the epoch in which the search's time budget runs out.

    Holds the time, not the state: Keras Tuner deep-copies the callbacks for every trial.
    """

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch, logs=None):
        if self.deadline and time.time() > self.deadline:
            self.model.stop_training = True


class StepsFirstOracle:
    """Runs the tutorial's point first, then its one-change steps; stops handing out trials at
    max_trials or the deadline. Mixed into each kind's oracle below."""

    def __init__(self, state: SearchState, **kwargs):
        self.search_state = state
        super().__init__(**kwargs)

    # Private hook kept: Hyperband draws these inside populate_space's bracket bookkeeping (no public equivalent).
    def _random_values(self):
        steps = get_space(self.search_state.config.dataset).steps
        if len(self.trials) <= len(steps):
            # Every hyperparameter at its (tutorial) default, but for this trial's one change.
            step = steps[len(self.trials) - 1] if self.trials else {}
            hps = kt.HyperParameters()
            for hp in self.hyperparameters.space:
                hps.merge([hp])
                if hps.is_active(hp):
                    hps.values[hp.name] = step.get(hp.name, hp.default)
            return hps.values
        return super()._random_values()

    def create_trial(self, tuner_id):
        deadline = self.search_state.deadline
        if deadline and time.time() > deadline and tuner_id not in self.ongoing_trials:
            self.tuner_ids.discard(tuner_id)
            return Trial(self.hyperparameters.copy(), status=TrialStatus.STOPPED)
        return super().create_trial(tuner_id)


class HyperbandStepsOracle(StepsFirstOracle, kt.oracles.HyperbandOracle):
    pass


class BayesianStepsOracle(StepsFirstOracle, kt.oracles.BayesianOptimizationOracle):
    pass


class RandomStepsOracle(StepsFirstOracle, kt.oracles.RandomSearchOracle):
    pass


class TrackedTuner:
    """Logs each trial as a child run of the search and prints a progress line.
    Mixed into each kind's tuner below."""

    def __init__(self, state: SearchState, oracle, **kwargs):
        self.search_state = state
        # The tuner classes build their own oracle; ours is given, so skip to the common base.
        kt.Tuner.__init__(self, oracle=oracle, **kwargs)

    def on_trial_begin(self, trial):
        self.search_state.trial_id = trial.trial_id
        super().on_trial_begin(trial)
        if self.search_state.tracker:
            self.search_state.tracker.begin_trial(trial)

    def on_trial_end(self, trial):
        # Keras Tuner records the result first: a kill between the two steps is repaired on resume
        # (Tracker.reconcile) without rerunning the trial.
        runs = self.search_state.results.pop(trial.trial_id, [])
        score = sum(s for s, _ in runs) / len(runs) if runs else None
        best_epoch = max(runs)[1] if runs else None
        try:
            super().on_trial_end(trial)
        finally:
            if self.search_state.tracker:
                self.search_state.tracker.end_trial(trial, score, best_epoch)
        self.print_progress(trial, score)

    def print_progress(self, trial, score) -> None:
        """One line per trial: n of N, hyperparameters, score, best so far, elapsed."""
        # A worker's oracle is a client of the chief's, which lists no trials: the best is then this one.
        done = [t for t in getattr(self.oracle, "trials", {}).values() if t.score is not None]
        best = max([t.score for t in done] + ([score] if score is not None else []), default=None)
        values = params_of(trial.hyperparameters, get_space(self.search_state.config.dataset))
        score_text = f"{score:.4f}" if score is not None else f"none ({trial.status})"
        best_text = f"{best:.4f}" if best is not None else "none"
        state = self.search_state
        print(
            f"trial {int(trial.trial_id) + 1} of {state.config.max_trials}: {OBJECTIVE}={score_text} "
            f"best={best_text} elapsed={time.time() - state.started:.0f}s {json.dumps(values)}",
            flush=True,
        )


class TrackedHyperband(TrackedTuner, kt.Hyperband):
    pass


class TrackedBayesian(TrackedTuner, kt.BayesianOptimization):
    pass


class TrackedRandomSearch(TrackedTuner, kt.RandomSearch):
    pass


KINDS = {"hyperband": (HyperbandStepsOracle, TrackedHyperband), "bayesian": (BayesianStepsOracle, TrackedBayesian),
         "random": (RandomStepsOracle, TrackedRandomSearch)}
assert tuple(KINDS) == TUNERS, "tuning.state.TUNERS names the kinds before TensorFlow is imported"


def make_tuner(config: SearchConfig, tracker: Tracker | None):
    """A Keras Tuner of the chosen kind, whose hooks log to `tracker` and whose trials call train().

    Its `search_state` holds the start time, the deadline and the trials' results.
    """
    state = SearchState(config, tracker)
    oracle_class, tuner_class = KINDS[config.tuner]
    oracle_args = {"objective": kt.Objective(OBJECTIVE, "max"), "seed": config.seed}
    if config.tuner == "hyperband":
        oracle = oracle_class(state, max_epochs=config.max_epochs, factor=3, **oracle_args)
    else:
        oracle = oracle_class(state, max_trials=config.max_trials, **oracle_args)
    tuner = tuner_class(
        state,
        hypermodel=ConvnetHyperModel(state),
        oracle=oracle,
        executions_per_trial=config.executions_per_trial,
        directory=str(tuner_dir()),
        project_name=config.search_name,
        overwrite=False,  # never wipe: resume, and workers share this directory
    )
    state.started = time.time()
    # Keras Tuner does not save these in its state; they are this invocation's budget. `oracle` is the
    # local one even on a worker, where tuner.oracle is a client of the chief's.
    oracle.max_trials = config.max_trials
    if config.time_budget_minutes:
        state.deadline = state.started + 60 * config.time_budget_minutes
    return tuner
