"""Reports: a sweep folder's report.md, best.toml and plots, drawn from the study's storage alone (so they can
be redrawn on any machine), and the summary of a sweep over several base configs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mnistlab.config import Config
from mnistlab.errors import plural
from mnistlab.files import FolderLock, atomic_write_text
from mnistlab.sweep.plan import SWEEP_FILE, Plan
from mnistlab.sweep.space import Param, apply, choice_label, show_value
from mnistlab.sweep.storage import load_sweep, result_of, safe_url, worker_of


def report(folder: str | Path, storage: str | None = None) -> Path:
    """Redraw a sweep folder's report (and best.toml, plots) from its storage; a folder of several studies
    (a preset) gets each study's report and the summary."""
    folder = Path(folder)
    marker = folder / SWEEP_FILE
    if marker.is_file() and "parts" in json.loads(marker.read_text()):
        for part in json.loads(marker.read_text())["parts"]:
            if (folder / part / SWEEP_FILE).is_file():
                report(folder / part, storage)
        return write_summary(folder)
    with FolderLock(folder):
        study, plan = load_sweep(folder, storage)
        return write_report(folder, study, plan)


def state_text(t: optuna.trial.FrozenTrial) -> str:
    """How a trial stands or ended, in words."""
    r = result_of(t)
    if t.state == TrialState.PRUNED:
        why = " (diverged)" if r.get("reason") == "diverged" else ""
        return f"pruned at epoch {r.get('pruned_at', '?')}{why}"
    if t.state == TrialState.FAIL:
        if "error" in r:
            return f"failed: {r['error']}"
        return f"failed ({r.get('reason', 'its worker stopped')})"
    return t.state.name.lower()


def metric_text(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric.endswith("accuracy") else f"{value:.4f}"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial by the study's validation metric (pruned and failed ones never are)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


def best_config(study: optuna.Study, plan: Plan, trial: optuna.trial.FrozenTrial) -> Config:
    values = {key: plan.space[key].value_of(v) for key, v in trial.params.items()}
    config = apply(plan.config, values, name=f"{plan.study}-best")
    config.description = (
        f"Best of sweep {plan.study} (trial {trial.number}, {plan.metric} {metric_text(plan.metric, trial.value)}): "
        + ", ".join(f"{k}={show_value(v)}" for k, v in values.items())
    )
    return config


def _importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}, f"Too few complete trials ({len(complete)}) to estimate parameter importances; 3 at least."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return {}, f"Optuna could not estimate parameter importances from these trials ({' '.join(str(exc).split())})."
    return dict(values), ""


def _sessions(study: optuna.Study) -> list[dict[str, Any]]:
    """Each invocation's record: host, workers, threads, seconds, trials."""
    return [v for k, v in study.user_attrs.items() if k.startswith("session ")]


