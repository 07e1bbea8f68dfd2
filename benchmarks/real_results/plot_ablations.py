"""The table and the figure of the ablations (issue 19, item 3) from the JSON that ablations.py wrote.

    python benchmarks/real_results/plot_ablations.py OUT/ablations.json --figure docs/figures/ablations.png \
        --table ablations.md

The table needs nothing but Python; the figure (BrierLM and Brier-1 against training FLOPs, one line per arm, over
the checkpoints every --curve_every steps) needs matplotlib, which the GPU machine lacks: plot on the CPU machine
(`python -m pip install matplotlib`). ablations.py imports `markdown_table` from here to print the table itself.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


FINISHED = ("done", "truncated")  # statuses whose curves and figures are reported


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{scale * value:.{digits}f}"


def _score(point: dict, key: str, scale: float) -> str:
    """`mean +- std` of a curve point's Brier value over the seeds (the mean alone for one seed)."""
    mean = _fmt(point.get(key), scale)
    std = (point.get("std") or {}).get(key)
    return mean if std is None or math.isnan(std) else f"{mean} +- {_fmt(std, scale)}"


def _changes(record: dict) -> str:
    changes = record.get("changes") or {}
    if not changes:
        return "(baseline)" if record.get("model") != "transformer" else "softmax LM, same backbone"
    return ", ".join(f"{key} {value}" for key, value in changes.items())


def _common_point(record: dict, baseline: dict) -> tuple[dict, dict] | None:
    """The arm's and the baseline's checkpoints at the last step both have (None when they share none)."""
    reference = {p["step"]: p for p in baseline.get("curve") or []}
    shared = [p for p in record.get("curve") or [] if p["step"] in reference]
    return (shared[-1], reference[shared[-1]["step"]]) if shared else None


def markdown_table(results: dict) -> str:
    """One row per arm: its change against the baseline CALM, steps, training FLOPs, training time (while sharing
    the GPU with the other arms) and the last checkpoint's Brier-1, Brier-2 and BrierLM on the held-out text, mean
    +- std over the seeds; the last column compares Brier-1 with the baseline's at the same step (the last step
    both reached, named when it is not the arm's last checkpoint)."""
    setup = results.get("setup", {})
    baseline_name = setup.get("baseline", "calm")
    arms = results.get("arms", {})
    baseline = arms.get(baseline_name, {})
    lines = [
        "| arm | change against `" + baseline_name + "` | status | steps | training FLOPs | train s | steps/s "
        "| final loss | Brier-1 x 100 | Brier-2 x 100 | BrierLM | Brier-1 x 100 minus baseline's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, record in arms.items():
        curve = record.get("curve") or []
        last = curve[-1] if curve else {}
        status = record.get("status", "?")
        if status == "truncated":
            status = f"truncated ({record.get('steps')} of {record.get('steps_requested')})"
        delta = "-"
        common = _common_point(record, baseline) if name != baseline_name else None
        if common is not None:
            mine, reference = common
            delta = f"{100 * (mine['brier_1'] - reference['brier_1']):+.2f}"
            if mine["step"] != last["step"]:
                delta += f" (step {mine['step']})"
        flops = record.get("train_flops")
        lines.append(
            f"| {name} | {_changes(record)} | {status} | {record.get('steps', '-')} "
            f"| {'-' if flops is None else f'{flops:.2e}'} | {_fmt(record.get('train_seconds'), digits=1)} "
            f"| {_fmt(record.get('steps_per_second'), digits=1)} | {_fmt(record.get('final_loss'), digits=3)} "
            f"| {_score(last, 'brier_1', 100) if last else '-'} | {_score(last, 'brier_2', 100) if last else '-'} "
            f"| {_score(last, 'brier_lm', 1) if last else '-'} | {delta} |"
        )
    notes = []
    autoencoders = results.get("autoencoders", {})
    if autoencoders:
        parts = [f"{name}: {r.get('status')}, {r.get('steps', '-')} steps, {_fmt(r.get('train_seconds'), digits=1)} s, "
                 f"held-out token accuracy (z sampled) "
                 f"{_fmt((r.get('heldout_eval') or {}).get('accuracy_posterior_sample'), 100, 3)} %"
                 for name, r in autoencoders.items()]
        notes.append("Autoencoders: " + "; ".join(parts) + ".")
    for name, reason in (results.get("skipped_arms") or {}).items():
        notes.append(f"Not run: {name}: {reason}")
    arguments = setup.get("arguments", {})
    if arguments:
        notes.append(
            f"Held-out text, {arguments.get('eval_blocks')} blocks of {arguments.get('eval_block_size')} tokens, seeds "
            f"{arguments.get('seeds')}; every arm {arguments.get('steps')} optimizer steps of "
            f"{arguments.get('lm_batch')} x {arguments.get('block_size')} tokens, {arguments.get('parallel')} arms "
            "at a time on one GPU (train s is wall time while sharing it). Final loss: each head's own training loss "
            "(not comparable across head types or with the Transformer's cross-entropy)."
        )
    return "\n".join(lines + [""] + notes) + "\n"


def plot(results: dict, path: Path) -> None:
    """BrierLM and Brier-1 (x 100) on the held-out text against training FLOPs, one line per arm."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("The figure needs matplotlib (python -m pip install matplotlib); the table does not: run "
                         "without --figure.") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results.get("setup", {})
    baseline = setup.get("baseline", "calm")
    arms = {name: r for name, r in results.get("arms", {}).items() if r.get("curve")}
    palette = plt.get_cmap("tab20")
    colors = [palette(i) for i in range(20) if i not in (14, 15)]  # tab20 without its grays (the Transformer's)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    others = 0
    for name, record in arms.items():
        curve = record["curve"]
        flops = [p["flops"] for p in curve]
        if name == baseline:
            style = dict(color="black", linewidth=2.5, marker="o", zorder=3)
        elif record.get("model") == "transformer":
            style = dict(color="tab:gray", linestyle="--", linewidth=2, marker="s")
        else:
            style = dict(color=colors[others % len(colors)], linewidth=1.2, marker=".")
            others += 1
        for ax, key, scale in ((axes[0], "brier_lm", 1), (axes[1], "brier_1", 100)):
            values = [scale * p[key] for p in curve]
            errors = [scale * (p.get("std") or {}).get(key, 0.0) for p in curve]
            ax.errorbar(flops, values, yerr=errors, label=name, capsize=2, **style)
    for ax, label in ((axes[0], "BrierLM"), (axes[1], "Brier-1 x 100")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"{label} (held-out text)")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    environment = setup.get("environment") or {}
    arguments = setup.get("arguments", {})
    fig.suptitle(f"Ablations of the CALM baseline, {arguments.get('steps')} steps each "
                 f"({environment.get('device', '?')}, torch {environment.get('torch', '?')}); mean +- std over seeds "
                 f"{arguments.get('seeds')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="ablations.json")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (PNG; needs matplotlib)")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results}: no such file (the ablations.json that ablations.py wrote)")
    results = json.loads(args.results.read_text())
    table = markdown_table(results)
    if args.table is None:
        print(table, end="")
    else:
        args.table.write_text(table)
    if args.figure is not None:
        plot(results, args.figure)


if __name__ == "__main__":
    main()
