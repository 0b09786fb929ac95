"""The benchmark report: a markdown summary and PNG plots from the result dict."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

YARDSTICK = {"torch": "AdamW", "jax": "adamw"}


def _fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def ablation_markdown(result):
    """One row per configuration: mean validation loss relative to AdamW on each task, and state relative to AdamW."""
    tasks = result["quality"]["torch"]
    names = [n for n in next(iter(tasks.values())) if n not in ("steps", "AdamW")]
    lines = ["| configuration | " + " | ".join(tasks) + " | worst gap | state vs AdamW (max) |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    for name in names:
        cells, gaps, states = [], [], []
        for entries in tasks.values():
            e, adamw = entries[name], entries["AdamW"]
            gaps.append(e["val_loss_mean"] / adamw["val_loss_mean"] - 1)
            states.append(e["state_bytes"] / adamw["state_bytes"])
            cells.append(f"{gaps[-1]:+.1%} (±{e['val_loss_std'] / adamw['val_loss_mean']:.1%})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(gaps):+.1%} | {max(states):.2f} |")
    lines += ["", "Each cell: mean final validation loss over the seeds relative to LR-tuned AdamW's "
              "(negative is better), and in brackets the configuration's seed standard deviation relative to "
              "AdamW's mean."]
    return "\n".join(lines) + "\n"


def summary_markdown(result):
    machine = result["machine"]
    lines = [f"Run of {result['date']} on commit {machine.get('commit')}, {machine['platform']}, "
             f"{machine['cpu_count']} CPUs, torch {machine.get('torch')}, jax {machine.get('jax')}; "
             f"{result['seeds']} seed(s){' (quick mode)' if result['quick'] else ''}.", ""]
    if result.get("suite") == "ablation" and all("AdamW" in t for t in result["quality"]["torch"].values()):
        lines += ["### STAC ablation: validation loss vs AdamW", "", ablation_markdown(result)]
    for framework, tasks in result["quality"].items():
        for task, entries in tasks.items():
            yardstick = entries.get(YARDSTICK[framework])
            lines += [f"### {framework}: {task} ({entries['steps']} steps)", "",
                      "| optimizer | best lr | val loss mean [min, max] | vs AdamW | val acc | state | state vs AdamW "
                      "| step ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name, e in entries.items():
                if name == "steps":
                    continue
                rel_loss = f"{e['val_loss_mean'] / yardstick['val_loss_mean'] - 1:+.1%}" if yardstick else "-"
                rel_state = f"{e['state_bytes'] / yardstick['state_bytes']:.2f}" if yardstick and \
                    yardstick["state_bytes"] else "-"
                accuracy = f"{e['val_accuracy_mean']:.3f}" if e["val_accuracy_mean"] is not None else "-"
                lines.append(f"| {name} | {e['best_lr']:g} | {e['val_loss_mean']:.4f} [{e['val_loss_min']:.4f}, "
                             f"{e['val_loss_max']:.4f}] | {rel_loss} | {accuracy} | {_fmt_bytes(e['state_bytes'])} "
                             f"| {rel_state} | {e['step_ms']:.3f} |")
            lines.append("")
    speed = result.get("speed")
    if speed:
        for framework in ("torch", "jax"):
            for shape, block in speed.get(framework, {}).items():
                lines += [f"### speed, {framework}: {shape} ({block['n_params'] / 1e6:.1f}M parameters, "
                          f"{block['n_tensors']} tensors; yardstick {block['yardstick']}"
                          + (f"; bandwidth floor {block['floor_gb_per_s']:.1f} GB/s" if "floor_gb_per_s" in block
                             else "")
                          + (f", read floor {block['read_floor_gb_per_s']:.1f} GB/s" if "read_floor_gb_per_s" in block
                             else "") + ")", "",
                          "| optimizer | step ms | vs yardstick | state | of bandwidth floor | of read floor "
                          "| compile s |",
                          "|---|---:|---:|---:|---:|---:|---:|"]
                for name, e in block["optimizers"].items():
                    floor, read_floor = (f"{e[key]:.0%}" if e.get(key) is not None else "-"
                                         for key in ("floor_fraction", "read_floor_fraction"))
                    compile_s = f"{e['compile_s']:.2f}" if e["compile_s"] is not None else "-"
                    lines.append(f"| {name} | {e['step_ms_median']:.2f} | {e['ratio_to_yardstick']:.2f} | "
                                 f"{_fmt_bytes(e['state_bytes'])} | {floor} | {read_floor} | {compile_s} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def plots(result, out):
    quality = [(fw, task, entries) for fw, tasks in result["quality"].items() for task, entries in tasks.items()]
    if quality:
        fig, axes = plt.subplots(1, len(quality), figsize=(4.2 * len(quality), 3.6), squeeze=False)
        for ax, (framework, task, entries) in zip(axes[0], quality):
            for name, e in entries.items():
                if name != "steps" and e["curve_mean"]:
                    ax.plot(range(1, len(e["curve_mean"]) + 1), e["curve_mean"], label=name,
                            linewidth=2.2 if name.startswith(("STAC", "STAM")) else 1.2)
            ax.set_title(f"{framework}: {task}", fontsize=9)
            ax.set_xlabel("evaluation (every 10% of steps)", fontsize=8)
            ax.set_ylabel("validation loss", fontsize=8)
            ax.set_yscale("log")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for framework, task, entries in quality:
            yardstick = entries.get(YARDSTICK[framework])
            if not yardstick or not yardstick["state_bytes"]:
                continue
            for name, e in entries.items():
                if name == "steps":
                    continue
                x, y = e["state_bytes"] / yardstick["state_bytes"], e["val_loss_mean"] / yardstick["val_loss_mean"]
                ax.scatter(x, y, s=18)
                ax.annotate(f"{name} ({task[:6]})", (x, y), fontsize=5)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("optimizer-state bytes / AdamW's")
        ax.set_ylabel("final validation loss / AdamW's")
        ax.set_title("memory vs quality (each point: one optimizer on one task)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "memory_vs_quality.png", dpi=110)
        plt.close(fig)

    speed = result.get("speed")
    if speed:
        blocks = [(fw, shape, block) for fw in ("torch", "jax") for shape, block in speed.get(fw, {}).items()]
        fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks), 3.8), squeeze=False)
        for ax, (framework, shape, block) in zip(axes[0], blocks):
            names = list(block["optimizers"])
            ax.barh(names, [block["optimizers"][n]["ratio_to_yardstick"] for n in names])
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_title(f"{framework} {shape}: step time / {block['yardstick']}", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "step_time.png", dpi=110)
        plt.close(fig)
