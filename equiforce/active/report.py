"""The run's report, rebuilt from the journal alone: per-round table, PNG plots, summary.md/json.

Because it reads only the journal, the report of a killed run is as good as that of a finished one, and
it can be regenerated at any time (``equiforce learn --report DIR``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.utils.atomic_io import atomic_write_json, atomic_write_text


def _by_round(records: list[dict[str, Any]], kind: str) -> dict[int, dict[str, Any]]:
    return {int(r["round"]): r for r in records if r["type"] == kind and "round" in r}


def round_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained round: data, errors, σ, exploration and selection."""
    evaluated, explored = _by_round(records, "evaluated"), _by_round(records, "explored")
    selected, stability = _by_round(records, "selected"), _by_round(records, "stability")
    outcomes = {r["id"]: r for r in records if r["type"] in ("label", "failure")}
    rows = []
    for round_, ev in sorted(evaluated.items()):
        valid, test = ev.get("valid") or {}, ev.get("test") or {}
        row: dict[str, Any] = {"round": round_, "calls": ev.get("calls"), "n_train": ev.get("n_train"),
                               "n_valid": valid.get("n"), "valid_f_mae": valid.get("forces_mae"),
                               "valid_e_mae": valid.get("energy_per_atom_mae"), "test_f_mae": test.get("forces_mae"),
                               "test_e_mae": test.get("energy_per_atom_mae"),
                               "mean_sigma": valid.get("mean_force_sigma"),
                               "spearman": valid.get("spearman"), "elapsed_s": ev.get("elapsed")}
        if round_ in explored:
            ex = explored[round_]
            temps = ex.get("per_temperature", {})
            row["md_sigma_stopped"] = f"{ex.get('sigma_stopped', 0)}/{sum(t['replicas'] for t in temps.values())}"
            row["md_mean_time_ps"] = {k: t["mean_time_ps"] for k, t in temps.items()}
            row["candidates"] = ex.get("candidates")
            row["sigma_stop"] = ex.get("threshold_ev_a")
        if round_ in selected:
            ids = [item["id"] for item in selected[round_]["items"]]
            row["selected"] = len(ids)
            row["failures"] = sum(1 for i in ids if outcomes.get(i, {}).get("type") == "failure")
        if round_ in stability:
            row["stable_md"] = f"{stability[round_]['stable']}/{stability[round_]['replicas']}"
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| round | oracle calls | train | valid | valid F MAE (meV/Å) | test F MAE (meV/Å) | mean σ_F (meV/Å) "
             "| Spearman | MD σ-stopped | selected | failures |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sigma = r["mean_sigma"] * 1000 if r.get("mean_sigma") is not None else None
        lines.append(f"| {r['round']} | {_fmt(r['calls'])} | {_fmt(r['n_train'])} | {_fmt(r.get('n_valid'))} | "
                     f"{_fmt(r['valid_f_mae'])} | {_fmt(r['test_f_mae'])} | {_fmt(sigma)} | "
                     f"{_fmt(r.get('spearman'), 2)} | {r.get('md_sigma_stopped', '–')} | {_fmt(r.get('selected'))} | "
                     f"{_fmt(r.get('failures'))} |")
    return lines


