"""Optional experiment trackers fed from the same typed metric events as metrics.jsonl: TensorBoard, Weights &
Biases, SwanLab (`output.report_to`), through accelerate's own trackers. Each plots `scalars(event)`
(medvl/engine/metrics.py, the one source of values); a missing package is a clear error before training starts."""

from __future__ import annotations

from pathlib import Path

from medvl.engine.metrics import Event, MetricSink, scalars


class TrackerSink:
    """A MetricSink over an accelerate tracker (`start()`, `log(values, step=)`, `finish()`). The trackers log
    through accelerate's state, so they are built after the Accelerator (engine/train.py, main process only)."""

    def __init__(self, tracker):
        tracker.start()  # what Accelerator.init_trackers would do; medvl keeps its own sinks instead
        self.tracker = tracker

    def log(self, event: Event) -> None:
        if (values := scalars(event)) is not None:
            self.tracker.log(values, step=event.step)

    def close(self) -> None:
        self.tracker.finish()


def _tracker(backend: str, run_dir: Path, name: str, config: dict):
    from accelerate.tracking import SwanLabTracker, TensorBoardTracker, WandBTracker

    makers = {  # the same init calls medvl made itself: project "medvl", the run's name, its directory, the recipe
        "tensorboard": lambda: TensorBoardTracker("tensorboard", run_dir),  # logging_dir/run_name: RUN/tensorboard
        "wandb": lambda: WandBTracker("medvl", name=name, dir=str(run_dir), config=config),  # run_name: the project
        "swanlab": lambda: SwanLabTracker("medvl", experiment_name=name, logdir=str(run_dir), config=config),
    }
    return makers[backend]()


def reporting_sinks(report_to: list[str], run_dir: Path, name: str, config: dict) -> list[MetricSink]:
    """Optional backends; a missing package is a clear error before training starts, not at step 1000."""
    from medvl.errors import MedvlError

    sinks = []
    for backend in report_to:
        try:
            sinks.append(TrackerSink(_tracker(backend, Path(run_dir), name, config)))
        except ImportError:
            for built in sinks:  # the backends already started are not in the run's sinks yet
                built.close()
            # the package is named as the backend (accelerate also takes tensorboardX for tensorboard)
            raise MedvlError(f"output.report_to lists {backend} but the '{backend}' package is not installed",
                             fix=f"pip install {backend}, or remove {backend} from output.report_to") from None
    return sinks
