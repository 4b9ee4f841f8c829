"""`medvl train` as a background process, for `medvl train --tui`.

The dashboard never trains in its own process: it starts the very command a user would type (`python -m
medvl.commands.main train RECIPE k=v ...`, which launches torchrun itself for multi-process recipes) and reads
the run directory like `medvl watch` does. So the run directory is the same as without `--tui`, the UI's event
loop never competes with the training loop for the GIL, a crash of either one leaves the other alive, and
"leave it running" is nothing more than not stopping the process. The child has its own session (Ctrl-C or a
closed terminal reaches the dashboard, not the training) and writes its console output, one plain line per log
step, to RUN/train.log (appended, so a resumed run keeps the earlier output; `prepare_run_dir` does not count
that file as "a run already there").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TRAIN_LOG = "train.log"  # the background process's console output, inside the run directory


class BackgroundRun:
    def __init__(self, recipe: str, overrides: list[str], resume: str | None = None, *, run_dir: str | Path,
                 env: dict | None = None):
        from medvl.errors import MedvlError

        self.log_path = Path(run_dir) / TRAIN_LOG
        try:  # the run directory (and its parents) may not exist yet: a fresh run
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.touch()
        except OSError as exc:
            raise MedvlError(f"cannot write the training log {self.log_path}: {exc.strerror or exc}",
                             where=str(self.log_path), fix="choose an output.dir you can write to") from None
        self.command = [sys.executable, "-m", "medvl.commands.main", "train", str(recipe), *overrides]
        if resume:
            self.command += ["--resume", resume]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=dict(os.environ, **(env or {})))
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        """None while training runs, else its exit code (0 done, 2 a user mistake, 130 interrupted)."""
        return self._proc.poll()

    def stop(self, timeout: float = 60.0) -> int:
        """Ask training to stop as Ctrl-C would (SIGINT to its whole process group, torchrun's workers too);
        escalate to SIGTERM, then SIGKILL, if it does not end within `timeout` seconds."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self._proc.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        return self._proc.wait()

    def tail(self, n: int = 12) -> list[str]:
        """The last lines of the training output (what to show when it ends with an error)."""
        try:
            data = self.log_path.read_bytes()[-16384:]
        except OSError:
            return []
        return [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()][-n:]
