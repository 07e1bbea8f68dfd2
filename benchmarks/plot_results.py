"""Figures of docs/RESULTS.md from the JSON files the GPU runs wrote (docs/results/). Needs matplotlib.

    pip install matplotlib
    python benchmarks/plot_results.py                      # reads docs/results/, writes docs/figures/
"""

import argparse
import itertools
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def _finish(fig, title: str, environment: dict, path: Path) -> None:
    """Suptitle with the machine and versions, then write and close the figure."""
    fig.suptitle(f"{title} ({environment['device']}, torch {environment['torch']}, "
                 f"transformers {environment['transformers']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_generation(report: dict, path: Path) -> None:
    """Tokens/s of every configuration, grouped by batch size (log scale)."""
    rows = report["results"]

    def label(row):
        return row["model"] + (f" T={row['temperature']}" if row["temperature"] is not None else "")

    labels = list(dict.fromkeys(label(row) for row in rows))  # first-seen order
    speed = {(label(row), row["batch_size"]): row["tokens_per_second"] for row in rows}
    batches = sorted({row["batch_size"] for row in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        values = [speed.get((name, batch), 0) for name in labels]
        colors = ["tab:blue" if label.startswith("CALM") else "tab:gray" for label in labels]
        bars = ax.barh(labels, values, color=colors)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("generated tokens per second (log scale)")
        for bar, value in zip(bars, values):
            ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:,.0f}", va="center", fontsize=8)
        ax.invert_yaxis()
    _finish(fig, "Generation, CALM-M shape vs same-backbone Llama, 64-token prompts, 512 new tokens",
            report["environment"], path)


def plot_real_results(results: dict, path: Path, companions: dict | None = None) -> None:
    """Brier-1 and Brier-2 on the evaluation subset against training FLOPs: CALM vs the Transformer baseline, plus
    the CALMs of companion runs (e.g. K = 2) that share the baseline."""
    runs = [(f"CALM (K={results['setup']['arguments']['patch_size']})", results["calm_training"], "tab:blue", "o-")]
    styles = itertools.cycle([("tab:green", "s-"), ("tab:purple", "^-"), ("tab:orange", "v-")])
    for companion in (companions or {}).values():
        color, marker = next(styles)
        label = f"CALM (K={companion['setup']['arguments']['patch_size']})"
        runs.append((label, companion["calm_training"], color, marker))
    runs.append(("Transformer baseline", results["baseline_training"], "tab:gray", "o--"))
    heldout = results.get("brier_lm_heldout")  # in-domain held-out text: a third panel of bars
    fig, axes = plt.subplots(1, 3 if heldout else 2, figsize=(16.5 if heldout else 11, 4))
    for label, training, color, style in runs:
        curve = training["curve"]
        flops = [point["flops"] for point in curve]
        for ax, n in zip(axes, (1, 2)):
            ax.plot(flops, [100 * point[f"brier_{n}"] for point in curve], style, color=color, label=label)
    for ax, n in zip(axes, (1, 2)):
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"Brier-{n} x 100 (eval subset)")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if heldout:
        _plot_heldout_bars(axes[2], heldout, {"calm": runs[0][0], "baseline": "Transformer baseline"},
                           {"calm": runs[0][2], "baseline": "tab:gray"})
    setup = results["setup"]
    _finish(fig, f"Real text, {setup['arguments']['lm_seconds']:.0f} s of training each", setup, path)


def _plot_heldout_bars(ax, heldout: dict, labels: dict, colors: dict) -> None:
    """Brier-1..4 x 100 (mean and std over seeds) of each model on the in-domain held-out text."""
    names = [name for name in labels if name in heldout]
    width = 0.8 / len(names)
    positive = all(heldout[name]["mean"][f"brier_{n}"] > 0 for name in names for n in range(1, 5))
    for i, name in enumerate(names):
        mean, std = heldout[name]["mean"], heldout[name]["std"]
        positions = [n - 1 + (i - (len(names) - 1) / 2) * width for n in range(1, 5)]
        values = [100 * mean[f"brier_{n}"] for n in range(1, 5)]
        ax.bar(positions, values, width, yerr=[100 * std[f"brier_{n}"] for n in range(1, 5)], color=colors[name],
               label=f"{labels[name]}: BrierLM {mean['brier_lm']:.2f}")
    ax.set_xticks(range(4), [f"Brier-{n}" for n in range(1, 5)])
    if positive:  # the 4-gram scores are small: a log scale shows all four
        ax.set_yscale("log")
    else:
        ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("x 100, in-domain held-out text" + (" (log scale)" if positive else ""))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    results, figures = Path(args.results), Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    for source in sorted(results.glob("bench_generate_*.json")):
        target = figures / f"{source.stem}.png"
        plot_generation(json.loads(source.read_text()), target)
        print(f"wrote {target}")
    # real_results_X_k2.json (a CALM run that reused the baseline of real_results_X.json) joins X's figure.
    for source in sorted(results.glob("real_results_*.json")):
        if source.stem.endswith("_k2"):
            continue
        companions = {c.stem: json.loads(c.read_text()) for c in results.glob(f"{source.stem}_k*.json")}
        target = figures / f"{source.stem}.png"
        plot_real_results(json.loads(source.read_text()), target, companions)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