def plot_learning_curve(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("valid_f_mae", "validation (oracle-labelled, selected)"), ("test_f_mae", "test set")):
        points = [(r["calls"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, "o-", label=label)
    ax.set_xlabel("oracle calls")
    ax.set_ylabel("force MAE (meV/Å)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("error vs oracle calls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sigma_vs_error(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = _by_round(records, "evaluated")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if evaluated:
        last = evaluated[max(evaluated)]
        valid = last.get("valid") or {}
        s, e = np.asarray(valid.get("struct_sigma", [])), np.asarray(valid.get("struct_error", []))
        if s.size:
            axes[0].loglog(s, e, "o", alpha=0.6, ms=4)
        axes[0].set_title(f"validation, round {max(evaluated)} model (per structure RMS)")
    cmap = plt.get_cmap("viridis")
    rounds = sorted(r for r, ev in evaluated.items() if ev.get("selected_sigma_vs_error"))
    for k, round_ in enumerate(rounds):
        pairs = np.asarray(evaluated[round_]["selected_sigma_vs_error"])
        axes[1].loglog(pairs[:, 0], pairs[:, 1], "o", ms=4, alpha=0.7, color=cmap(k / max(1, len(rounds) - 1)),
                       label=f"picked in round {round_ - 1}")
    axes[1].set_title("selected candidates (max atomic σ vs max |ΔF|)")
    if rounds:
        axes[1].legend(fontsize=7)
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a log axis
        ax.yaxis.set_minor_formatter(NullFormatter())
        lo, hi = ax.get_xlim() if ax.has_data() else (1e-3, 1.0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("predicted σ (eV/Å)")
        ax.set_ylabel("actual error (eV/Å)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_md_stability(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    temps = sorted({t for r in rows for t in r.get("md_mean_time_ps", {})}, key=float)
    for t in temps:
        points = [(r["round"], r["md_mean_time_ps"][t]) for r in rows if t in r.get("md_mean_time_ps", {})]
        x, y = zip(*points)
        ax.plot(x, y, "o-", label=f"{t} K")
    ax.set_xlabel("round")
    ax.set_ylabel("mean MD time before σ stop (ps)")
    ax.set_title("exploration MD stability")
    ax.grid(alpha=0.3)
    if temps:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(directory: Path, records: list[dict[str, Any]], cfg: Any = None,
                 extra_lines: list[str] | None = None, plots: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``summary.json`` and (with ``plots``) the PNGs into ``directory``; return the summary.

    The loop writes the text after every round and the plots (seconds of matplotlib) at the end.
    """
    directory = Path(directory)
    rows = round_rows(records)
    outcomes = [r for r in records if r["type"] in ("label", "failure")]
    failures = Counter(r["kind"] for r in outcomes if r["type"] == "failure")
    stopped = final = None
    for record in records:  # a stopped run continued with new stop settings is running again
        if record["type"] == "stopped":
            stopped = record
        elif record["type"] == "final":
            final = record
        elif record["type"] == "continued":
            stopped = final = None
    oracle_seconds = sum(float(r.get("seconds") or 0.0) for r in outcomes)
    summary: dict[str, Any] = {
        "oracle_calls": len(outcomes), "labels": len(outcomes) - sum(failures.values()),
        "failures": dict(failures), "oracle_seconds": oracle_seconds, "rounds": rows,
        "stopped": stopped["reason"] if stopped else None, "finished": stopped is not None,
        "elapsed_s": max((float(r.get("elapsed", 0.0)) for r in records), default=0.0),
        "stability": [r for r in records if r["type"] == "stability"]}
    pngs = {"learning_curve": "learning_curve.png", "sigma_vs_error": "sigma_vs_error.png",
            "md_stability": "md_stability.png"}
    if rows and plots:
        plot_learning_curve(rows, directory / pngs["learning_curve"])
        plot_sigma_vs_error(records, directory / pngs["sigma_vs_error"])
        plot_md_stability(rows, directory / pngs["md_stability"])
    summary["plots"] = pngs if rows and (directory / pngs["learning_curve"]).exists() else {}
    oracle = cfg.oracle.name if cfg is not None else "unknown (no config kept in the run directory)"
    kinds = (": " + ", ".join(f"{k} {v}" for k, v in failures.items())) if failures else ""
    status = f"stopped: {stopped['reason']}" if stopped else "running (or interrupted; resume with --resume)"
    lines = ["# equiforce learn: active-learning run", "",
             f"- oracle: {oracle}; {summary['oracle_calls']} calls ({summary['labels']} labels, "
             f"{sum(failures.values())} failures{kinds}), {oracle_seconds:.0f} s of oracle time",
             f"- status: {status}",
             f"- wall time (active, over all sessions): {summary['elapsed_s'] / 60:.1f} min", ""]
    summary["final_round"] = int(final["round"]) if final else None
    if rows:
        chosen = next((row for row in rows if final and row["round"] == final["round"]), rows[-1])
        why = ""
        if final and final.get("valid_scores"):
            why = (f" — chosen as the lowest force MAE on the final {final['n_valid']} validation structures: "
                   f"{_fmt(final['valid_scores'][str(final['round'])])} meV/Å")
        lines.append(f"Final model (round {chosen['round']}, `model.eqf`){why}; in its round: validation force MAE "
                     f"{_fmt(chosen['valid_f_mae'])} meV/Å" + (f", test force MAE {_fmt(chosen['test_f_mae'])} meV/Å"
                                                               if chosen.get("test_f_mae") is not None else "") + ".")
        lines += ["", *markdown_table(rows), ""]
        lines += ["![error vs oracle calls](learning_curve.png)", "![sigma vs error](sigma_vs_error.png)",
                  "![MD stability](md_stability.png)", ""]
    lines += extra_lines or []
    atomic_write_text(directory / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(directory / "summary.json", summary)
    return summary
