"""SIGINT and SIGTERM during training: finish the step in progress, save a checkpoint, stop in one line.

A signal only sets a flag; the loop looks at it between steps (``StopRequest.requested``), so a
checkpoint is never cut in half by the handler. Every process of a launch gets the signal (torchrun and
accelerate forward it), and the flag is agreed on with one all-reduce, so all processes stop after the
same step and write the checkpoint together. A second SIGINT while stopping interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
from accelerate import Accelerator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint (or with the newest one as it was)."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}: {checkpoint}; continue with "
            "--resume_from_checkpoint latest"
        )


class StopRequest:
    """A context manager that turns SIGINT / SIGTERM into a request the training loop checks."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        return self.__enter__()

    def restore(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> StopRequest:
        if (
            threading.current_thread() is threading.main_thread()
        ):  # handlers live in the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal any process received (the same answer on every process), or None."""
        mine = self.signum or 0
        # One answer on every process: the largest signal number any of them got.
        if accelerator.num_processes > 1:
            mine = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).max())
        return mine or None
