"""Ctrl-C during a search: stop the trials, keep what finished, say how to continue.

The first SIGINT sets a flag that Tune reads through its Stopper interface (`stop_all`), so
the experiment loop ends at its next step and run_search writes the reports of the
finished trials; the interrupted ones have no record and run again on `ranksearch resume`.
A second SIGINT raises KeyboardInterrupt as usual, for a search that does not stop.
(Tune's own handler is switched off in tuner.py: it would point to `Tuner.restore`.)
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ray.tune import Stopper


class InterruptStopper(Stopper):
    def __init__(self):
        self.hit = False

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.hit

    @contextlib.contextmanager
    def catching(self):
        """SIGINT sets `hit` while the block runs (main thread only: elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def first(signum, frame):
            self.hit = True
            print("\ninterrupted: stopping the running trials (Ctrl-C again to quit at once)", file=sys.stderr,
                  flush=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, first)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