def write_report(folder: Path, study: optuna.Study, plan: Plan) -> Path:
    """report.md, best.toml, objective.png and params.png in `folder`, from the study's storage alone."""
    folder = Path(folder)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    best = best_trial(study)
    hosts = {s["host"] for s in _sessions(study)}
    lines = [f"# Sweep {plan.study}", ""] + ([plan.description + ".", ""] if plan.description else [])
    lines += _overview(study, plan, trials)
    lines += ["", "## Search space", "", "| key | searched over |", "|---|---|"]
    lines += [f"| `{key}` | {p.spec()} |" for key, p in plan.space.items()]
    lines += ["", "## Best trial", "", *_best(folder, study, plan, best)]
    lines += ["", "## Parameter importances", "", *_importance_lines(study, plan)]
    lines += ["", "## Plots", "", *_plots(folder, plan, trials)]
    lines += ["", "## Trials", "", *_trials_table(trials, plan, best, len(hosts) > 1)]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _overview(study: optuna.Study, plan: Plan, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """What was searched over what, how the trials ended, the time taken and on which machines."""
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    sessions = _sessions(study)
    trial_seconds = sum(result_of(t).get("seconds", 0.0) for t in trials)
    wall = sum(s.get("seconds", 0.0) for s in sessions)
    lines = [
        f"Base config **{plan.config.name}** ({plan.config.description or 'no description'}), "
        f"{plan.config.training.epochs} epochs per trial unless searched. Objective: "
        f"{plan.direction} **{plan.metric}** on the validation split ({plan.config.data.val_size} images held out "
        "of the training set); test accuracy is only reported, it never chooses.",
        "",
        f"Storage `{safe_url(plan.storage)}`, study `{plan.study}`. Trials: "
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running. Time: "
        f"{wall / 60:.1f} min of wall clock over {plural(len(sessions), 'invocation')}, "
        f"{trial_seconds / 60:.1f} min of trial time in total.",
        "",
    ]
    for host, s in {s["host"]: s for s in sessions}.items():
        cpu = study.user_attrs.get(f"cpu {host}", "")
        workers = f"{plural(s['workers'], 'worker')} x {plural(s['threads'], 'thread')}"
        lines.append(f"- `{host}`: {workers}{'; ' + cpu if cpu else ''}")
    return lines


def _best(folder: Path, study: optuna.Study, plan: Plan, best: optuna.trial.FrozenTrial | None) -> list[str]:
    """The best trial's section; its config written to best.toml (removed while there is none)."""
    if best is None:
        (folder / "best.toml").unlink(missing_ok=True)
        return ["No complete trial yet."]
    atomic_write_text(folder / "best.toml", best_config(study, plan, best).to_toml())
    r = result_of(best)
    return [
        f"Trial {best.number}: {plan.metric} **{metric_text(plan.metric, best.value)}**"
        + (f", test accuracy {100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "")
        + f", after {r.get('epochs', '?')} epochs ({r.get('seconds', 0):.0f} s).",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| `{k}` | {show_value(plan.space[k].value_of(v))} |" for k, v in best.params.items()],
        "",
        f"Its config is [best.toml](best.toml): `mnistlab train --config {folder}/best.toml`. Its run directory "
        f"is `{worker_of(best).get('run_dir', '?')}` (on `{worker_of(best).get('host', '?')}`).",
    ]


def _importance_lines(study: optuna.Study, plan: Plan) -> list[str]:
    importances, why_not = _importances(study)
    if not importances:
        return [why_not]
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return [
        f"Optuna's estimate (its default evaluator) from {plural(complete, 'complete trial')}: the share "
        f"of the variation in {plan.metric} each parameter explains. Few trials make it a rough guide.",
        "",
        "| parameter | importance |",
        "|---|---|",
        *[f"| `{k}` | {v:.3f} |" for k, v in importances.items()],
    ]


def _plots(folder: Path, plan: Plan, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """objective.png and params.png, from the complete and pruned trials; the lines that show them."""
    from mnistlab.plots import plot_sweep_objective, plot_sweep_params

    drawn = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    if not drawn:
        return ["Nothing to draw yet."]
    percent = plan.metric.endswith("accuracy")
    sign = 1 if plan.direction == "maximize" else -1
    scale = 100 if percent else 1
    plot_sweep_objective(
        [t.number for t in drawn],
        [scale * t.value for t in drawn],
        [t.state == TrialState.PRUNED for t in drawn],
        sign,
        folder / "objective.png",
        f"{plan.study}: {plan.metric} by trial",
        f"{plan.metric}{' (%)' if percent else ''}",
    )
    with_acc = [t for t in drawn if "val_accuracy" in result_of(t)]
    plot_sweep_params(
        {key: _axis(p, [t.params.get(key) for t in with_acc]) for key, p in plan.space.items()},
        [100 * result_of(t)["val_accuracy"] for t in with_acc],
        [t.state == TrialState.PRUNED for t in with_acc],
        folder / "params.png",
        f"{plan.study}: validation accuracy against each parameter",
    )
    return [
        f"![objective by trial](objective.png)\n\n{plan.metric} of each trial (pruned ones at their last epoch) "
        "and the best so far.",
        "",
        "![accuracy against each parameter](params.png)\n\nValidation accuracy against each parameter "
        "(hollow: pruned, at the epoch it stopped).",
    ]


def _axis(param: Param, stored: list[Any]) -> dict[str, Any]:
    """One parameter's values as the plot takes them: numbers (log scale or not), or choice positions."""
    if param.kind == "choice":
        labels = [choice_label(c) for c in param.choices]
        return {
            "values": [labels.index(v) if v in labels else None for v in stored],
            "ticks": [show_value(c) for c in param.choices],
            "log": False,
        }
    return {"values": stored, "ticks": None, "log": param.kind == "log"}


def _trials_table(trials: list, plan: Plan, best: Any, hosts: bool) -> list[str]:
    keys = list(plan.space)
    head = ["trial", "state", *[f"`{k}`" for k in keys], "val acc", "test acc", "epochs", "seconds"]
    head += ["host"] if hosts else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        r = result_of(t)
        number = f"**{t.number}** (best)" if best is not None and t.number == best.number else str(t.number)
        values = [show_value(plan.space[k].value_of(t.params[k])) if k in t.params else "" for k in keys]
        cells = [
            number,
            state_text(t).replace("|", "/"),
            *values,
            f"{100 * r['val_accuracy']:.2f}%" if "val_accuracy" in r else "",
            f"{100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "",
            str(r.get("epochs", "")),
            f"{r['seconds']:.1f}" if "seconds" in r else "",
        ]
        cells += [worker_of(t).get("host", "")] if hosts else []
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_summary(folder: Path) -> Path:
    """The summary of a sweep over several base configs: each study's best, side by side."""
    parts = json.loads((folder / SWEEP_FILE).read_text())["parts"]
    lines = [
        f"# Sweep {folder.name}",
        "",
        "One study per base config; each links to its full report. The best trial is the best by validation "
        "accuracy; its test accuracy is shown, never used to choose.",
        "",
        "| config | trials (complete / pruned / failed) | best val acc | its test acc | its epochs | best settings "
        "| minutes (wall / trial time) | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part in parts:
        if not (folder / part / SWEEP_FILE).is_file():
            lines.append(f"| {part} | not started | | | | | | |")
            continue
        study, plan = load_sweep(folder / part, None)
        trials = study.get_trials(deepcopy=False)
        n = {s: sum(t.state == s for t in trials) for s in TrialState}
        best = best_trial(study)
        wall = sum(s.get("seconds", 0.0) for s in _sessions(study))
        busy = sum(result_of(t).get("seconds", 0.0) for t in trials)
        cells = [plan.config.name, f"{n[TrialState.COMPLETE]} / {n[TrialState.PRUNED]} / {n[TrialState.FAIL]}"]
        if best is None:
            cells += ["", "", "", ""]
        else:
            r = result_of(best)
            settings = ", ".join(f"{k}={show_value(plan.space[k].value_of(v))}" for k, v in best.params.items())
            cells += [
                f"{100 * r['val_accuracy']:.2f}%",
                f"{100 * r['test_accuracy']:.2f}%",
                str(r.get("epochs", "")),
                settings,
            ]
        cells += [f"{wall / 60:.1f} / {busy / 60:.1f}", f"[report]({part}/report.md)"]
        lines.append("| " + " | ".join(cells) + " |")
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
