"""Metric events and where they go.

`metrics.jsonl` in the run directory is the contract between the engine and any UI (the rich console, the
Textual monitor, a script): one JSON object per line, flushed per line, written by rank 0 only. A monitor can
attach to a run that is going or finished by tailing the file.

Event kinds: `start` (run facts), `train` (step, loss, lr, grad_norm, tokens/s, samples/s, memory, eta),
`eval` (eval loss or benchmark accuracy), `warning` (guardrails), `checkpoint`, `end`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol


class MetricSink(Protocol):
    def log(self, event: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, event: dict) -> None:
        self._f.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ListSink:
    """Keeps events in memory (tests, and the in-process caller that wants them back)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def log(self, event: dict) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def scalars(event: dict) -> dict[str, float] | None:
    """`train/loss`-style scalars of a train or eval event (None for other events): what dashboards plot."""
    if event.get("kind") not in ("train", "eval") or "step" not in event:
        return None
    return {f"{event['kind']}/{k}": v for k, v in event.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


class TensorBoardSink:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._w = SummaryWriter(str(log_dir))

    def log(self, event: dict) -> None:
        for k, v in (scalars(event) or {}).items():
            self._w.add_scalar(k, v, event["step"])

    def close(self) -> None:
        self._w.close()


class WandbSink:
    def __init__(self, run_dir: str | Path, name: str, config: dict):
        import wandb

        self._run = wandb.init(project="medvl", name=name, dir=str(run_dir), config=config)

    def log(self, event: dict) -> None:
        if (values := scalars(event)) is not None:
            self._run.log(values, step=event["step"])

    def close(self) -> None:
        self._run.finish()


class SwanlabSink:
    def __init__(self, run_dir: str | Path, name: str, config: dict):
        import swanlab

        self._run = swanlab.init(project="medvl", experiment_name=name, logdir=str(run_dir), config=config)

    def log(self, event: dict) -> None:
        if (values := scalars(event)) is not None:
            self._run.log(values, step=event["step"])

    def close(self) -> None:
        self._run.finish()


def reporting_sinks(report_to: list[str], run_dir: Path, name: str, config: dict) -> list[MetricSink]:
    """Optional backends; a missing package is a clear error before training starts, not at step 1000."""
    from medvl.errors import MedvlError

    makers = {"tensorboard": (lambda: TensorBoardSink(run_dir / "tensorboard"), "tensorboard"),
              "wandb": (lambda: WandbSink(run_dir, name, config), "wandb"),
              "swanlab": (lambda: SwanlabSink(run_dir, name, config), "swanlab")}
    sinks = []
    for backend in report_to:
        make, package = makers[backend]
        try:
            sinks.append(make())
        except ImportError:
            raise MedvlError(f"output.report_to lists {backend} but the '{package}' package is not installed",
                             fix=f"pip install {package}, or remove {backend} from output.report_to") from None
    return sinks


class Fanout:
    """One sink that forwards to several; adds a wall-clock timestamp to each event."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        for s in self.sinks:
            s.log(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete events of a metrics.jsonl (a line being written right now is skipped)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                break
    return events
