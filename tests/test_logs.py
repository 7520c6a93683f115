"""launcher/logs.py's callbacks, called as the Trainer calls them."""
from types import SimpleNamespace

from launcher.logs import NonFiniteLoss


def log(callback, step, **values):
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    callback.on_log(None, SimpleNamespace(global_step=step), control, values)
    return control


def test_a_non_finite_loss_or_gradient_norm_stops_the_run_and_skips_that_steps_save():
    guard = NonFiniteLoss()
    assert not log(guard, 5, loss=0.69, grad_norm=1.2).should_training_stop
    stopped = log(guard, 10, loss=0.70, grad_norm=float("nan"))
    assert stopped.should_training_stop and not stopped.should_save
    assert guard.bad[:2] == (10, "grad_norm")
    message = guard.message({"train": {"lr": 1e6}})
    assert message.startswith("training stopped at step 10: the grad_norm is nan (the last log with a finite loss "
                              "and gradient norm was at step 5)") and "train.lr=1000000.0" in message


def test_in_float16_an_overflowing_gradient_norm_is_the_loss_scalers_business():
    """The scaler skips a step whose gradients overflow and scales down: healthy float16 runs log an infinite norm."""
    guard = NonFiniteLoss(float16=True)
    assert not log(guard, 5, loss=0.69, grad_norm=float("inf")).should_training_stop and guard.bad is None
    assert log(guard, 10, loss=float("inf"), grad_norm=1.0).should_training_stop


def test_each_step_touches_the_ranks_log_for_the_launchers_stall_warning(tmp_path):
    import os

    from launcher.logs import Heartbeat

    (tmp_path / "logs").mkdir()
    log_file = tmp_path / "logs" / "rank1.log"
    log_file.write_text("rank started\n")
    os.utime(log_file, (1000, 1000))
    Heartbeat(str(tmp_path), 1).on_step_end(None, None, None)
    assert log_file.stat().st_mtime > 1000 and log_file.read_text() == "rank started\n"
