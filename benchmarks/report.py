"""``docs/benchmark/README.md``, written from ``report.json`` alone so it cannot drift from the numbers; and the
headline table the top-level README quotes (``headline_table``)."""

import math

from benchmarks import protocol

YARDSTICK = {"torch": "AdamW", "jax": "adamw"}
MEMORY_PEERS = ("AdamW8bit", "Adafactor")  # what a user who wants AdamW's quality at less memory picks today


def _bytes(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _percent(value):
    return f"{value:+.1%}".replace("-", "−")


def compare(entry, reference):
    """``(cell, verdict)``: an entry's mean validation loss against a reference's, bold when better by more than
    ``protocol.TIE_SE`` standard errors, "tie" within; a seed that diverged counts as worse, a failure as nothing."""
    if entry.get("mean") is None and not entry.get("diverged"):
        return ("failed" if entry.get("failures") else "-"), None
    if entry.get("diverged"):
        return f"diverged ({entry['diverged']} of {len(entry['val_losses'])} seeds)", "worse"
    gap, se = protocol.relative_gap(entry, reference)
    if gap is None:
        return "-", None
    text = _percent(gap) + (f" ± {se:.1%}" if se is not None else "")
    verdict = protocol.verdict(gap, se)
    return {"tie": f"tie ({text})", "better": f"**{text}**"}.get(verdict, text), verdict


def _state_range(tasks, name, yardstick):
    ratios = [block["optimizers"][name]["state_bytes"] / block["optimizers"][yardstick]["state_bytes"]
              for block in tasks.values() if name in block["optimizers"] and yardstick in block["optimizers"]
              and block["optimizers"][name].get("state_bytes") is not None
              and block["optimizers"][yardstick].get("state_bytes")]
    if not ratios:
        return "-"
    low, high = min(ratios), max(ratios)
    return f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%}–{high:.0%}"


def gap_table(tasks, names, reference, framework="torch"):
    """Rows ``names``, a column per task: each mean validation loss against ``reference``'s on that task, with the
    standard error of the gap; then the state's range against the yardstick's and the better/tie/worse count."""
    yardstick = YARDSTICK[framework]
    lines = [f"| optimizer | state vs {yardstick} | " + " | ".join(tasks) + " | better / tie / worse |",
             "|---|---:|" + "---:|" * len(tasks) + ":---:|"]
    for name in names:
        cells, counts = [], {"better": 0, "tie": 0, "worse": 0}
        for block in tasks.values():
            entry, ref = block["optimizers"].get(name), block["optimizers"].get(reference)
            if entry is None or ref is None:
                cells.append("-")
                continue
            cell, verdict = compare(entry, ref)
            cells.append(cell)
            if verdict:
                counts[verdict] += 1
        lines.append(f"| {name} | {_state_range(tasks, name, yardstick)} | " + " | ".join(cells)
                     + f" | {counts['better']} / {counts['tie']} / {counts['worse']} |")
    return "\n".join(lines) + "\n"


def headline_table(result):
    """The top-level README's table: every default-suite PyTorch optimizer's final validation loss against AdamW's
    on every task, from ``result`` (a report.json's contents)."""
    tasks = result["quality"].get("torch", {})
    if not tasks:
        return ""
    names = [n for n, e in next(iter(tasks.values()))["optimizers"].items() if e["suite"] == "default"
             and n != "AdamW"]
    return (gap_table(tasks, names, "AdamW")
            + f"\nFinal validation loss against LR-tuned AdamW's (negative is better; ± one standard error of the "
              f"gap, paired by seed; **bold**: better by more than {protocol.TIE_SE:g} standard errors; tie: "
              f"within), and optimizer state against AdamW's. Run of {result['date'][:10]} at commit "
              f"{result['machine'].get('commit')}.\n")


