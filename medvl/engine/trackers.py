"""Optional experiment trackers fed from the same typed metric events as metrics.jsonl: TensorBoard, Weights &
Biases, SwanLab (`output.report_to`). Each plots `scalars(event)`; a missing package is a clear error before
training starts."""

from __future__ import annotations

from pathlib import Path

from medvl.engine.metrics import Event, MetricSink, scalars


class TensorBoardSink:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._w = SummaryWriter(str(log_dir))

    def log(self, event: Event) -> None:
        for k, v in (scalars(event) or {}).items():
            self._w.add_scalar(k, v, event.step)

    def close(self) -> None:
        self._w.close()


class WandbSink:
    def __init__(self, run_dir: str | Path, name: str, config: dict):
        import wandb

        self._run = wandb.init(project="medvl", name=name, dir=str(run_dir), config=config)

    def log(self, event: Event) -> None:
        if (values := scalars(event)) is not None:
            self._run.log(values, step=event.step)

    def close(self) -> None:
        self._run.finish()


class SwanlabSink:
    def __init__(self, run_dir: str | Path, name: str, config: dict):
        import swanlab

        self._run = swanlab.init(project="medvl", experiment_name=name, logdir=str(run_dir), config=config)

    def log(self, event: Event) -> None:
        if (values := scalars(event)) is not None:
            self._run.log(values, step=event.step)

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
