"""Ctrl-C during training: finish the step, save, stop; a second Ctrl-C aborts at once.

    with StopFlag() as stop:
        while ...:
            step()
            if stop.requested:
                save(); break

Outside the main thread (where Python lets no one install a signal handler) Ctrl-C is left alone.
"""
import signal


class StopFlag:
    """Within `with`, the first Ctrl-C asks the loop to stop after this step; a second one aborts."""
    requested = False

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:          # not the main thread: leave Ctrl-C alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
