"""`cacheaug report`: one Markdown file and plots comparing runs, from the JSON files `cacheaug eval` wrote.

Each run folder holds any of ``perplexity-<data>.json``, ``gsm8k-<setting>.json``, ``mc-<data>.json``,
``harness.json``; every file carries ``kind``, ``run`` (checkpoint, method, num_latents, step) and ``result``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import require_extra
from . import TABLE_OFFSETS

KINDS = ("perplexity", "gsm8k", "mc", "harness")


@dataclass
class RunResults:
    """What one run folder holds: its label, what it is, and its evaluation files by kind and name."""

    label: str
    method: str | None = None
    num_latents: int | None = None
    step: int | None = None
    files: dict[str, dict[str, dict]] = field(default_factory=lambda: {kind: {} for kind in KINDS})


def load_run(directory) -> RunResults:
    """Read every evaluation JSON of a run folder (files of other kinds are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"run folder {directory} does not exist")
    run = RunResults(label=directory.name)
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            continue
        meta = data.get("run", {})
        run.method = run.method or meta.get("method")
        run.num_latents = run.num_latents or meta.get("num_latents")
        run.step = run.step or meta.get("step")
        run.files[data["kind"]][data.get("name", path.stem)] = data
    return run


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _describe(run: RunResults) -> str:
    if run.method == "base":
        return "plain base, no latents"
    parts = [run.method or "?"]
    if run.num_latents is not None:
        parts.append(f"N_L={run.num_latents}")
    if run.step is not None:
        parts.append(f"step {run.step}")
    return ", ".join(parts)


def _overall_perplexity(result: dict, key: str) -> float:
    """exp of the mean NLL over every scored token at every offset (offsets weighted by their token counts)."""
    import math

    counts = result["tokens_by_offset"]
    return math.exp(sum(n * c for n, c in zip(result[key], counts)) / sum(counts))


