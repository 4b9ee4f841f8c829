"""What a reader draws from run histories: the metric panels, smoothing, and the lines of each run (cut to a
zoom window, positive-only on a log scale). The dashboard and `medvl plot` both draw these, so they agree."""

from __future__ import annotations

from dataclasses import dataclass

from medvl.engine.history import RunHistory


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    prefix: str  # series whose name is this or starts with this + "/"
    smoothed: bool = False


METRICS = (Metric("loss", "training loss", "loss", smoothed=True), Metric("eval", "eval loss", "eval_loss"),
           Metric("bench", "benchmark accuracy", "bench"), Metric("lr", "learning rate", "lr"),
           Metric("grad", "grad norm", "grad_norm", smoothed=True), Metric("tokens", "supervised tokens/s", "tokens_per_s"),
           Metric("samples", "samples/s", "samples_per_s"), Metric("memory", "memory per device (GB)", "memory_gb"),
           Metric("gpu", "GPU utilisation (%)", "gpu_util"))


def smooth(values: list[float], weight: float, stride: int = 1) -> list[float]:
    """TensorBoard's debiased exponential moving average; `weight` per logged step (0 = raw, 0.99 = heavy),
    raised to the series stride so a downsampled curve smooths like the full one."""
    if weight <= 0 or not values:
        return list(values)
    w = weight ** max(1, stride)
    out, last, debias = [], 0.0, 1.0
    for v in values:
        last = last * w + (1 - w) * v
        debias *= w
        out.append(last / (1 - debias))
    return out


@dataclass
class Line:
    """One drawn line: a run's series, raw or smoothed, cut to the zoom window (what both the dashboard and
    `medvl plot` draw, so they agree)."""

    run: int
    label: str
    steps: list[float]
    values: list[float]
    raw: bool = False


def run_labels(runs: list[RunHistory]) -> list[str]:
    """Run directory names, with their parent where two runs share a name."""
    names = [h.run_dir.name or str(h.run_dir) for h in runs]
    return [f"{h.run_dir.parent.name}/{n}" if names.count(n) > 1 else n for h, n in zip(runs, names)]


def lines_for(runs: list[RunHistory], metric: Metric, *, smoothing: float = 0.6, last: int | None = None,
              log: bool = False) -> list[Line]:
    out = []
    for i, (h, run_label) in enumerate(zip(runs, run_labels(runs))):
        for name, s in h.series_for(metric):
            steps, values = s.points()
            if last and steps:
                lo = steps[-1] - last
                keep = [j for j, x in enumerate(steps) if x >= lo]
                steps, values = [steps[j] for j in keep], [values[j] for j in keep]
            if log:
                keep = [j for j, v in enumerate(values) if v > 0]
                steps, values = [steps[j] for j in keep], [values[j] for j in keep]
            if not steps:
                continue
            part = name[len(metric.prefix) + 1:] if name != metric.prefix else ""
            part = f"device {part}" if metric.key in ("memory", "gpu") and part else part
            label = " ".join(p for p in (run_label if len(runs) > 1 else "", part) if p) or metric.title
            if metric.smoothed and smoothing > 0:
                out.append(Line(i, label + " (raw)", steps, values, raw=True))
                out.append(Line(i, label, steps, smooth(values, smoothing, s.stride)))
            else:
                out.append(Line(i, label, steps, values))
    return out