def _task_section(framework, task, block):
    yardstick = block["optimizers"].get(YARDSTICK[framework])
    lines = [f"### {framework}: {task}", "", f"{block['description']}; {block['steps']} steps, "
             f"{block['seeds']} seed(s).", ""]
    check = block.get("discrimination")
    if check:
        lines.append(f"Discrimination check: best ({check['best']}) and worst ({check['worst']}) differ by "
                     f"{check['standard_errors']:.1f} standard errors of their seed-paired gap: "
                     + ("passes" if check["passes"] else "**fails**") + f" (needs > {protocol.DISCRIMINATION_SE:g}).")
    resolved = protocol.resolution(block["optimizers"], YARDSTICK[framework]) if yardstick else None
    if resolved is not None:
        lines.append(f"Resolution: a gap to {YARDSTICK[framework]} under {resolved:.1%} (2 median standard errors "
                     "of the gaps to it) can be a tie at these seeds"
                     + ("." if resolved <= 0.02 else " (**more than 2%**: this task needs more seeds)."))
    lines += ["", f"| optimizer | lr | lr from | val loss ± SE | vs {YARDSTICK[framework]} | val acc | state "
                  f"| state vs {YARDSTICK[framework]} |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, e in block["optimizers"].items():
        loss = "-" if e["mean"] is None else f"{e['mean']:.4f}" + (f" ± {e['se']:.4f}" if e["se"] is not None else "")
        rel = "reference" if e is yardstick else compare(e, yardstick)[0] if yardstick else "-"
        state = (f"{e['state_bytes'] / yardstick['state_bytes']:.1%}" if yardstick and e["state_bytes"] is not None
                 and yardstick["state_bytes"] else "-")
        accuracy = f"{e['val_accuracy_mean']:.3f}" if e.get("val_accuracy_mean") is not None else "-"
        source = "this run" if e["lr_source"] == "swept in this run" else e["lr_source"]
        lr = "-" if e["best_lr"] is None else f"{e['best_lr']:g}"
        lines.append(f"| {name} | {lr} | {source} | {loss} | {rel} | {accuracy} | {_bytes(e['state_bytes'])} "
                     f"| {state} |")
    return lines + [""]


def _ablation_section(tasks):
    entries = next(iter(tasks.values()), {}).get("optimizers", {})
    if not any(e["suite"] == "ablation" for e in entries.values()):
        return []
    names = [n for n, e in entries.items() if e["suite"] == "ablation" or n.startswith("STAC")]
    lines = ["## STAC ablation", "", "STAC's candidate changes, each alone and combined (`benchmarks/optimizers.py`, "
             "`ablation_registry`), against LR-tuned AdamW and the two memory-lean peers, on the PyTorch tasks.", ""]
    for reference in ("AdamW", *MEMORY_PEERS):
        if all(reference in block["optimizers"] for block in tasks.values()):
            lines += [f"### against {reference}", "", gap_table(tasks, names, reference)]
    return lines


COMPACT = "STAC compact"
COMPACT_STATE, COMPACT_GAP = 0.25, 0.02  # its target: at most a quarter of AdamW's state, within 2% of its loss


def _against_target(entries, name):
    """``name``'s row of one task (``entries``) against STAC compact's target: state at most COMPACT_STATE of
    AdamW's, mean validation loss at most COMPACT_GAP above AdamW's, and no worse (tie or better) than each
    memory peer. ``(state, cell against AdamW, cells against the peers, misses, shortfall)``: the misses are
    phrases saying by how much (none when it meets it), the shortfall the largest loss gap past what the target
    allows (inf where a comparison has no verdict, 0 when only the state misses); None without the row's or
    AdamW's result."""
    entry, adamw = entries.get(name), entries.get("AdamW")
    if entry is None or adamw is None or entry.get("mean") is None:
        return None
    misses, cells, shortfall = [], [], 0.0
    state = entry["state_bytes"] / adamw["state_bytes"]
    if state > COMPACT_STATE:
        misses.append(f"state {state:.0%}")
    cell, verdict = compare(entry, adamw)
    gap, _ = protocol.relative_gap(entry, adamw)
    if gap is None or gap > COMPACT_GAP:
        misses.append("no gap to AdamW" if gap is None else f"{_percent(gap)} vs AdamW"
                      + (" (a tie at these seeds)" if verdict == "tie" else ""))
        shortfall = math.inf if gap is None else gap - COMPACT_GAP
    for peer in MEMORY_PEERS:
        peer_cell, verdict = compare(entry, entries[peer]) if peer in entries else ("-", None)
        cells.append(peer_cell)
        if verdict == "worse":
            gap, _ = protocol.relative_gap(entry, entries[peer])
            diverged = gap is None or gap <= 0  # worse through its diverged seeds
            misses.append(f"behind {peer} (diverged seeds)" if diverged else f"{_percent(gap)} behind {peer}")
            shortfall = math.inf if diverged else max(shortfall, gap)
        elif verdict is None:
            misses.append(f"no {peer} result" if peer not in entries else f"no verdict against {peer}")
            shortfall = math.inf
    return state, cell, cells, misses, shortfall


def _compact_target_section(tasks):
    """Per task, whether STAC compact meets its target (``_against_target``), and where it misses, which rows of
    the ablation at most COMPACT_STATE of AdamW's state meet it there and where those miss it in turn (what
    the miss would cost to fix), or the closest of them (the smallest shortfall) and by how much it misses."""
    if not any(COMPACT in block["optimizers"] and "AdamW" in block["optimizers"] for block in tasks.values()):
        return []
    lines = [f"## {COMPACT} against its target", "",
             f"At most {COMPACT_STATE:.0%} of AdamW's state, within {COMPACT_GAP:.0%} of LR-tuned AdamW's validation "
             f"loss, and at least a tie with " + " and ".join(MEMORY_PEERS) + " on every task.", "",
             "| task | state vs AdamW | vs AdamW | " + " | ".join(f"vs {peer}" for peer in MEMORY_PEERS)
             + " | target |", "|---|---:|---:|" + "---:|" * len(MEMORY_PEERS) + "---|"]
    fixes = []
    for task, block in tasks.items():
        entries = block["optimizers"]
        judged = _against_target(entries, COMPACT)
        if judged is None:
            continue
        state, cell, cells, misses, _ = judged
        lines.append(f"| {task} | {state:.0%} | {cell} | " + " | ".join(cells) + " | "
                     + ("met" if not misses else "**missed**: " + ", ".join(misses)) + " |")
        if not misses:
            continue
        rows = {name: judged for name, entry in entries.items() if entry.get("suite") == "ablation"
                and (judged := _against_target(entries, name)) and judged[0] <= COMPACT_STATE}
        meeting = [name for name, judged in rows.items() if not judged[3]]
        if meeting:
            fixes.append(f"- {task}, met by:")
        for name in meeting:
            elsewhere = []
            for other, other_block in tasks.items():
                if other == task:
                    continue
                judged = _against_target(other_block["optimizers"], name)
                if judged is None or judged[3]:
                    elsewhere.append(f"{other}: " + ("no result" if judged is None else ", ".join(judged[3])))
            fixes.append(f"  - {name}, which " + ("misses " + "; ".join(elsewhere) if elsewhere
                                                   else "meets it on every task"))
        if not meeting:
            closest = min(rows, key=lambda name: rows[name][4], default=None)
            fixes.append(f"- {task}: no row of the ablation at most {COMPACT_STATE:.0%} of AdamW's state meets it"
                         + (f"; the closest, {closest}, misses it: " + ", ".join(rows[closest][3]) if closest else "")
                         + ".")
    if fixes:
        lines += ["", "Where it misses, the rows of the ablation below that meet the target there, and where they "
                  "miss it in turn:", "", *fixes]
    return lines + [""]


def _speed_columns():
    """``(key, header, format)`` of the speed entries' fields; a column shows when some entry has its field."""
    ms = ratio = lambda v: f"{v:.2f}"  # noqa: E731
    low_high = lambda v: f"{min(v):.2f}-{max(v):.2f}"  # noqa: E731
    return [("step_ms_median", "step ms", ms), ("ratio_to_yardstick", "vs yardstick", ratio),
            ("ratio_to_yardstick_per_process", "each process", low_high),
            ("floor_ratio_to_yardstick", "own floor", ratio), ("ratio_to_floor", "vs own floor", ratio),
            ("physical_floor_ratio_to_yardstick", "physical floor", ratio), ("state_bytes", "state", _bytes),
            ("floor_fraction", "of bandwidth floor", lambda v: f"{v:.0%}"),
            ("read_floor_fraction", "of read floor", lambda v: f"{v:.0%}"), ("first_step_ms", "first step ms", ms),
            ("compile_s", "compile s", lambda v: f"{v:.2f}"), ("transient_bytes", "transient", _bytes)]


def _speed_section(speed):
    if not speed:
        return []
    if "error" in speed:
        return ["## Speed", "", f"The speed benchmark failed: {speed['error']}", ""]
    lines = ["## Speed", "", "Per-step time and memory from `benchmarks/speed.py` (its docstring has the method).", ""]
    for framework in ("torch", "jax"):
        for shape, block in speed.get(framework, {}).items():
            if not isinstance(block, dict) or "optimizers" not in block:
                continue
            floors = [f"{label} {block[key]:.1f} GB/s" for key, label in
                      (("floor_gb_per_s", "bandwidth floor"), ("read_floor_gb_per_s", "read floor")) if key in block]
            entries = block["optimizers"]
            per_process = any(e.get("ratio_to_yardstick_per_process") for e in entries.values())
            processes = (f"; medians over {block['processes']} fresh processes' rounds"
                         + (" (each process: the range of their own ratios to the yardstick)" if per_process else "")
                         if block.get("processes", 1) > 1 else "")
            lines += [f"### {framework}, {shape}: {block.get('n_params', 0) / 1e6:.1f}M parameters in "
                      f"{block.get('n_tensors', '?')} tensors; yardstick {block.get('yardstick')}"
                      + (f"; {', '.join(floors)}" if floors else "") + processes, ""]
            columns = [c for c in _speed_columns() if any(e.get(c[0]) is not None for e in entries.values())]
            lines += (_floor_lines if framework == "torch" else _jax_floor_lines)(block, {key for key, _, _ in columns})
            lines += ["| optimizer | " + " | ".join(header for _, header, _ in columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            for name, e in entries.items():
                cells = [fmt(e[key]) if e.get(key) is not None else "-" for key, _, fmt in columns]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines + _first_step_lines(speed.get("torch_first_step")) + _fsdp2_lines(speed.get("torch_fsdp2"))


def _floor_lines(block, shown):
    """What a PyTorch table's floors are, when it shows them, and the non-finite check against its read floor."""
    if "floor_ratio_to_yardstick" not in shown:
        return []
    physical = ("; physical floor: the same with the update at the bandwidth floor (a target below it is out of "
                "reach on this host)" if "physical_floor_ratio_to_yardstick" in shown else "")
    check = ""
    if "nonfinite_bookkeeping_ms" in block:
        check = (f" The non-finite check as a step pays it (its read of every gradient and the step's decision): "
                 f"{block['nonfinite_check_ms']:.2f} ms, {block['nonfinite_check_ratio_to_floor']:.2f}x its floor"
                 + (f" (each process alone: {min(ratios):.2f}-{max(ratios):.2f})"
                    if (ratios := block.get("nonfinite_check_ratio_per_process")) else "")
                 + f", torch's sum over the same bytes ({block['nonfinite_read_floor_ms']:.2f} ms); the per-tensor "
                 f"checks and pointer arrays it reads through, made once per step for the read and the update and so "
                 f"counted in the step's time: {block['nonfinite_bookkeeping_ms']:.2f} ms.")
    elif "nonfinite_check_ms" in block:  # reports before the bookkeeping was timed apart
        check = (f" The non-finite check alone: {block['nonfinite_check_ms']:.2f} ms, its read floor "
                 f"{block['nonfinite_read_floor_ms']:.2f} ms.")
    return [f"Own floor: the read the all-or-nothing policy needs before any write (the non-finite check, or the "
            f"statistics read that makes it) at the read floor plus the update's bytes at fused AdamW's measured "
            f"rate, as a ratio to the yardstick (a target below it is out of reach unless the update outruns fused "
            f"AdamW's); vs own floor: the step over it{physical}.{check}", ""]


def _jax_floor_lines(block, shown):
    """What a JAX table's floor is, when it shows one."""
    if "floor_ratio_to_yardstick" not in shown:
        return []
    return [f"Own floor: optax.adamw's step behind one read of every gradient, whose all-finite result gates the "
            f"update ({block['nonfinite_floor_ms']:.2f} ms, timed in the same rounds), as a ratio to the yardstick, "
            f"for an optimizer that reads every gradient before any write (the all-or-nothing policy) and then moves "
            f"AdamW's bytes; vs own floor: the step over it.", ""]


def _first_step_lines(first_steps):
    if not first_steps:
        return []
    repeats = next(iter(first_steps.values())).get("repeats", 1)  # reports before repeats measured one
    lines = ["### torch, first step in a fresh process (digits MLP"
             + (f"; medians of {repeats} pairs of fresh processes, cold caches then warm)" if repeats > 1 else ")"), "",
             "| optimizer | cold | warm | median step | cold / median | warm / median | constructor (cold) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in first_steps.items():
        lines.append(f"| {name} | {e['cold_s'] * 1e3:.1f} ms | {e['warm_s'] * 1e3:.1f} ms | "
                     f"{e['median_step_s'] * 1e3:.2f} ms | {e['cold_ratio_to_median']:.1f}x | "
                     f"{e['warm_ratio_to_median']:.1f}x | {e['cold_construct_s']:.2f} s |")
    return lines + [""]


def _fsdp2_lines(fsdp2):
    if not fsdp2 or "optimizers" not in fsdp2:
        return []
    lines = [f"### torch, FSDP2: {fsdp2['world_size']} {fsdp2['backend']} processes of "
             f"{fsdp2['threads_per_process']} thread, {fsdp2['shape']} shape; yardstick {fsdp2['yardstick']} "
             "under FSDP2", "", "| optimizer | step ms | vs yardstick | state per rank |", "|---|---:|---:|---:|"]
    for name, e in fsdp2["optimizers"].items():
        lines.append(f"| {name} | {e['step_ms_median']:.2f} | {e['ratio_to_yardstick']:.2f} | "
                     f"{_bytes(e['state_bytes_per_rank'])} |")
    return lines + [""]


def _failures_section(result):
    failed = [(fw, task, name, failure) for fw, tasks in result["quality"].items() for task, block in tasks.items()
              for name, e in block["optimizers"].items() for failure in e.get("failures", [])]
    if not failed:
        return []
    lines = ["## Failed runs", "", "| framework | task | optimizer | lr | seed | error |",
             "|---|---|---|---:|---:|---|"]
    lines += [f"| {fw} | {task} | {name} | {f['lr']:g} | {f['seed']} | {f['error'].splitlines()[0][:200]} |"
              for fw, task, name, f in failed]
    return lines + [""]


def readme(result):
    """The whole of ``docs/benchmark/README.md`` for ``result`` (a report.json's contents)."""
    machine = result["machine"]
    mode = {"quick": " (**quick mode**: not a measurement)", "full": ", every rate swept"}.get(result["mode"], "")
    lines = ["# Benchmark: should I switch from AdamW?", "",
             "Written by `python -m benchmarks` from `report.json`; do not edit by hand.", "",
             f"Run of {result['date']} at commit {machine.get('commit')} on {machine['platform']}, "
             f"{machine['cpu_count']} CPUs, torch {machine.get('torch')}, jax {machine.get('jax')}{mode}; "
             f"{result['elapsed_s'] / 60:.1f} minutes.", ""]
    if "torch" in result["quality"]:
        lines += ["## Headline (PyTorch)", "", headline_table(result)]
    lines += ["## Method", "", result["protocol"].split("\n\n", 1)[-1].strip(), "", "Tasks:", ""]
    lines += [f"- {fw} `{task}`: {block['description']}; {block['steps']} steps, {block['seeds']} seed(s)."
              for fw, tasks in result["quality"].items() for task, block in tasks.items()]
    lines += ["", "Optimizer state is the bytes of its state tensors as stored (a quantized state counts its codes "
              "and scales).", "", "## Per task", ""]
    for framework, tasks in result["quality"].items():
        for task, block in tasks.items():
            lines += _task_section(framework, task, block)
    lines += _compact_target_section(result["quality"].get("torch", {}))
    lines += _ablation_section(result["quality"].get("torch", {}))
    lines += _speed_section(result.get("speed"))
    lines += _failures_section(result)
    lines += ["## Plots", "", "![final validation loss](final_loss.png)", "",
              "![memory against quality](memory_vs_quality.png)", ""]
    if result.get("speed") and "error" not in result["speed"]:
        lines += ["![step time](step_time.png)", ""]
    return "\n".join(lines)
