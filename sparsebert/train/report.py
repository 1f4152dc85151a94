"""Each run's report.md with its PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..families import ROLES
from .inputs import on_corpus


def per_layer_table(sparsity: dict) -> str:
    """Markdown: the sparsity of every encoder matrix by layer and role (a sparsity_report)."""
    rows: dict[int, dict[str, float]] = {}
    for m in sparsity.get("matrices", []):
        if m["layer"] is not None:
            rows.setdefault(m["layer"], {})[m["role"]] = m["sparsity"]
    if not rows:
        return "_no encoder layers found_\n"
    lines = ["| layer | " + " | ".join(ROLES) + " | all |", "|---" * (len(ROLES) + 2) + "|"]
    for layer in sorted(rows):
        cells = [f"{rows[layer][c]:.3f}" if c in rows[layer] else "-" for c in ROLES]
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {sparsity['layers'].get(str(layer), 0.0):.3f} |")
    lines.append("| **all** | " + " | ".join([""] * len(ROLES)) + f" | **{sparsity['overall']:.3f}** |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _axes(ax, ylabel: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)


def _write(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def plot_curves(records: list[dict], out_dir: Path, metric: str | None = None, reference: dict | None = None) -> list[str]:
    """One quantity per axis: loss.png (the train loss, and each evaluation loss in its own panel),
    metric.png (the evaluation metric over steps, the dense reference as a line) and sparsity.png
    (the method's events and the sparsity measured at evaluations)."""
    plt = _plt()
    made = []
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_losses = sorted({k for r in evals for k in r if "loss" in k})
    fig, axes = plt.subplots(1 + len(eval_losses), 1, figsize=(6, 2.6 * (1 + len(eval_losses))), squeeze=False)
    if train:
        axes[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (mean since last line)")
    _axes(axes[0][0], "train loss")
    for (ax,), key in zip(axes[1:], eval_losses):
        ax.plot(*zip(*[(r["step"], r[key]) for r in evals if key in r]), marker="o", label=f"{key} (model)")
        if reference and key in reference:
            ax.axhline(reference[key], color="k", lw=1, ls="--", label=f"dense reference {reference[key]:.4g}")
        _axes(ax, key)
    made.append(_write(plt, fig, out_dir / "loss.png"))
    if metric and any(metric in r for r in evals):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*[(r["step"], r[metric]) for r in evals if metric in r]), marker="o", label="model")
        if reference and metric in reference:
            ax.axhline(reference[metric], color="k", lw=1, ls="--", label=f"dense reference {reference[metric]:.4f}")
        _axes(ax, metric)
        made.append(_write(plt, fig, out_dir / "metric.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for r in train for k in r if "sparsity" in k}):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if train and pts[-1][0] < train[-1]["step"]:  # the value holds until the end
            pts.append((train[-1]["step"], pts[-1][1]))
        ax.plot(*zip(*pts), drawstyle="steps-post", label=f"{key} (method)")
    pts = [(r["step"], r["sparsity"]) for r in evals if "sparsity" in r]
    if pts:
        ax.plot(*zip(*pts), marker="o", linestyle="--", label="measured at evaluation")
    ax.set_ylim(-0.02, 1.0)
    _axes(ax, "sparsity of the encoder matrices")
    made.append(_write(plt, fig, out_dir / "sparsity.png"))
    return made


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def result_keys(results: dict) -> list[str]:
    final = results.get("final", {})
    return [k for k in final if "/" in k and isinstance(final[k], float)]


def results_table(rows: list[dict]) -> str:
    """rows: {stage, task, method, results}; one line per model (dense reference, then sparse)."""
    keys: list[str] = []
    for row in rows:
        for k in result_keys(row["results"]):
            if k not in keys:
                keys.append(k)
    lines = ["| stage | task | model | " + " | ".join(keys) + " | sparsity |", "|---" * (len(keys) + 4) + "|"]
    for row in rows:
        res = row["results"]
        ref = res.get("reference") or {}
        if ref:
            lines.append(f"| {row['stage']} | {row['task']} | dense ({ref.get('model', 'reference')}) | "
                         + " | ".join(_fmt(ref.get(k, "")) for k in keys) + f" | {_fmt(ref.get('sparsity', 0.0))} |")
        lines.append(f"| {row['stage']} | {row['task']} | {row['method']} | "
                     + " | ".join(_fmt(res['final'].get(k, "")) for k in keys)
                     + f" | {_fmt(res.get('sparsity', {}).get('overall', 0.0))} |")
    return "\n".join(lines) + "\n"


def write_stage_report(run, cfg: dict, results: dict) -> Path:
    keys = result_keys(results)
    plots = plot_curves(run.metrics(), run.dir, keys[0] if keys else None, results.get("reference"))
    task = f"corpus ({results.get('objective')})" if on_corpus(cfg) else cfg["data"]["task"]
    stopped = results.get("stopped")
    lines = [f"# sparsebert {cfg['stage']}: {cfg['method']['name']} on {task}", "",
             f"- model: `{cfg['model']['name']}`" + (f", teacher: `{cfg['model']['teacher']}`" if cfg['model']['teacher'] else ""),
             f"- objective: {results.get('objective')}, steps: {results.get('steps')}, "
             f"train examples: {results.get('train_size')}, time: {results.get('time_s', 0):.0f} s",
             f"- exported model: `{results.get('model_dir')}`", "",
             *([f"**Training stopped early, at step {results['steps']} of {results['planned_steps']}: {stopped}.** "
                "The results below are those of the shorter run.", ""] if stopped else []),
             "## Results", "", results_table([{"stage": cfg["stage"], "task": task, "method": cfg["method"]["name"],
                                                "results": results}]), "",
             "## Per-layer sparsity (final model)", "", per_layer_table(results.get("sparsity", {})), "",
             *(["## Evaluation over training", "", "![metric](metric.png)", ""] if "metric.png" in plots else []),
             "## Sparsity schedule", "", "![sparsity](sparsity.png)", "",
             "## Loss curves", "", "![loss](loss.png)", "",
             "## Method", "", "```yaml", _yaml(cfg["method"]), "```", "",
             "## Training", "", "```yaml", _yaml(cfg["training"]), "```", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_pipeline_report(run_dir: Path, stages: list[dict]) -> Path:
    """stages: {name, stage, task, method, dir, results}."""
    lines = ["# sparsebert pipeline", "", "## Results (dense vs sparse, per stage)", "",
             results_table(stages), "", "## Stages", ""]
    for s in stages:
        stopped = s["results"].get("stopped")
        lines.append(f"- `{s['name']}`: [{s['name']}/report.md]({s['name']}/report.md), "
                     f"sparsity {s['results'].get('sparsity', {}).get('overall', 0.0):.3f}, "
                     f"{s['results'].get('time_s', 0):.0f} s"
                     + (f", **stopped early at step {s['results']['steps']} of {s['results']['planned_steps']}: "
                        f"{stopped}**" if stopped else ""))
    last = [s for s in stages if s["stage"] == "downstream"]
    if last:
        lines += ["", "## Per-layer sparsity (" + last[0]["name"] + ")", "",
                  per_layer_table(last[0]["results"].get("sparsity", {}))]
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False).rstrip()
