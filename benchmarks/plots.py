"""The report's three plots, from ``report.json``'s contents: final validation loss with its seed spread, memory
against quality, and step time with the bandwidth floor. Values are relative to the task's AdamW, and an axis is
clipped where one optimizer would flatten the rest (a clipped point is drawn at the edge, its value written)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import YARDSTICK  # noqa: E402

LOSS_CLIP = (-0.5, 0.5)  # the widest relative loss shown, around AdamW's 0
COLUMNS = 3


def _panels(result):
    """``[(framework, task, names, relative losses per name (one per seed), reference mean)]``."""
    panels = []
    for framework, tasks in result["quality"].items():
        for task, block in tasks.items():
            reference = block["optimizers"].get(YARDSTICK[framework], {}).get("mean")
            if not reference:
                continue
            names = [n for n, e in block["optimizers"].items() if e["mean"] is not None]
            relative = {n: [v / reference - 1 for v in block["optimizers"][n]["val_losses"] if v is not None]
                        for n in names}
            panels.append((framework, task, names, relative, block))
    return panels


def _grid(count, height):
    columns = min(count, COLUMNS)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns + 1.5, max(height, 2.4) * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


MARKERS = "osD^v<>Pp*Xhd8H"


def _styles(panels):
    """A color and marker per optimizer, the same in both frameworks (``AdamW`` and optax's ``adamw`` alike), and
    the names for the legend (the first spelling met)."""
    first_spelling = {}
    for _, _, panel_names, _, _ in panels:
        for name in panel_names:
            first_spelling.setdefault(name.lower(), name)
    names = list(first_spelling.values())
    cmap = plt.get_cmap("tab20")
    styles = {name.lower(): (cmap(index % 20), MARKERS[index % len(MARKERS)]) for index, name in enumerate(names)}
    return names, lambda name: styles[name.lower()]


def _limits(values):
    """The panel's axis: every value and AdamW's 0, within ``LOSS_CLIP``, with a margin."""
    low, high = max(min(*values, 0.0), LOSS_CLIP[0]), min(max(*values, 0.0), LOSS_CLIP[1])
    margin = 0.06 * (high - low) or 0.01
    return low - margin, high + margin


def final_loss(result, path):
    panels = _panels(result)
    _, style = _styles(panels)
    most = max(len(p[2]) for p in panels)
    fig, axes = _grid(len(panels), 0.6 + 0.24 * most)
    for ax, (framework, task, panel_names, relative, _) in zip(axes, panels):
        low, high = _limits([v for name in panel_names for v in relative[name]])
        clip = lambda v: min(max(v, low), high)  # noqa: E731
        for row, name in enumerate(panel_names):
            values = relative[name]
            mean = sum(values) / len(values)
            ax.scatter([clip(v) for v in values], [row] * len(values), s=16, color=style(name)[0], alpha=0.8,
                       edgecolors="black", linewidths=0.3)
            ax.plot([clip(min(values)), clip(max(values))], [row, row], color=style(name)[0], linewidth=1)
            ax.scatter([clip(mean)], [row], s=40, marker="|", color="black")
            if mean > high:
                ax.annotate(f"{mean:+.0%}", (high, row), xytext=(-3, 3), textcoords="offset points",
                            ha="right", fontsize=6)
        ax.set_yticks(range(len(panel_names)), panel_names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set_xlim(low, high)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{framework}: {task}", fontsize=9)
        ax.set_xlabel(f"final validation loss vs {YARDSTICK[framework]}", fontsize=7)
    handles = [plt.Line2D([], [], color="gray", marker="o", linestyle="-", markersize=4, label="seeds (range)"),
               plt.Line2D([], [], color="black", marker="|", linestyle="none", markersize=8, label="mean")]
    axes[0].legend(handles=handles, loc="best", fontsize=7)
    fig.suptitle(f"Final validation loss per seed, relative to the task's AdamW mean (lower is better)\naxes clipped "
                 f"at {LOSS_CLIP[0]:+.0%} and {LOSS_CLIP[1]:+.0%}, a clipped mean written at the edge", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def memory_vs_quality(result, path):
    panels = _panels(result)
    names, style = _styles(panels)
    fig, axes = _grid(len(panels), 3.4)
    for ax, (framework, task, panel_names, relative, block) in zip(axes, panels):
        means = {name: sum(relative[name]) / len(relative[name]) for name in panel_names}
        low, high = _limits(list(means.values()))
        reference_bytes = block["optimizers"][YARDSTICK[framework]]["state_bytes"]
        for name in panel_names:
            entry = block["optimizers"][name]
            if not reference_bytes or entry["state_bytes"] is None:
                continue
            state = min(max(entry["state_bytes"] / reference_bytes, 6e-3), 1.8)
            color, marker = style(name)
            ax.scatter(state, min(max(means[name], low), high), s=36, color=color, marker=marker,
                       edgecolors="black", linewidths=0.4, zorder=3)
            if means[name] > high:
                ax.annotate(f"{means[name]:+.0%}", (state, high), xytext=(4, -8), textcoords="offset points",
                            fontsize=6)
        ax.set_xscale("log")
        ax.set_xlim(5e-3, 2.0)
        ax.set_ylim(low, high)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.axvline(1, color="gray", linewidth=0.8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.tick_params(labelsize=7)
        ax.set_title(f"{framework}: {task}", fontsize=9)
        ax.set_xlabel(f"optimizer state vs {YARDSTICK[framework]} (log)", fontsize=7)
        ax.set_ylabel(f"final validation loss vs {YARDSTICK[framework]}", fontsize=7)
    handles = [plt.Line2D([], [], color=style(n)[0], marker=style(n)[1], linestyle="none", markeredgecolor="black",
                          markeredgewidth=0.4, label=n) for n in names]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Memory against quality (mean over seeds; lower left is better)\nloss axes clipped at "
                 f"{LOSS_CLIP[0]:+.0%} and {LOSS_CLIP[1]:+.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def step_time(speed, path):
    blocks = [(fw, shape, block) for fw in ("torch", "jax") for shape, block in speed.get(fw, {}).items()
              if isinstance(block, dict) and "optimizers" in block]
    if not blocks:
        return False
    fig, axes = _grid(len(blocks), 0.8 + 0.25 * max(len(b["optimizers"]) for *_, b in blocks))
    for ax, (framework, shape, block) in zip(axes, blocks):
        names = list(block["optimizers"])
        entries = [block["optimizers"][n] for n in names]
        ax.barh(range(len(names)), [e.get("ratio_to_yardstick") or 0 for e in entries], color="tab:blue")
        floors = [(row, e["floor_fraction"] * e["ratio_to_yardstick"]) for row, e in enumerate(entries)
                  if e.get("floor_fraction") and e.get("ratio_to_yardstick")]
        if floors:
            ax.scatter([f for _, f in floors], [row for row, _ in floors], marker="|", s=120, color="black",
                       zorder=3, label="bandwidth floor")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{framework} {shape}: step time / {block.get('yardstick')}", fontsize=9)
        ax.set_xlabel("step time relative to the yardstick (lower is faster)", fontsize=7)
    fig.suptitle("Optimizer step time relative to the yardstick's; the bandwidth floor (black tick) is the time "
                 "the step's bytes moved take at the measured memory bandwidth", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_all(result, out):
    """Writes the plots the result has data for into ``out``; returns their file names."""
    written = []
    if _panels(result):
        final_loss(result, out / "final_loss.png")
        memory_vs_quality(result, out / "memory_vs_quality.png")
        written += ["final_loss.png", "memory_vs_quality.png"]
    speed = result.get("speed") or {}
    if "error" not in speed and step_time(speed, out / "step_time.png"):
        written.append("step_time.png")
    return written
