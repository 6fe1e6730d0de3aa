"""Training curves for people: a PNG and TensorBoard event files, written from the logged metrics."""

from __future__ import annotations

from pathlib import Path

CURVES = ("loss", "ce", "kd", "lr")


def write_tensorboard(metrics: list[dict], log_dir: str | Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for row in metrics:
        for key in (*CURVES, "tokens_per_s"):
            if row.get(key) is not None:
                writer.add_scalar(f"train/{key}", row[key], row["step"])
    writer.close()


def plot_curves(metrics: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "ce", "kd"):
        axes[0].plot(steps, [m[key] for m in metrics], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(steps, [m["lr"] for m in metrics], color="tab:gray")
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
