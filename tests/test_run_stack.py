"""`make run`'s supervisor (tools.run_stack): how soon it restarts a process that died."""
from __future__ import annotations

from tools.run_stack import Restarts


def test_a_first_exit_restarts_at_once_and_repeated_exits_back_off(capsys):
    """The first exit restarts at once; exits that follow within a minute wait 1, 2, 4 ... up to 30 s."""
    restarts = Restarts("tritonserver")
    delays = [restarts.after_exit(-9, "log") for _ in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert "restarting it now" in capsys.readouterr().err


def test_a_minute_of_running_resets_the_backoff():
    """A process that ran for over a minute before dying is restarted at once again."""
    restarts = Restarts("tritonserver")
    restarts.after_exit(-9, "log")
    restarts.after_exit(-9, "log")
    restarts.started -= 61  # as if restarted over a minute ago
    assert restarts.after_exit(-9, "log") == 0.0