def perplexity_tables(runs: list[RunResults], offsets=TABLE_OFFSETS) -> list[str]:
    """Per dataset: perplexity of the k-th token after the latents, plain base first, change in parentheses."""
    sections = []
    for name in sorted({n for run in runs for n in run.files["perplexity"]}):
        having = [(run, run.files["perplexity"][name]) for run in runs if name in run.files["perplexity"]]
        first = having[0][1]["result"]
        shown = [k for k in offsets if k <= len(first["nll_base"])]
        settings = having[0][1].get("settings", {})
        lines = [
            f"### Perplexity by position: {name}",
            "",
            f"Latents after every {first['every']} token(s), sequences of {first['seq_len']} tokens, "
            f"{first['num_points']} points, data `{settings.get('data', '?')}`. Cells: perplexity of the k-th "
            "token after the latents (change vs the plain base).",
            "",
            "| run | what | " + " | ".join(f"k={k}" for k in shown) + f" | k=1..{len(first['nll_base'])} |",
            "|---|---|" + "---:|" * (len(shown) + 1),
            "| plain base | no latents | " + " | ".join(f"{first['perplexity_base'][k - 1]:.3f}" for k in shown)
            + f" | {_overall_perplexity(first, 'nll_base'):.3f} |",
        ]
        for run, data in having:
            result = data["result"]
            if result["nll_base"] != first["nll_base"]:
                lines.append(f"| {run.label} (base) | scored other tokens | "
                             + " | ".join(f"{result['perplexity_base'][k - 1]:.3f}" for k in shown) + " |")
            cells = [f"{result['perplexity_augmented'][k - 1]:.3f} ({result['relative_change_percent'][k - 1]:+.2f}%)"
                     for k in shown]
            overall, overall_base = _overall_perplexity(result, "nll_augmented"), _overall_perplexity(result, "nll_base")
            cells.append(f"{overall:.3f} ({100 * (overall / overall_base - 1):+.2f}%)")
            lines.append(f"| {run.label} | {_describe(run)} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return sections


def gsm8k_table(runs: list[RunResults]) -> str | None:
    rows = [(run, name, data["result"]) for run in runs for name, data in sorted(run.files["gsm8k"].items())]
    if not rows:
        return None
    lines = [
        "### GSM8K (greedy, exact match of the final number)",
        "",
        "| run | what | setting | items | acc augmented | acc base | change (points) | strict aug | strict base |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    # Runs evaluated with augmentation only are compared with the plain base measured in another folder.
    reference = {}
    for run, name, result in rows:
        if result["accuracy_base"] is not None:
            reference.setdefault(name, (run.label, result["num_items"], result["accuracy_base"]))
    borrowed = set()
    for run, name, result in rows:
        aug, base, mark = result["accuracy_augmented"], result["accuracy_base"], ""
        if base is None and name in reference and reference[name][1] == result["num_items"]:
            base, mark = reference[name][2], "*"
            borrowed.add(reference[name][0])
        change = "-" if aug is None or base is None else f"{100 * (aug - base):+.2f}"
        setting = f"{result['shots']}-shot" + (" CoT" if result["cot"] else "")
        lines.append(
            f"| {run.label} | {_describe(run)} | {setting} | {result['num_items']} | {_pct(aug)} "
            f"| {_pct(base)}{mark} | "
            f"{change} | {_pct(result['strict_accuracy_augmented'])} | {_pct(result['strict_accuracy_base'])} |"
        )
    if borrowed:
        lines += ["", f"\\* plain base measured in {', '.join(sorted(borrowed))} (same items, no latents)."]
    return "\n".join(lines)


def mc_table(runs: list[RunResults]) -> str | None:
    rows = [(run, name, data["result"]) for run in runs for name, data in sorted(run.files["mc"].items())]
    if not rows:
        return None
    lines = [
        "### Multiple choice (log-likelihood)",
        "",
        "| run | data | items | acc aug | acc base | acc_norm aug | acc_norm base |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run, name, r in rows:
        lines.append(f"| {run.label} | {name} | {r['num_items']} | {_pct(r['acc_augmented'])} | {_pct(r['acc_base'])} "
                     f"| {_pct(r['acc_norm_augmented'])} | {_pct(r['acc_norm_base'])} |")
    return "\n".join(lines)


def harness_table(runs: list[RunResults]) -> str | None:
    rows = []
    for run in runs:
        for data in run.files["harness"].values():
            conditions = data["result"]
            tasks = sorted({task for results in conditions.values() for task in results})
            for task in tasks:
                metrics = sorted({m for results in conditions.values() for m, v in results.get(task, {}).items()
                                  if isinstance(v, (int, float)) and "stderr" not in m and m != "sample_len"})
                for metric in metrics:
                    aug = conditions.get("augmented", {}).get(task, {}).get(metric)
                    base = conditions.get("base", {}).get(task, {}).get(metric)
                    rows.append(f"| {run.label} | {task} | {metric} | {_num(aug)} | {_num(base)} |")
    if not rows:
        return None
    return "\n".join(["### lm-evaluation-harness", "", "| run | task | metric | augmented | base |",
                      "|---|---|---|---:|---:|", *rows])


def _num(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4f}"


# ---------------------------------------------------------------------------- plots
def _pyplot():
    require_extra("matplotlib", "plots", "plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(axis, ticks) -> None:
    """A log-2 x axis labelled with plain integers at ``ticks``."""
    axis.set_xscale("log", base=2)
    ticks = sorted(set(ticks))
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.minorticks_off()


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss and validation ahead-token loss (augmented vs base) against steps."""
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if r.get("split") == "validation"]
    figure, axis = plt.subplots(figsize=(7, 4))
    # "nll" apart from "loss" when a KL to the base is trained as well: the axis is the NLL either way
    axis.plot([r["step"] for r in train_records], [r.get("nll", r["loss"]) for r in train_records],
              label="train (augmented)", alpha=0.6)
    if val_records:
        steps = [r["step"] for r in val_records]
        axis.plot(steps, [r["loss_augmented"] for r in val_records], "o-", label="validation, augmented")
        axis.plot(steps, [r["loss_base"] for r in val_records], "s--", label="validation, base (no latents)")
    axis.set_xlabel("step")
    axis.set_ylabel("ahead-token NLL (nats)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


def plot_position_eval(result: dict, png_path, title: str = "") -> None:
    """One evaluation: perplexity by offset with and without latents, and the relative change."""
    plt = _pyplot()
    offsets = list(range(1, len(result["nll_base"]) + 1))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(offsets, result["perplexity_base"], "s--", label="base (no latents)")
    left.plot(offsets, result["perplexity_augmented"], "o-", label="augmented")
    left.set_ylabel("perplexity of the k-th token")
    right.axhline(0, color="grey", lw=0.8)
    right.plot(offsets, result["relative_change_percent"], "o-")
    right.set_ylabel("change vs base (%)")
    for axis in (left, right):
        _log2_axis(axis, [k for k in TABLE_OFFSETS if k <= len(offsets)])
        axis.set_xlabel("k: tokens after the latents")
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


def plot_perplexity_comparison(runs: list[RunResults], name: str, png_path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.axhline(0, color="grey", lw=0.8, label="plain base")
    longest = 1
    for run in runs:
        if name in run.files["perplexity"]:
            change = run.files["perplexity"][name]["result"]["relative_change_percent"]
            axis.plot(range(1, len(change) + 1), change, "o-", ms=3, label=f"{run.label} ({_describe(run)})")
            longest = max(longest, len(change))
    _log2_axis(axis, [k for k in TABLE_OFFSETS if k <= longest])
    axis.set_xlabel("k: tokens after the latents")
    axis.set_ylabel("perplexity change vs base (%)")
    axis.set_title(f"Perplexity by position: {name}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


def plot_gsm8k(runs: list[RunResults], png_path) -> bool:
    rows = [(f"{run.label}\n{name}", data["result"])
            for run in runs for name, data in sorted(run.files["gsm8k"].items())]
    if not rows:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 4))
    positions = range(len(rows))
    def percent(value):  # a condition that was not run draws no bar
        return float("nan") if value is None else 100 * value

    aug = [percent(r["accuracy_augmented"]) for _, r in rows]
    base = [percent(r["accuracy_base"]) for _, r in rows]
    axis.bar([p - 0.2 for p in positions], base, 0.4, label="base (no latents)")
    axis.bar([p + 0.2 for p in positions], aug, 0.4, label="augmented")
    axis.set_xticks(list(positions), [label for label, _ in rows], fontsize=7)
    axis.set_ylabel("GSM8K accuracy (%)")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return True


def plot_scaling(runs: list[RunResults], png_path, offset: int = 1) -> bool:
    """Against N_L: perplexity change at ``offset`` per dataset, and GSM8K accuracy; pause runs as crosses."""
    with_latents = [run for run in runs if run.num_latents]
    if not with_latents:
        return False
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = sorted({n for run in with_latents for n in run.files["perplexity"]})
    for name in names:
        for method, marker in (("coprocessor", "o-"), ("pause", "x")):
            points = sorted(
                (run.num_latents, run.files["perplexity"][name]["result"]["relative_change_percent"][offset - 1])
                for run in with_latents if run.method == method and name in run.files["perplexity"]
            )
            if points:
                left.plot(*zip(*points), marker, label=f"{name} ({method})")
    left.axhline(0, color="grey", lw=0.8)
    left.set_ylabel(f"perplexity change at k={offset} (%)")
    settings = sorted({n for run in with_latents for n in run.files["gsm8k"]})
    for name in settings:
        for method, marker in (("coprocessor", "o-"), ("pause", "x")):
            points = sorted((run.num_latents, 100 * run.files["gsm8k"][name]["result"]["accuracy_augmented"])
                            for run in with_latents if run.method == method and name in run.files["gsm8k"]
                            and run.files["gsm8k"][name]["result"]["accuracy_augmented"] is not None)
            if points:
                right.plot(*zip(*points), marker, label=f"{name} ({method})")
        bases = [run.files["gsm8k"][name]["result"]["accuracy_base"] for run in runs if name in run.files["gsm8k"]]
        bases = [b for b in bases if b is not None]
        if bases:
            right.axhline(100 * bases[0], ls="--", color="grey", label=f"{name} plain base")
    right.set_ylabel("GSM8K accuracy (%)")
    for axis in (left, right):
        _log2_axis(axis, [run.num_latents for run in with_latents])
        axis.set_xlabel("N_L (latents)")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------- the report
def write_report(run_dirs: list, out) -> Path:
    """Write ``report.md`` and its PNGs into ``out``; returns the Markdown file's path."""
    runs = [load_run(directory) for directory in run_dirs]
    if not any(any(run.files[kind] for kind in KINDS) for run in runs):
        folders = ", ".join(str(d) for d in run_dirs)
        raise FileNotFoundError(f"no evaluation JSON in {folders}; run `cacheaug eval ...` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# cacheaug report", "", "Runs: " + ", ".join(f"`{Path(d)}`" for d in run_dirs), ""]
    for section in perplexity_tables(runs):
        sections += [section, ""]
    for name in sorted({n for run in runs for n in run.files["perplexity"]}):
        png = f"perplexity-{_safe(name)}.png"
        plot_perplexity_comparison(runs, name, out / png)
        sections += [f"![perplexity change by position, {name}]({png})", ""]
    for table in (gsm8k_table(runs), mc_table(runs), harness_table(runs)):
        if table:
            sections += [table, ""]
    if plot_gsm8k(runs, out / "gsm8k.png"):
        sections += ["![GSM8K accuracy](gsm8k.png)", ""]
    if len({run.num_latents for run in runs if run.num_latents}) > 1 and plot_scaling(runs, out / "scaling.png"):
        sections += ["![scaling with the number of latents](scaling.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(sections).rstrip() + "\n")
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
