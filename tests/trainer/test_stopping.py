"""Early stopping, the kept evaluation and the plateau verdict, on made-up evaluation histories."""

from loraplex.trainer.stopping import TrainingState


def run(evaluations, *, metric="accuracy", patience=3, total_steps=1000, every=10) -> TrainingState:
    """Feed (loss, metric value) pairs at steps every, 2*every, ... until early stopping says stop."""
    state = TrainingState(metric=metric, patience=patience, total_steps=total_steps)
    for loss, value in evaluations:
        state.step += every
        state.record_eval(loss, value)
        if state.stopped:
            break
    state.finish()
    return state


def test_the_budget_ending_while_the_metric_improves_is_not_a_plateau():
    state = run([(2.0, 0.1), (1.5, 0.3), (1.2, 0.5), (1.0, 0.6)], total_steps=40)
    assert state.stop_reason == "budget"
    assert (state.best_step, state.best_metric) == (40, 0.6)
    plateaued, note = state.plateau()
    assert plateaued is False
    assert note == ("accuracy may still improve: the 40-step budget ended training 0 evaluation(s) after its best "
                    "accuracy 0.6 at step 40, fewer than the 3 that make a plateau; raise max_steps")  # fmt: skip


def test_early_stopping_after_patience_evaluations_without_any_improvement():
    state = run([(2.0, 0.1), (1.0, 0.6), (1.1, 0.6), (1.2, 0.5), (1.3, 0.6), (0.9, 0.9)])
    assert state.stop_reason == "early_stopping" and state.step == 50  # the last evaluation never happens
    assert (state.best_step, state.best_metric, state.best_loss) == (20, 0.6, 1.0)
    assert state.plateau() == (True, "accuracy plateaued: best accuracy 0.6 at step 20, then 3 evaluations "
                                     "without a better one")  # fmt: skip


def test_a_metric_stuck_at_zero_while_the_loss_falls_keeps_training():
    """Exact match moves in steps: the eval loss shows learning before the metric does."""
    state = run([(3.0, 0.0), (2.5, 0.0), (2.0, 0.0), (1.5, 0.0), (1.0, 0.0), (0.5, 0.2)], total_steps=60)
    assert state.stop_reason == "budget"
    assert state.eval_metric == [[10, 0.0], [20, 0.0], [30, 0.0], [40, 0.0], [50, 0.0], [60, 0.2]]


def test_equal_metrics_keep_the_lower_loss_and_a_perfect_metric_stops_on_patience():
    # Accuracy 1.0 from step 20: the loss still falls, but no evaluation can beat the metric.
    state = run([(1.0, 0.5), (0.5, 1.0), (0.3, 1.0), (0.2, 1.0), (0.25, 1.0), (0.1, 1.0)])
    assert state.stop_reason == "early_stopping" and state.step == 50
    assert (state.best_step, state.best_loss, state.first_best_step) == (40, 0.2, 20)
    assert state.plateau() == (True, "accuracy reached 1, the best possible, at step 20")


def test_perplexity_is_lower_is_better():
    state = run([(2.0, 7.4), (1.0, 2.7), (1.5, 4.5)], metric="perplexity", total_steps=30)
    assert (state.best_step, state.best_metric) == (20, 2.7)
    assert state.plateau()[0] is False  # one evaluation since the best: too few to call it a plateau


def test_without_early_stopping_a_plateau_is_three_evaluations_past_the_best():
    state = run([(1.0, 0.5), (1.0, 0.7), (1.0, 0.7), (1.0, 0.7), (1.0, 0.7)], patience=None, total_steps=50)
    assert state.stop_reason == "budget" and state.plateau()[0] is True


def test_no_evaluation_tells_nothing():
    assert run([], total_steps=10).plateau() == (None, "no eval split: nothing tells whether training plateaued")


def test_train_loss_is_logged_as_the_mean_of_each_interval():
    state = TrainingState(metric="accuracy", patience=None, total_steps=5)
    logged = []
    for loss in (4.0, 2.0, 3.0, 1.0, 5.0):
        state.step += 1
        logged.append(state.log_train_loss(loss, every=2))
    assert logged == [None, 3.0, None, 2.0, 5.0]  # the last step logs what is left
    assert state.train_loss == [[2, 3.0], [4, 2.0], [5, 5.0]]
