"""Tables and plots of results/recipe-smollm2/: perplexity change by offset with 95% intervals, training curves.

    python experiments/recipe_report.py results/recipe-smollm2 [--paper250 results/prose-smollm2/nl16]

Reads every RUN/perplexity-*.json (written by `cacheaug eval perplexity`) and RUN/metrics.jsonl (written by
`cacheaug train`) under the results folder; writes report.md, change-<data>.png and curves.png there (every run),
and change-<data>-<group>.png and curves-<group>.png for each group of GROUPS (a few runs each, readable).
RUN/context-swap-*.json (experiments/context_swap.py) go into one table at the end of report.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from cacheaug.errors import InputError
from cacheaug.eval.metrics import PositionEval

OFFSETS = (1, 2, 4, 8, 16, 32)
DATASETS = ("prose-test", "wikitext2-test")


# one change apart, at the same budget: (run, the run it changes)
PAIRS = (
    ("recipe16-kl", "recipe4-kl"), ("res16-mat", "res16"), ("res16-mat-slow", "res16"),
    ("res16-mat-lr3e-5", "res16-mat-slow"), ("res16-mat-slow-kl", "res16-mat-slow"), ("res16-mat-slow-kl", "recipe16-kl"),
    ("pause16-seed1", "pause16"), ("res16-mat-slow", "pause16-seed1"),
    # the KL runs against the pause baseline trained with the same KL
    ("pause16-kl", "pause16"), ("recipe16-kl", "pause16-kl"), ("res16-kl", "pause16-kl"), ("res16-mat-slow-kl", "pause16-kl"),
    ("res16-mat-slow-klc", "pause16-kl"), ("res16-mat-slow-klc", "res16-mat-slow-kl"), ("res16-mat-slow-klc", "recipe16-kl"),
    ("recipe16-kl-slow", "recipe16-kl"), ("recipe16-kl-slow", "pause16-kl"),
    ("recipe16-kl-fast", "recipe16-kl"), ("recipe16-kl-fast", "pause16-kl"),
    # twice the training: what the second 500 steps add to each (recipe16-kl-1k vs pause16-kl-1k comes with every
    # coprocessor run against the pause run of its step count)
    ("recipe16-kl-1k", "recipe16-kl"), ("pause16-kl-1k", "pause16-kl"),
    # twice the augmentation points per sequence (16, the paper's density): what they add to each, and the two
    # against each other
    ("recipe16-kl-p16", "recipe16-kl"), ("pause16-kl-p16", "pause16-kl"), ("recipe16-kl-p16", "pause16-kl-p16"),
    # a weaker KL on the matrix residual: against itself with no KL and with the full KL, and against pause16-kl
    ("res16-mat-slow-kl03", "res16-mat-slow"), ("res16-mat-slow-kl03", "res16-mat-slow-kl"),
    ("res16-mat-slow-kl03", "pause16-kl"), ("res16-mat-slow-kl03", "pause16-kl03"), ("pause16-kl03", "pause16"),
)

# trainings of one recipe that differ only in the training seed (soft-token init, augmentation points): recipe -> runs
SEEDS = {
    "pause16": ("pause16", "pause16-seed1", "pause16-seed2"),
    "res16-mat-slow": ("res16-mat-slow", "res16-mat-slow-seed1"),
    "recipe16-kl": ("recipe16-kl", "recipe16-kl-seed1", "recipe16-kl-seed2", "recipe16-kl-seed3"),
    "pause16-kl": ("pause16-kl", "pause16-kl-seed1", "pause16-kl-seed2"),
    "recipe16-kl-slow": ("recipe16-kl-slow", "recipe16-kl-slow-seed1"),
}
# runs plotted together (change-<data>-<group>.png, curves-<group>.png); the all-run plots overlay 30 lines
GROUPS = {
    # the paper's layout, one change at a time to the recipe, N_L, and the pause baseline (250-500 steps, no KL)
    "recipe": ("paper16-250 (prose-smollm2)", "paper4-250 (prose-smollm2)", "token16", "gate16", "recipe16-step250",
               "recipe16", "recipe4", "recipe64", "pause16"),
    # the default (recipe16-kl) and pause16-kl over their seeds, and recipe4-kl for the N_L target
    "default": ("recipe16-kl", "recipe16-kl-seed1", "recipe16-kl-seed2", "recipe16-kl-seed3", "pause16-kl",
                "pause16-kl-seed1", "pause16-kl-seed2", "recipe4-kl"),
    # the default and pause16-kl changed one way each: body lr, twice the steps, twice the points
    "default-variants": ("recipe16-kl", "pause16-kl", "recipe16-kl-slow", "recipe16-kl-slow-seed1", "recipe16-kl-fast",
                         "recipe16-kl-1k", "pause16-kl-1k", "recipe16-kl-p16", "pause16-kl-p16"),
    # latents = soft tokens + r x coprocessor, against pause16
    "residual": ("pause16", "pause16-seed1", "pause16-seed2", "res16", "res16-kl", "res16-r1", "res16-r1-lora",
                 "res16-r1-slow", "res16-mat", "res16-mat-slow", "res16-mat-slow-seed1", "res16-mat-lr3e-5",
                 "res16-mat-slow-kl", "res16-mat-slow-klc", "res16-mat-slow-kl03", "pause16-kl03"),
}

# (recipe, the recipe it is compared with), across their seeds
SEED_PAIRS = (("res16-mat-slow", "pause16"), ("recipe16-kl", "pause16-kl"), ("recipe16-kl-slow", "pause16-kl"),
              ("recipe16-kl-slow", "recipe16-kl"))


def _coprocessor(run: dict) -> dict:
    return run.get("config", {}).get("coprocessor", {})


def load_run(folder: Path) -> dict:
    run = {"name": folder.name, "folder": folder, "evals": {}, "metrics": []}
    for dataset in DATASETS:
        path = folder / f"perplexity-{dataset}.json"
        if path.exists():
            run["evals"][dataset] = json.loads(path.read_text())["result"]
    if (folder / "metrics.jsonl").exists():
        run["metrics"] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    if (folder / "run_config.json").exists():
        run["config"] = json.loads((folder / "run_config.json").read_text())
    return run


def describe(run: dict) -> str:
    config = run.get("config", {})
    coprocessor, train = config.get("coprocessor", {}), config.get("train", {})
    if not coprocessor:
        return ""
    parts = [
        coprocessor.get("method", "coprocessor"),
        f"N_L {coprocessor.get('num_latents')}",
        f"readout {coprocessor.get('readout', 'latent')}",
        "gate" if coprocessor.get("latent_gate") else "no gate",
        f"{coprocessor.get('soft_token_init', 'random')} init",
        *([(f"latents = soft tokens + r x coprocessor ({'an H x H matrix, ' if coprocessor.get('latent_residual_matrix') else ''}"
            f"r = {coprocessor.get('latent_residual_init', 0):g} at start)")]
          if coprocessor.get("latent_residual") else []),
        f"lr {train.get('lr')}" + (f", interface {train['interface_lr']}" if train.get("interface_lr") else ""),
        # every run has 8 points per sequence unless its row says otherwise
        *([f"{coprocessor['num_points']} points per sequence"] if coprocessor.get("num_points", 8) != 8 else []),
    ]
    if train.get("kl_to_base"):
        parts.append(f"KL to the base {train['kl_to_base']}" + (
            f" annealed to 0 over {train['kl_anneal_steps']} steps" if train.get("kl_anneal_steps") else " (constant)"))
    return ", ".join(parts)


def train_steps_and_seconds(run: dict) -> tuple[int | None, float | None, float | None]:
    """(steps, summed step time, median step time) from metrics.jsonl."""
    steps = [r for r in run["metrics"] if r.get("split") != "validation" and "seconds_per_step" in r]
    if not steps:
        return None, None, None
    seconds = sorted(r["seconds_per_step"] for r in steps)
    return max(r["step"] for r in steps), sum(seconds), seconds[len(seconds) // 2]


def overall_change(result: dict) -> float:
    counts = result["tokens_by_offset"]
    total = sum(counts)
    aug = sum(n * c for n, c in zip(result["nll_augmented"], counts)) / total
    base = sum(n * c for n, c in zip(result["nll_base"], counts)) / total
    return 100 * (math.exp(aug - base) - 1)


def cell(result: dict, index: int) -> str:
    value = result["relative_change_percent"][index]
    interval = result.get("relative_change_ci95") or {}
    if not interval:
        return f"{value:+.1f}%"
    low, high = interval["by_offset"][index]
    return f"{value:+.1f}% [{low:+.1f}, {high:+.1f}]"


def overall_cell(result: dict) -> str:
    interval = result.get("relative_change_ci95") or {}
    if not interval:
        return f"{overall_change(result):+.1f}%"
    low, high = interval["overall"]
    return f"{interval['overall_change']:+.1f}% [{low:+.1f}, {high:+.1f}]"


def table(runs: list[dict], dataset: str) -> str:
    rows = [r for r in runs if dataset in r["evals"]]
    offsets = " | ".join(f"k={k}" for k in OFFSETS)
    lines = [
        (f"| run | steps | train s (median s/step) | points/offset | {offsets} | k=1..32 | worst k (upper 95%) "
         "| worst k (point) | offsets below the base |"),
        "|---|---:|---:|---:|" + "---:|" * len(OFFSETS) + "---:|---:|---:|---:|",
    ]
    for run in rows:
        result = run["evals"][dataset]
        steps, seconds, median = train_steps_and_seconds(run)
        cells = " | ".join(cell(result, k - 1) for k in OFFSETS if k <= len(result["nll_augmented"]))
        interval = result.get("relative_change_ci95") or {}
        changes = result["relative_change_percent"]
        worst_point = max(range(len(changes)), key=changes.__getitem__)
        point_cell = f"k={worst_point + 1}: {changes[worst_point]:+.1f}%"
        if interval:
            uppers = [high for _, high in interval["by_offset"]]
            worst = max(range(len(uppers)), key=uppers.__getitem__)
            worst_cell = f"k={worst + 1}: {uppers[worst]:+.1f}%"
        else:
            worst_cell = f"{point_cell} (no interval)"
        points = result["tokens_by_offset"][0]
        lines.append(
            f"| {run['label']} | {steps or '-'} | {f'{seconds:.0f} ({median:.2f})' if seconds else '-'} | {points} | {cells} "
            f"| {overall_cell(result)} | {worst_cell} | {point_cell} | {sum(c < 0 for c in changes)} of {len(changes)} |"
        )
    return "\n".join(lines)


def k1_and_overall(change: dict, digits: int = 1) -> tuple[str, str]:
    """"x% [low, high]" at k=1 and over every offset, from a change with by_offset(_ci) and overall(_ci) (a paired
    change, or context_swap.py's summaries)."""
    def text(value: float, interval: list[float]) -> str:
        return f"{value:+.{digits}f}% [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"
    return text(change["by_offset"][0], change["by_offset_ci"][0]), text(change["overall"], change["overall_ci"])


def head_to_head(runs: list[dict], dataset: str, first: str, second: str) -> str:
    """How many offsets ``first`` changes perplexity less (is better) than ``second``."""
    found = {r["name"]: r["evals"][dataset] for r in runs if dataset in r["evals"]}
    if first not in found or second not in found:
        return ""
    a, b = found[first]["relative_change_percent"], found[second]["relative_change_percent"]
    text = f"{first} is better than {second} at {sum(x < y for x, y in zip(a, b))} of {len(a)} offsets."
    try:
        paired = PositionEval.from_dict(found[first]).paired_change(PositionEval.from_dict(found[second]))
    except InputError:  # not the same targets: no paired interval
        return text
    k1, overall = k1_and_overall(paired)
    better = sum(hi < 0 for _, hi in paired["by_offset_ci"])
    worse = sum(lo > 0 for lo, _ in paired["by_offset_ci"])
    return (f"{text} Paired (the same sequences resampled for both), {first}'s perplexity vs {second}'s: k=1 "
            f"{k1}, k = 1..{len(a)} {overall}; offsets whose 95% interval is below 0: {better}, above 0: {worse}.")


def seed_mean(evals: list[PositionEval]) -> PositionEval:
    """One evaluation whose per-sequence NLL sums are the mean over trainings of a recipe (the same targets): what
    a training of the recipe scores on average, so that paired offsets compare recipes rather than two draws."""
    mean = [[sum(values) / len(values) for values in zip(*rows)] for rows in zip(*(e.sequence_nll_augmented for e in evals))]
    return replace(evals[0], sequence_nll_augmented=mean)


def seed_comparison(runs: list[dict], dataset: str, first: str, second: str) -> tuple[str, dict | None]:
    """Recipe ``first`` vs recipe ``second`` over every seed of each (SEEDS): the seed-mean paired change by offset,
    and the k = 1..K paired change of every cross pair against those within each recipe (the seed spread)."""
    found = {r["name"]: PositionEval.from_dict(r["evals"][dataset]) for r in runs if dataset in r["evals"]}
    groups = {name: [run for run in SEEDS[name] if run in found] for name in (first, second)}
    if min(len(members) for members in groups.values()) < 2:
        return "", None

    def overall(a: str, b: str) -> float:
        return found[a].paired_change(found[b], samples=1)["overall"]

    paired = seed_mean([found[r] for r in groups[first]]).paired_change(seed_mean([found[r] for r in groups[second]]))
    cross = [overall(a, b) for a in groups[first] for b in groups[second]]
    within = {name: [overall(a, b) for i, a in enumerate(members) for b in members[i + 1:]] for name, members in groups.items()}
    (k1, k_all), offsets = k1_and_overall(paired), len(paired["by_offset"])
    spread = "; ".join(f"{name}: {', '.join(f'{v:+.1f}%' for v in values)}" for name, values in within.items())
    text = (f"**{first} ({len(groups[first])} seeds) vs {second} ({len(groups[second])} seeds)**, seed-mean NLL, paired: "
            f"better at {sum(v < 0 for v in paired['by_offset'])} of {offsets} offsets; k=1 {k1}, k = 1..{offsets} "
            f"{k_all} (intervals over test sequences); offsets whose interval "
            f"is below 0: {sum(hi < 0 for _, hi in paired['by_offset_ci'])}, above 0: "
            f"{sum(lo > 0 for lo, _ in paired['by_offset_ci'])}. k = 1..{offsets}, every cross pair ({first} seed vs "
            f"{second} seed): {', '.join(f'{v:+.1f}%' for v in cross)}; between seeds of one recipe: {spread}.")
    return text, paired


def swap_table(results: Path) -> list[str]:
    """report.md's lines for every RUN/context-swap-<data>.json: own and swapped latents vs the base, swapped vs own."""
    rows = []
    for path in sorted(results.glob("*/context-swap-*.json")):
        record = json.loads(path.read_text())
        data = path.stem.removeprefix("context-swap-")
        cells = [text for key in ("own_vs_base", "swapped_vs_base", "swapped_vs_own")
                 for text in k1_and_overall(record[key], digits=2)]
        committed = record.get("own_recomputes", {}).get("overall_change")
        cells.append("" if committed is None else f"{committed:+.2f}%")
        rows.append(f"| {path.parent.name} | {data} | {record['settings']['pairs']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "## Do the latents carry their context? (experiments/context_swap.py)", "",
            ("Each test sequence's own latents vs the latents computed at the same points of another test sequence "
             "(sequence i with i + S/2), on the same targets; 95% bootstrap intervals over pairs. The last column is "
             "the run's committed `eval perplexity` result over k = 1..32, which \"own\" recomputes when the "
             "checkpoint is the one evaluated."), "",
            ("| run | data | pairs | own k=1 | own k = 1..32 | swapped k=1 | swapped k = 1..32 | swapped vs own k=1 "
             "| swapped vs own k = 1..32 | committed eval, k = 1..32 |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def plot_seeds(comparisons: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, paired in comparisons.items():
        offsets = list(range(1, len(paired["by_offset"]) + 1))
        line = axis.plot(offsets, paired["by_offset"], "o-", markersize=3, label=label)[0]
        axis.fill_between(offsets, [lo for lo, _ in paired["by_offset_ci"]], [hi for _, hi in paired["by_offset_ci"]],
                          color=line.get_color(), alpha=0.15)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("k (token after the latents)")
    axis.set_ylabel("seed-mean perplexity, first vs second (%)")
    axis.set_title("recipe vs recipe over their seeds, paired, 95% intervals over test sequences")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_change(runs: list[dict], dataset: str, path: Path, group: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        if dataset not in run["evals"]:
            continue
        result = run["evals"][dataset]
        offsets = list(range(1, len(result["relative_change_percent"]) + 1))
        line = axis.plot(offsets, result["relative_change_percent"], "o-", markersize=3, label=run["label"])[0]
        interval = result.get("relative_change_ci95") or {}
        if interval:
            low = [lo for lo, _ in interval["by_offset"]]
            high = [hi for _, hi in interval["by_offset"]]
            axis.fill_between(offsets, low, high, color=line.get_color(), alpha=0.15)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("k (token after the latents)")
    axis.set_ylabel("perplexity change vs base (%)")
    axis.set_ylim(-15, 15)
    axis.set_title(f"{dataset}{' (' + group + ')' if group else ''}: change by offset, 95% bootstrap intervals "
                   "(clipped at +/-15%)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_curves(runs: list[dict], path: Path, group: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (first, overall) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        records = [r for r in run["metrics"] if r.get("split") == "validation"]
        if not records:
            continue
        steps = [r["step"] for r in records]
        k1 = [100 * (math.exp(r["nll_by_offset_augmented"][0] - r["nll_by_offset_base"][0]) - 1) for r in records]
        every = [100 * (math.exp(r["loss_augmented"] - r["loss_base"]) - 1) for r in records]
        first.plot(steps, k1, "o-", markersize=3, label=run["label"])
        overall.plot(steps, every, "o-", markersize=3, label=run["label"])
    for axis, title in ((first, "k=1"), (overall, "k=1..16")):
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xlabel("step")
        axis.set_ylabel("validation perplexity change vs base (%)")
        axis.set_title(f"{group + ': ' if group else ''}training curve, {title} (4 validation sequences x 8 points)",
                       fontsize=8)
        values = [y for line in axis.get_lines() for y in line.get_ydata()]
        if values and max(abs(y) for y in values) > 20:  # the paper-layout runs reach +1000%: log beyond +/-10%
            axis.set_yscale("symlog", linthresh=10)
    overall.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--paper250", type=Path, help="results/prose-smollm2/nl16: the paper recipe, 250 steps")
    parser.add_argument("--paper250-nl4", type=Path, help="results/prose-smollm2/nl4")
    args = parser.parse_args()
    runs = [load_run(folder) for folder in sorted(args.results.iterdir()) if folder.is_dir() and folder.name != "logs"]
    for extra, label in ((args.paper250, "paper16-250 (prose-smollm2)"), (args.paper250_nl4, "paper4-250 (prose-smollm2)")):
        if extra is not None and extra.exists():
            run = load_run(extra)
            run["name"] = label
            runs.append(run)
    runs = [r for r in runs if r["evals"]]
    for run in runs:
        run["label"] = run["name"]
    lines = ["# Recipe comparison on SmolLM2-135M (generated by experiments/recipe_report.py)", ""]
    for run in runs:
        lines.append(f"- **{run['label']}**: {describe(run)}")
    for dataset in DATASETS:
        lines += ["", f"## {dataset}: perplexity change vs the plain base, [95% bootstrap interval]", "", table(runs, dataset)]
        # every N_L 16 coprocessor run against the N_L 16 pause run that trained as many steps; then single changes
        pause_by_steps = {}  # steps -> the first such run by name (pause16, not its seed repeat)
        for r in runs:
            if _coprocessor(r).get("method") == "pause" and _coprocessor(r).get("num_latents") == 16:
                pause_by_steps.setdefault(train_steps_and_seconds(r)[0], r["name"])
        for run in runs:
            steps = train_steps_and_seconds(run)[0]
            if _coprocessor(run).get("method") == "coprocessor" and _coprocessor(run).get("num_latents") == 16 \
                    and steps in pause_by_steps:
                lines += ["", head_to_head(runs, dataset, run["name"], pause_by_steps[steps])]
        lines += [line for first, second in PAIRS if (text := head_to_head(runs, dataset, first, second))
                  for line in ("", text)]
        seeds = {}
        for first, second in SEED_PAIRS:
            text, paired = seed_comparison(runs, dataset, first, second)
            if paired is not None:
                lines += ["", text]
                seeds[f"{dataset}: {first} vs {second}"] = paired
        if seeds:
            plot_seeds(seeds, args.results / f"seeds-{dataset}.png")
        plot_change(runs, dataset, args.results / f"change-{dataset}.png")
    plot_curves(runs, args.results / "curves.png")
    for group, names in GROUPS.items():
        members = [run for name in names for run in runs if run["name"] == name]  # in the group's order
        for dataset in DATASETS:
            if any(dataset in run["evals"] for run in members):
                plot_change(members, dataset, args.results / f"change-{dataset}-{group}.png", group)
        plot_curves(members, args.results / f"curves-{group}.png", group)
    lines += swap_table(args.results)
    (args.results / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
