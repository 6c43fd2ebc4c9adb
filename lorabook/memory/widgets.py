"""Pictures of memory: stacked bars by category (``plot_breakdown``) and an ipywidgets calculator over
``lorabook.memory.estimate`` (``calculator``)."""
from __future__ import annotations

from .estimate import CATEGORIES, ESTIMATE_OPTIMIZERS, estimate
from .spec import KNOWN_MODELS

__all__ = ["COLORS", "plot_breakdown", "calculator"]

COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#c44e52", "activations": "#55a868"}


def plot_breakdown(results: dict, ax=None, title: str | None = None):
    """Stacked bars by category (weights, gradients, optimizer, activations) at the peak, one per label.

    results: {label: Estimate or Measurement}. A dash marks an Estimate's seed sum (the four slots added up).
    Returns the matplotlib figure (call plt.show())."""
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results must map at least one label to an Estimate or a Measurement")
    fig, ax = (plt.subplots(figsize=(5, 3)) if ax is None else (ax.figure, ax))
    top = max(max(r.total, getattr(r, "naive_total", 0)) for r in results.values())
    unit, div = next((u, d) for u, d in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10),
                                          ("B", 1)) if top >= d or d == 1)
    labels = list(results)
    bottom = [0.0] * len(labels)
    for cat in CATEGORIES:
        vals = [getattr(results[k], cat) / div for k in labels]
        ax.bar(labels, vals, bottom=bottom, color=COLORS[cat], label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, k in enumerate(labels):
        if hasattr(results[k], "naive_total"):
            ax.plot([i - 0.4, i + 0.4], [results[k].naive_total / div] * 2, "k--", lw=1,
                    label="seed sum" if i == next(j for j, l in enumerate(labels) if hasattr(results[l],
                                                                                         "naive_total")) else None)
    ax.set_ylabel(unit)
    ax.set_title(title or "memory at the peak of a training step", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def calculator():
    """An ipywidgets calculator: pick a model, method, batch, sequence, rank, dtype, optimizer, checkpointing;
    the stacked bars (full fine-tuning next to the chosen method) and the table update."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    c = dict(model=widgets.Dropdown(options=list(KNOWN_MODELS), value="smollm2-135m", description="model"),
             method=widgets.Dropdown(options=["full", "lora", "qlora"], value="lora", description="method"),
             batch_size=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
             seq_len=widgets.SelectionSlider(options=[2 ** k for k in range(6, 15)], value=512, description="seq len"),
             lora_rank=widgets.SelectionSlider(options=[2 ** k for k in range(9)], value=8, description="rank"),
             dtype=widgets.Dropdown(options=["fp32", "bf16", "fp16", "mixed"], value="fp32", description="dtype"),
             optimizer=widgets.Dropdown(options=list(ESTIMATE_OPTIMIZERS),
                                        value="adamw", description="optimizer"),
             gradient_checkpointing=widgets.Checkbox(value=False, description="checkpointing"))

    def show(model, method, batch_size, seq_len, lora_rank, dtype, optimizer, gradient_checkpointing):
        kw = dict(dtype=dtype, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                  gradient_checkpointing=gradient_checkpointing)
        chosen = estimate(model, method, lora_rank=lora_rank, **kw)
        fig = plot_breakdown({"full": estimate(model, "full", **kw), method: chosen}, title=model)
        plt.show()
        plt.close(fig)
        print(chosen.table())

    out = widgets.interactive_output(show, c)
    ui = widgets.VBox([widgets.HBox([c["model"], c["method"], c["dtype"], c["optimizer"]]),
                       widgets.HBox([c["batch_size"], c["seq_len"], c["lora_rank"], c["gradient_checkpointing"]]), out])
    _ = display
    return ui
