"""The lab in a browser: pick a method and a task, tune it, launch, watch every step, compare before and after.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8000 --host 0.0.0.0
    python app.py --share              # a public gradio.live link (in Colab: !python app.py --share)
    python app.py --share --allow-local  # shared, yet still taking server paths and code: trusted users only

This file is UI only. Every control is built from a method's config dataclass (``lab.config.describe_fields``),
the run itself goes through ``lab.live`` (a trainer generator in a thread, one metrics dict per step), and
the numbers come from ``lab.evaluate``, ``lab.ops``, ``lab.inspector`` (the step inspector), ``lab.fixed_points``
(the π* frontier) and ``lab.experiments`` (the one-click experiments). Charts are small SVGs (``lab.charts``),
redrawn at most twice a second. ``LabApp`` builds the page one panel at a time (``_settings``, ``_live``,
``_before_after``...) and holds the handlers (``on_*``).
"""

from __future__ import annotations

import argparse
import functools
import html
import inspect
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lab import charts, inspector, live  # noqa: E402
from lab.config import describe_fields  # noqa: E402
from lab.experiments import EXPERIMENTS, resolve  # noqa: E402
from lab.methods import available, get_method  # noqa: E402
from lab.tasks import TASKS  # noqa: E402

# The knobs shown up front for every method that has them; the rest of its fields go in "advanced".
MAIN_FIELDS = (
    "loss_type",
    "reward",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "group_size",
    "lr",
    "steps",
    "batch_size",
    "temperature",
    "lora_r",
)
# Chart panels in this order first, then the method's own metrics alphabetically.
PANEL_ORDER = (
    "reward",
    "kl",
    "eval",
    "eval kl",
    "loss",
    "entropy",
    "completion length",
    "completion",
    "rewards",
    "clip",
    "value",
)
SKIP_METRICS = ("step",)
SKIP_PREFIXES = ("time/", "memory/")  # timings and memory are for benchmarks, not for the live view
HAS_CUDA = torch.cuda.is_available()
UPDATE_EVERY = 0.5  # seconds between updates of the live view (at most 2 a second, whatever the step rate)
SAMPLES_EVERY = 3.0  # seconds between updates of the sample table while a run goes
MAX_POINTS = 300  # points per line sent to the page; longer runs are thinned evenly
COLORS = charts.COLORS
STEP_AXIS = "step (optimizer updates)"
KL_AXIS = "KL(π_θ‖π_ref) (nats)"
LIVE_PANELS = ("reward", "kl", "eval", "eval-kl", "loss", "entropy", "completion-length")  # drawn while a run goes
# y-axis titles (with units) by chart panel
UNITS = {
    "reward": "reward (task's units)",
    "kl": "KL (nats)",
    "eval": "held-out score (task's units)",
    "eval kl": "KL (nats)",
    "loss": "loss (nats)",
    "entropy": "entropy (nats per token)",
    "completion length": "tokens per completion",
    "completion": "fraction of completions",
    "rewards": "implicit reward β·log ratio",
    "logprobs": "log-prob (nats)",
    "clip": "fraction of tokens",
    "groups": "fraction of prompts",
    "grad": "gradient norm",
    "ratio": "π_θ / π_old",
    "value": "value",
    "rm": "reward-model score",
    "beta": "β",
}
PROXY_KEYS = ("reward/mean", "eval/exact_reward", "eval/sample_reward", "eval/gold_reward", "eval/accuracy")
GOLD_KEYS = ("reward/gold", "eval/gold_reward")
KL_KEYS = ("eval/kl_ref", "kl/ref")  # the x of reward against KL: exact where logged, else sampled
GLOSSARY = charts.glossary(Path(__file__).resolve().with_name("README.md"))

CSS = (
    charts.CSS
    + """
.lab-progress { height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden; margin: 4px 0; }
.lab-progress > div { height: 100%; background: #2563eb; transition: width 0.3s; }
.lab-progress-text { font-size: 0.9em; color: #4b5563; }
.lab-hidden { display: none !important; }
.lab-table-box { max-height: 360px; overflow: auto; border: 1px solid #e5e7eb; border-radius: 6px; }
.lab-table { border-collapse: collapse; width: 100%; font-size: 0.85em; }
.lab-table th, .lab-table td { padding: 3px 6px; border-bottom: 1px solid #f0f1f3; text-align: left;
  vertical-align: top; overflow-wrap: anywhere; }
.lab-table th { position: sticky; top: 0; background: #f9fafb; }
"""
)


# ----------------------------------------------------------------------------------------------------------------------
# Controls from config fields


def param_name(method: str, field: str) -> str:
    """API/keyword name of a method's field: ("sft-preferred", "lr") → "sft_preferred_lr"."""
    return f"{re.sub(r'[^a-z0-9]+', '_', method.lower())}_{field}"


def field_control(method: str, f: dict) -> gr.components.Component:
    """One widget for one config field, with the field's help as its info line and its range as bounds."""
    name, tp, default, help_ = f["name"], f["type"], f["default"], f["help"]
    elem_id = f"{method}-{name}"
    if tp is bool and default is None:  # three states: the config decides, on, off
        return gr.Dropdown(
            [("default", ""), ("on", "true"), ("off", "false")], value="", label=name, info=help_, elem_id=elem_id
        )
    if tp is bool:
        return gr.Checkbox(value=bool(default), label=name, info=help_, elem_id=elem_id)
    if f.get("choices"):
        return gr.Dropdown(choices=list(f["choices"]), value=default, label=name, info=help_, elem_id=elem_id)
    if tp in (int, float) and default is None:
        # "empty = the default" needs a text box: a browser sends an empty number box as 0.
        span = f" · range [{f['min']:g}, {f['max']:g}]" if f["min"] is not None and f["max"] is not None else ""
        return gr.Textbox(value="", label=name, info=help_ + span, placeholder="empty: default", elem_id=elem_id)
    if tp in (int, float):
        # A number box without bounds or rounding: a slider clamps a typed 999 to its maximum and precision=0
        # rounds 2.5 to 2, both without a word. The config checks the range and says what to change (ConfigError).
        span = f" · range [{f['min']:g}, {f['max']:g}]" if f["min"] is not None and f["max"] is not None else ""
        return gr.Number(value=default, label=name, info=help_ + span, elem_id=elem_id)
    return gr.Textbox(
        value="" if default is None else str(default),
        label=name,
        info=help_,
        placeholder="default" if default is None else None,
        elem_id=elem_id,
    )


def method_panel(method: str, hide: tuple[str, ...] = ()) -> dict[str, gr.components.Component]:
    """The method's fields: the main knobs, then an accordion with everything else (less the ``hide`` ones, which
    keep their config default: a shared app has no trust_remote_code box)."""
    cls, _ = get_method(method)
    fields = [
        f
        for f in describe_fields(cls)
        if f["name"] not in live.SHARED_FIELDS and not f["name"].startswith("_") and f["name"] not in hide
    ]
    main = sorted((f for f in fields if f["name"] in MAIN_FIELDS), key=lambda f: MAIN_FIELDS.index(f["name"]))
    rest = [f for f in fields if f["name"] not in MAIN_FIELDS]
    controls = {}
    doc = (inspect.getdoc(inspect.getmodule(cls)) or "").strip().splitlines()
    if doc:
        gr.Markdown(f"**{method}** — {doc[0]}")
    for f in main:
        controls[f["name"]] = field_control(method, f)
    with gr.Accordion(f"advanced ({len(rest)} more settings)", open=False, elem_id=f"{method}-advanced"):
        for f in rest:
            controls[f["name"]] = field_control(method, f)
    return controls


# ----------------------------------------------------------------------------------------------------------------------
# Charts: small SVG plots (lab.charts), one per metric group, redrawn at most twice a second


def panel_of(key: str) -> str:
    """Which chart a metric goes on: its namespace ("kl/ref" → "kl"), except that every gold reward sits with
    the reward, held-out KLs get their own chart, and completion lengths (also per-outcome ones such as
    "length/correct") share one chart."""
    if "gold" in key and not key.startswith("eval/"):
        return "reward"
    if key.startswith("eval/kl"):
        return "eval kl"
    if key == "completion/length" or key.startswith("length/"):
        return "completion length"
    return key.split("/", 1)[0]


def _chart_keys(histories: dict[str, list[dict]]) -> dict[str, list[str]]:
    """panel → the metric keys logged in any of the runs, in first-seen order."""
    keys: dict[str, list[str]] = {}
    for history in histories.values():
        for row in history:
            for key, value in row.items():
                if key in SKIP_METRICS or key.startswith(SKIP_PREFIXES) or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    panel = keys.setdefault(panel_of(key), [])
                    if key not in panel:
                        panel.append(key)
    return keys


def chart_groups(histories: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """(panel, keys) per chart, in PANEL_ORDER. A panel whose metrics differ in size by more than 10× is split,
    one chart per scale, so that no line is flattened against the axis by a bigger neighbour."""
    keys = _chart_keys(histories)
    panels = sorted(keys, key=lambda p: (PANEL_ORDER.index(p) if p in PANEL_ORDER else len(PANEL_ORDER), p))
    out = []
    for panel in panels:
        size = {
            k: max((abs(r[k]) for h in histories.values() for r in h if isinstance(r.get(k), (int, float))), default=0)
            for k in keys[panel]
        }
        groups: list[list[str]] = []
        for key in sorted(keys[panel], key=lambda k: -size[k]):
            group = next((g for g in groups if size[key] * 10 >= size[g[0]] or size[g[0]] == 0), None)
            if group is None:
                groups.append([key])
            else:
                group.append(key)
        out += [(panel, sorted(g, key=keys[panel].index)) for g in groups]
    return out


def _short_key(key: str) -> str:
    return key.split("/", 1)[1] if "/" in key else key


def _series(history: list[dict], key: str, name: str, color: str, dash: bool = False) -> charts.Series:
    points = [(m["step"], m[key]) for m in history if isinstance(m.get(key), (int, float)) and "step" in m]
    stride = max(1, len(points) // MAX_POINTS)
    points = points[::stride] + (points[-1:] if stride > 1 and (len(points) - 1) % stride else [])
    return charts.Series(name, [p[0] for p in points], [p[1] for p in points], color, dash)


def metric_charts(histories: dict[str, list[dict]], method: str = "", overlay: bool = False) -> list[charts.Chart]:
    """One chart per metric group. Live view: one run, one colour per metric. Overlay: one colour per run (its
    label in the legend), one line style per metric."""
    out = []
    for panel, keys in chart_groups(histories):
        series = []
        for j, key in enumerate(keys):
            for k, (label, history) in enumerate(histories.items()):
                if not any(key in m for m in history):
                    continue
                if overlay:
                    name = f"{label} · {_short_key(key)}" if len(keys) > 1 else label
                    series.append(_series(history, key, name, COLORS[k % len(COLORS)], dash=j % 2 == 1))
                else:
                    series.append(_series(history, key, key, COLORS[j % len(COLORS)]))
        title = panel if len(keys) == 1 and _short_key(keys[0]) == panel else f"{panel}: " + ", ".join(keys)
        good = charts.healthy(GLOSSARY, method, keys[0])
        note = f"healthy: {good}" if good else ""
        y_title = UNITS.get(panel, _short_key(keys[0]))
        slug = re.sub(r"\W+", "-", panel)
        out.append(charts.Chart(title, STEP_AXIS, y_title, series, _clip(note), f"chart-{slug}"))
    return out


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _paired(history: list[dict], y_key: str) -> tuple[list[float], list[float]]:
    """(KL, y) per row that has y, with the latest KL logged up to that row (DPO evaluates rarely). The KL is the
    exact ``eval/kl_ref`` where a run logs it (enumerable tasks), else the sampled ``kl/ref``."""
    x_key = next((k for k in KL_KEYS if any(isinstance(r.get(k), (int, float)) for r in history)), KL_KEYS[-1])
    xs, ys, kl = [], [], None
    for row in history:
        if isinstance(row.get(x_key), (int, float)):
            kl = row[x_key]
        if kl is not None and isinstance(row.get(y_key), (int, float)):
            xs.append(kl)
            ys.append(row[y_key])
    return xs, ys


def reward_kl_charts(histories: dict[str, list[dict]], frontier: bool = False) -> list[charts.Chart]:
    """Reward against KL(π_θ‖π_ref), one path per run, step by step; the gold reward on a chart of its own beside
    the proxy (a learned reward model's score is on another scale); on bandit, the exact π* frontier."""
    proxy, gold = [], []
    for k, (label, history) in enumerate(histories.items()):
        color = COLORS[k % len(COLORS)]
        y_key = next((key for key in PROXY_KEYS if _paired(history, key)[0]), None)
        if y_key is not None:
            proxy.append(charts.Series(f"{label} · {y_key}", *_paired(history, y_key), color))
        g_key = next((key for key in GOLD_KEYS if key != y_key and _paired(history, key)[0]), None)
        if g_key is not None:
            gold.append(charts.Series(f"{label} · {g_key}", *_paired(history, g_key), color))
    if frontier:
        points = bandit_frontier()
        proxy.append(
            charts.Series(
                "π* frontier: E_π*[r] against KL(π*‖π_ref) as β sweeps",
                [p["kl"] for p in points],
                [p["reward"] for p in points],
                "#6b7280",
                dash=True,
                markers=False,
            )
        )
    if not proxy:
        return []
    note = (
        "healthy: the path climbs up and to the right and flattens; on bandit it stays under the dashed frontier; "
        "moving right without rising spends KL for nothing"
    )
    out = [charts.Chart("reward against KL", KL_AXIS, "reward (task's units)", proxy, note, "chart-reward-kl")]
    if gold:
        gold_note = "healthy: gold rises with the proxy; gold falling while the proxy rises is over-optimization"
        out.append(charts.Chart("gold reward against KL", KL_AXIS, "gold reward", gold, gold_note, "chart-gold-kl"))
    return out


@functools.lru_cache(maxsize=1)
def bandit_frontier() -> tuple[dict, ...]:
    from lab.fixed_points import bandit_frontier as frontier

    return frontier()


def charts_html(
    histories: dict[str, list[dict]], method: str = "", task: str = "", overlay: bool = False, running: bool = False
) -> str:
    """Reward against KL first, then every metric group: the live view and the overlay both draw this. While a run
    goes (``running``), only the main charts (LIVE_PANELS): the method's own diagnostics join them at the end."""
    if not any(histories.values()):
        return charts.grid([], "charts appear with the first step" if not overlay else "tick runs to overlay them")
    found = reward_kl_charts(histories, frontier=task == "bandit")
    metric = metric_charts(histories, method, overlay)
    if running:
        more = [c for c in metric if c.elem_id.removeprefix("chart-") not in LIVE_PANELS]
        metric = [c for c in metric if c not in more]
        found += [_more_note(len(more))] if more else []
    return charts.grid(found + metric, elem_id="charts-overlay" if overlay else "")


def _more_note(n: int) -> charts.Chart:
    return charts.Chart(f"{n} more charts when the run ends", "", "", note="the method's own diagnostics")


# ----------------------------------------------------------------------------------------------------------------------
# Tables and text


def samples_frame(rows: list[dict]) -> pd.DataFrame:
    """The latest samples: step, prompt, completion, then every number the trainer logged with them."""
    if not rows:
        return pd.DataFrame(columns=["step", "prompt", "completion", "reward"])
    numeric = []
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "prompt", "completion") and isinstance(value, (int, float)) and key not in numeric:
                numeric.append(key)
    table = [
        {
            "step": r.get("step"),
            "prompt": _short(r.get("prompt")),
            "completion": _short(r.get("completion")),
            **{k: _round(r.get(k)) for k in numeric},
        }
        for r in rows
    ]
    return pd.DataFrame(table, columns=["step", "prompt", "completion", *numeric])


def samples_html(rows: list[dict]) -> str:
    """The sample table as plain HTML: a browser lays it out in milliseconds, while a live data grid re-measures
    every row on each update."""
    table = samples_frame(rows).to_html(index=False, border=0, classes="lab-table", na_rep="", float_format="%.4g")
    return f"<div class='lab-table-box' id='samples-table'>{table}</div>"


def _short(text, n: int = 200) -> str:
    if isinstance(text, list):  # conversational: show the last message
        text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else str(text)
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def progress_html(job: live.Job | None) -> str:
    if job is None:
        return "<div class='lab-progress-text'>no run yet</div>"
    p = job.progress()
    frac = p["step"] / p["steps"] if p["steps"] else 0.0
    if p["phase"] in ("starting", "loading"):
        text = f"loading the model… {_seconds(p['elapsed'])}"
    elif p["step"] == 0 and not job.done:
        text = f"first step running… {_seconds(p['elapsed'])}"
    else:
        text = (
            f"step {p['step']} / {p['steps']} · {_seconds(p['per_step'])} per step · elapsed "
            f"{_seconds(p['elapsed'])}" + (f" · ETA {_seconds(p['eta'])}" if p["eta"] is not None else "")
        )
        if job.done:
            text += f" · {p['phase']}"
    return (
        f"<div class='lab-progress' id='lab-progress-bar'><div style='width:{100 * frac:.1f}%'></div></div>"
        f"<div class='lab-progress-text' id='lab-progress-text'>{text}</div>"
    )


def before_after_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["prompt", "before", "before reward", "after", "after reward"]
    return pd.DataFrame(
        [
            [_short(r["prompt"]), r["before"], _round(r["before_reward"]), r["after"], _round(r["after_reward"])]
            for r in rows
        ],
        columns=cols,
    )


def reliability_html(bins: dict[str, list[dict]]) -> str:
    """Confidence against accuracy per bin, before and after, with the diagonal a calibrated policy lies on."""
    from lab.diagnostics import ece_from_bins

    series = [charts.Series("calibrated (accuracy = confidence)", [0.0, 1.0], [0.0, 1.0], charts.COLORS[8], True)]
    for i, (label, rows) in enumerate((("before (π_ref)", bins["before"]), ("after", bins["after"]))):
        full = [b for b in rows if b["count"]]
        name = f"{label}: ECE {ece_from_bins(rows):.3f}"
        x, y = [b["confidence"] for b in full], [b["accuracy"] for b in full]
        series.append(charts.Series(name, x, y, charts.COLORS[i], markers=True))
    chart = charts.Chart(
        "Reliability diagram", "confidence: π(greedy answer) (probability)", "accuracy (share correct)", series,
        "healthy: points near the diagonal; below it the policy is more sure than right (overconfident)",
        elem_id="chart-reliability",
    )  # fmt: skip
    return charts.grid([chart])


LAUNCHED_NOTE = "Launched: the run's progress and charts are in the live view."


def before_after_text(summary: dict) -> str:
    if summary.get("diff") is None:
        return f"Same {summary.get('n', 0)} prompts, reference policy vs. tuned policy (greedy; no gold reward here)."
    return (
        f"Mean reward on {summary['n']} held-out prompts (greedy): **before {summary['before']:.3f} → "
        f"after {summary['after']:.3f}** (difference **{summary['diff']:+.3f}**)"
    )


def error_text(message: str) -> str:
    return f"<span id='lab-error'>**Error:** {message}</span>"


HELD_OUT = 1000  # picker values from here on are before/after rows, below it training samples


def sample_choices(state: live.Session | None) -> dict:
    """Picker update: the latest training samples, then the tuned policy's held-out answers. The default pick
    is the first held-out answer that training changed (where the per-token KL has something to show)."""
    if state is None:
        return gr.update(choices=[], value=None)
    choices = [
        (f"sample #{i} · {_short(r.get('prompt'), 40)!r} → {_short(r.get('completion'), 40)!r}", i)
        for i, r in enumerate(state.samples)
    ]
    choices += [
        (f"held-out #{j} · {_short(r['prompt'], 40)!r} → {_short(r['after'], 40)!r} (tuned)", HELD_OUT + j)
        for j, r in enumerate(state.compared)
    ]
    changed = [HELD_OUT + j for j, r in enumerate(state.compared) if r["after"] != r["before"]]
    value = changed[0] if changed else (choices[0][1] if choices else None)
    return gr.update(choices=choices, value=value)


def picked_row(state: live.Session, index) -> dict | None:
    """The {prompt, completion, ...} row a picker value points at."""
    index = int(index or 0)
    if index >= HELD_OUT and index - HELD_OUT < len(state.compared):
        row = state.compared[index - HELD_OUT]
        return {"prompt": row["prompt"], "completion": row["after"]}
    return state.samples[index] if 0 <= index < len(state.samples) else None


def empty_token_view():
    return [], pd.DataFrame(columns=["token", "logprob", "ref_logprob", "kl"]), ""


def short_task(task: str) -> str:
    """A task as tables show it: an upload's long temporary path becomes its file name."""
    if task.startswith("jsonl:") or task.endswith((".jsonl", ".json")):
        return Path(task.removeprefix("jsonl:")).name
    return task


RUNS_COLUMNS = ("id", "method", "task", "status", "steps", "started", "reward", "gold", "kl/ref", "beta", "lr")


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """The runs table: id, method, task, status, steps, started, final reward, gold and KL, β and lr (the rest of
    the settings show in the comparison's diff)."""
    table = pd.DataFrame(rows, columns=RUNS_COLUMNS)
    if "task" in table:
        table["task"] = table["task"].astype(str).map(short_task)
    if "started" in table:
        table["started"] = table["started"].astype(str).str[:16].str.replace("T", " ")
    return table.round(4)


def best_of_n_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "prompt": _short(r["prompt"]),
                "best of N": r["completion"],
                "r of pick": _round(r["score"]),
                "gold of pick": _round(r["gold_reward"]),
                "mean gold of N": _round(r["mean_gold_reward"]),
            }
            for r in rows
        ]
    )


def _token_span(term: dict, row: int, tok: int, scale: float) -> str:
    value = term["term"] if term["term"] is not None else 0.0
    alpha = min(abs(value) / scale, 1.0) * 0.6 if scale else 0.0
    colour = f"rgba(220,38,38,{alpha:.2f})" if value > 0 else f"rgba(37,99,235,{alpha:.2f})"
    arrow = {1: "↑", -1: "↓", 0: "·"}.get(term["pushed"], "")
    border = "2px solid #111827" if term["clipped"] else "1px solid #e5e7eb"
    tip = html.escape(f"term {term['term']}, ratio {term['ratio']}, advantage {term['advantage']}, kl {term['kl']}")
    text = html.escape(term["token"]).replace(" ", "␣") or "∅"
    return (
        f"<span data-row='{row}' data-tok='{tok}' title='{tip}' style='cursor:pointer;padding:1px 3px;margin:1px;"
        f"border:{border};border-radius:3px;background:{colour};display:inline-block'>{text}{arrow}</span>"
    )


def inspector_html(inspected: dict) -> str:
    """The inspected step: one block per prompt (a GRPO group), one line of coloured tokens per completion."""
    rows, terms = inspected["rows"], inspected["terms"]
    scale = max((abs(t["term"]) for ts in terms for t in ts if t["term"] is not None), default=0.0)
    out = [f"<div class='lab-inspector'><b>step {inspected['step']}</b> · {len(rows)} completions"]
    if not any(terms):
        out.append(
            " · this record has no per-token numbers (written before samples carried them); showing the text only"
        )
    for prompt, members in inspector.groups(rows):
        out.append(f"<div style='margin-top:8px'><b>prompt</b> {html.escape(_short(prompt, 300))}</div>")
        for i in members:
            reward = rows[i].get("reward")
            head = f"r = {reward:.3f}" if isinstance(reward, (int, float)) else ""
            adv = rows[i].get("advantage")
            head += f", Â = {adv:+.3f}" if isinstance(adv, (int, float)) else ""
            body = "".join(_token_span(t, i, j, scale) for j, t in enumerate(terms[i])) or html.escape(
                _short(rows[i].get("completion"), 300)
            )
            out.append(f"<div style='margin-left:12px'><span style='color:#4b5563'>{head}</span> {body}</div>")
    out.append("</div>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# The app


def default_method(methods: list[str]) -> str:
    for name in ("grpo", "sft"):
        if name in methods:
            return name
    return methods[0]


LIVE_OUTPUTS = ("status", "progress", "charts", "samples", "metrics", "ba_text", "ba_table", "pick")


class LiveOut:
    """The live view's outputs of one launch, in LIVE_OUTPUTS order, then the tab's state. A yield sends only what
    changed (the rest is gr.skip()); the last one repeats what each output shows, for API callers."""

    def __init__(self, state: live.Session):
        self.state = state
        self.shown: dict[str, object] = {name: gr.skip() for name in LIVE_OUTPUTS}

    def __call__(self, final: bool = False, **values) -> tuple:
        self.shown.update(values)
        sent = self.shown if final else {name: values.get(name, gr.skip()) for name in LIVE_OUTPUTS}
        return (*(sent[name] for name in LIVE_OUTPUTS), self.state)


class LabApp:
    """The UI, one builder per panel (``_settings``, ``_live``, ``_before_after``...), and its handlers (``on_*``).
    ``ui`` holds every component a handler reads or writes, by name."""

    def __init__(self, runs_dir: str = "runs", serving: live.Serving | None = None):
        self.runs_dir = runs_dir
        self.serving = serving or live.Serving()
        self.methods = available()
        if not self.methods:
            raise RuntimeError("no training method could be imported; check the installation (pip install -e .)")
        self.first = default_method(self.methods)
        self.first_defaults = {f["name"]: f["default"] for f in describe_fields(get_method(self.first)[0])}
        self.ui = SimpleNamespace()
        self.fields_of: dict[str, dict[str, str]] = {}  # method → {param name: field}
        self.panels: dict[str, gr.Column] = {}
        self.controls: dict[str, gr.components.Component] = {}

    # --- layout ---------------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="lab: RL on language models") as demo:
            self.demo = demo
            self.ui.session = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
            gr.Markdown(
                "# lab — reinforcement learning on language models\n"
                "Pick a method and a task, press **Launch**, and watch every step arrive. Every control is a "
                "field of the method's config (its info line says what it does)."
            )
            with gr.Tabs():
                with gr.Tab("Train", id="train"):
                    with gr.Row():
                        with gr.Column(scale=2, min_width=320):
                            self._settings()
                        with gr.Column(scale=5, min_width=320):
                            self._live()
                    self._before_after()
                    self._best_of_n()
                    self._per_token()
                    self._inspector()
                with gr.Tab("Past runs", id="runs") as self.ui.runs_tab:
                    self._past_runs()
                with gr.Tab("Experiments", id="experiments"):
                    self._experiments()
            self._wire_settings()
            self._wire_launch()
            self._wire_after_run()
            self._wire_runs()
        return demo

    def _settings(self) -> None:
        ui, first = self.ui, self.first
        ui.method = gr.Dropdown(self.methods, value=first, label="method", elem_id="method")
        ui.task = gr.Dropdown(
            list(TASKS),
            value=self.first_defaults.get("task") or "arith",
            allow_custom_value=True,
            label="task / data",
            elem_id="task",
            info="a built-in task, or jsonl:PATH, a local .jsonl, or hf:ID",
        )
        with gr.Row():
            ui.launch = gr.Button("Launch", variant="primary", elem_id="launch")
            ui.stop = gr.Button("Stop", variant="stop", elem_id="stop")
        # Stop answers here, so that it never overwrites the run's final status in the live view
        ui.stop_note = gr.Markdown(elem_id="stop-note")
        ui.model = gr.Textbox(
            value="",
            label="model",
            elem_id="model",
            placeholder="empty: the task's built-in model",
            info="a built-in name, a local folder, or a hub id (needs a network)",
        )
        ui.data_file = gr.File(
            label="or upload a JSONL (prompt / completion / chosen / rejected)",
            file_types=[".jsonl", ".json"],
            type="filepath",
            elem_id="data-file",
        )
        ui.data_status = gr.Markdown(elem_id="data-status")
        with gr.Row():
            ui.mode = gr.Radio(
                ["lora", "full"],
                label="weights",
                elem_id="mode",
                value="full" if self.first_defaults.get("mode") == "full" else "lora",
                info="lora: train adapters, π_ref = adapters off; full: every weight",
            )
            ui.four_bit = gr.Checkbox(
                value=False,
                label="4-bit base (QLoRA)",
                elem_id="four-bit",
                info="nf4 base + LoRA adapters, through bitsandbytes: on a GPU, or on the CPU where bitsandbytes "
                "has a CPU build" + ("" if HAS_CUDA else " (slow there: it is for memory, not speed)"),
            )
        # What Launch clicks: one button per method, whose event carries only that method's fields (an event's
        # cost in the page grows with its inputs), and one for API callers that takes every method's fields.
        with gr.Row(elem_classes="lab-hidden"):
            self.launchers = {m: gr.Button(f"launch {m}", elem_id=f"launch-{m}") for m in self.methods}
            ui.launch_api = gr.Button("launch (API)", visible=False)
        for m in self.methods:
            with gr.Column(visible=(m == first)) as col:
                self.panels[m] = col
                self.fields_of[m] = {}
                for name, comp in method_panel(m, hide=self.serving.hidden_fields).items():
                    self.controls[param_name(m, name)] = comp
                    self.fields_of[m][param_name(m, name)] = name

    def _live(self) -> None:
        ui = self.ui
        ui.status = gr.Markdown("Choose settings and press **Launch**.", elem_id="status")
        ui.progress = gr.HTML(progress_html(None), elem_id="progress")
        ui.charts = gr.HTML(charts_html({}), elem_id="charts", label="metrics, one point per step")
        gr.Markdown("**latest samples**")
        ui.samples = gr.HTML(samples_html([]), elem_id="samples")
        # every step's metrics, for API callers; the page does not draw them (the record's metrics.jsonl has them)
        ui.metrics = gr.JSON(label="metrics", elem_id="metrics", visible=False)

    def _before_after(self) -> None:
        ui = self.ui
        gr.Markdown(
            "## Before and after\nThe same held-out prompts, answered greedily by the reference "
            "policy (π_ref: the adapters switched off) and by the tuned policy."
        )
        with gr.Row():
            ui.n_compare = gr.Number(
                8,
                label="held-out prompts",
                scale=3,
                elem_id="n-compare",
                info="at most the task's held-out set (arith 200, reviews 10, bandit 6)",
            )
            ui.compare = gr.Button("Compare again", scale=1, elem_id="compare")
        ui.ba_text = gr.Markdown(elem_id="before-after-summary")
        ui.ba_table = gr.Dataframe(before_after_frame([]), wrap=True, interactive=False, elem_id="before-after")
        with gr.Accordion("Calibration: a reliability diagram (tasks with checkable answers)", open=False):
            ui.reliability_go = gr.Button("Draw it for π_ref and the tuned policy", elem_id="reliability-go")
            ui.reliability = gr.HTML(elem_id="reliability")

    def _best_of_n(self) -> None:
        ui = self.ui
        ui.bon = None
        if not live.has_best_of_n():
            return
        from lab.baselines import BestOfNConfig

        n_field = {f["name"]: f for f in describe_fields(BestOfNConfig)}["n"]
        with gr.Accordion("Best-of-N from π_ref (no training)", open=False):
            gr.Markdown(
                "Sample N completions per held-out prompt from the reference policy and keep the one the reward "
                "scores highest: y = argmax_i r(x, y_i). Its KL to π_ref is at most log N − (N − 1)/N."
            )
            with gr.Row():
                ui.bon_reward = gr.Dropdown(
                    ["gold"],
                    value="gold",
                    allow_custom_value=True,
                    label="reward",
                    info="gold (the task's own) or a reward model trained here, with the task it was trained on",
                    elem_id="bon-reward",
                )
                ui.bon_n = gr.Number(n_field["default"], label="N", elem_id="bon-n", info=n_field["help"])
                ui.bon_prompts = gr.Number(
                    6, label="held-out prompts", elem_id="bon-prompts", info="at most the task's held-out set"
                )
                ui.bon = gr.Button("Run best-of-N", elem_id="bon")
            ui.bon_text = gr.Markdown()
            ui.bon_table = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=300)

    def _per_token(self) -> None:
        ui = self.ui
        gr.Markdown(
            "## Per token\nEach completion token coloured by its KL term "
            "log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t): red where the tuned policy is more "
            "sure of the token than the reference, blue where less. The sum is the sequence's "
            "log-ratio, the single-sample KL estimate."
        )
        with gr.Row():
            ui.sample_pick = gr.Dropdown(
                [],
                label="completion (latest training samples, then held-out answers)",
                scale=3,
                allow_custom_value=True,
                elem_id="sample-pick",
            )
            ui.colour_by = gr.Radio(
                ["KL to reference", "advantage"], value="KL to reference", label="colour by", scale=2
            )
            ui.tokens = gr.Button("Show tokens", scale=1, elem_id="show-tokens")
        ui.token_text = gr.HighlightedText(
            label="completion tokens", elem_id="tokens", show_legend=False, show_inline_category=False
        )
        ui.token_sum = gr.Markdown(elem_id="token-sum")
        ui.token_table = gr.Dataframe(empty_token_view()[1], interactive=False, max_height=260)

    def _inspector(self) -> None:
        ui = self.ui
        gr.Markdown(
            "## Step inspector\nA logged step of this tab's run (or of a past run): its prompts (a GRPO group "
            "per prompt), each token coloured by its objective term min(ρ·Â, clip(ρ)·Â) (red: pushed up, blue: "
            "down; a box: the clip binds). Click a token for the method's equation with its numbers."
        )
        with gr.Row():
            ui.inspect_run = gr.Textbox(label="run id", placeholder="empty: this tab's run", elem_id="inspect-run")
            # a text box: a browser sends an empty number box as 0
            ui.inspect_step = gr.Textbox(
                label="step", placeholder="empty: the last logged step", elem_id="inspect-step"
            )
            ui.inspect = gr.Button("Inspect", elem_id="inspect")
        ui.inspected = gr.State(None)
        ui.inspect_html = gr.HTML(
            "",
            elem_id="inspector",
            js_on_load="element.addEventListener('click', (e) => { const t = e.target.closest('[data-tok]'); "
            "if (t) trigger('click', {row: +t.dataset.row, tok: +t.dataset.tok}); });",
        )
        ui.equation = gr.Markdown(elem_id="equation")

    def _past_runs(self) -> None:
        ui = self.ui
        gr.Markdown(
            f"Runs recorded in `{self.runs_dir}/`. Tick two or more to compare them: overlaid curves, the settings "
            "that differ, and their answers side by side."
        )
        with gr.Row():
            ui.filter_method = gr.Dropdown(["all", *self.methods], value="all", label="method", elem_id="f-method")
            ui.filter_task = gr.Dropdown(["all", *TASKS], value="all", label="task", elem_id="f-task")
            ui.filter_status = gr.Dropdown(
                ["all", "completed", "stopped", "failed", "running", "interrupted"], value="all", label="status"
            )
            ui.refresh = gr.Button("Refresh", elem_id="refresh-runs")
        ui.run_pick = gr.CheckboxGroup([], label="runs", elem_id="run-pick")
        with gr.Row():
            ui.resume = gr.Button("Resume the ticked run", elem_id="resume", visible=live.can_resume())
            ui.delete = gr.Button("Delete the ticked runs", variant="stop", elem_id="delete-runs")
        ui.runs_note = gr.Markdown(elem_id="runs-note")
        ui.runs_table = gr.Dataframe(
            pd.DataFrame(), interactive=False, label="all runs", wrap=True, elem_id="runs-table", max_height=420
        )
        ui.overlay = gr.HTML(charts_html({}, overlay=True), elem_id="overlay")
        ui.config_diff = gr.Dataframe(pd.DataFrame(), interactive=False, label="settings that differ", wrap=True)
        ui.answers = gr.Dataframe(
            pd.DataFrame(), interactive=False, label="answers side by side (last logged samples)", wrap=True
        )

    def _experiments(self) -> None:
        ui = self.ui
        gr.Markdown(
            "One click launches an experiment's runs one after another (in this tab's turn in the queue) and "
            "overlays them as they go."
        )
        with gr.Row():
            ui.experiment = gr.Dropdown(
                [(e.title, e.name) for e in EXPERIMENTS.values()],
                value=next(iter(EXPERIMENTS)),
                label="experiment",
                elem_id="experiment",
                scale=4,
            )
            ui.run_experiment = gr.Button("Run the experiment", variant="primary", elem_id="run-experiment", scale=1)
        ui.experiment_text = gr.Markdown(experiment_text(next(iter(EXPERIMENTS))), elem_id="experiment-text")
        ui.experiment_status = gr.Markdown(elem_id="experiment-status")
        ui.experiment_charts = gr.HTML(charts_html({}, overlay=True), elem_id="experiment-charts")

    # --- wiring ---------------------------------------------------------------------------------------------------

    def _wire_settings(self) -> None:
        ui = self.ui
        ui.method.change(
            self.on_method, inputs=ui.method, outputs=[*self.panels.values(), ui.task, ui.mode], api_name=False,
            queue=False,
        )  # fmt: skip
        ui.data_file.change(on_upload, inputs=ui.data_file, outputs=ui.data_status, api_name="check_data")

    def _wire_launch(self) -> None:
        ui = self.ui
        common = {
            "method": ui.method,
            "task": ui.task,
            "model": ui.model,
            "data_file": ui.data_file,
            "mode": ui.mode,
            "four_bit": ui.four_bit,
        }
        outputs = [ui.status, ui.progress, ui.charts, ui.samples, ui.metrics, ui.ba_text, ui.ba_table, ui.sample_pick]
        outputs.append(ui.session)  # in LIVE_OUTPUTS order, then the tab's state
        launch = dict(
            inputs=[ui.session],
            outputs=outputs,
            concurrency_limit=1,
            concurrency_id="training",
            show_progress="hidden",  # the progress line says what the run is doing; a spinner costs every output
            validator=queue_validator(self.demo, self.serving) if self.serving.shared else None,
        )
        ui.launch_api.click(self.on_launch, inputs_kwargs={**common, **self.controls}, api_name="launch", **launch)
        for m, button in self.launchers.items():
            own = {key: self.controls[key] for key in self.fields_of[m]}
            button.click(self.on_launch, inputs_kwargs={**common, **own}, api_name=False, **launch)
        ui.launch.click(None, inputs=ui.method, js="(m) => { document.getElementById('launch-' + m).click(); }")
        # a new run: no stale note, and a word beside Launch (on a phone the live view is a screen further down)
        ui.launch.click(lambda: LAUNCHED_NOTE, outputs=ui.stop_note, api_name=False, queue=False)
        # Stop skips the queue: its reply comes at once, whatever the queue holds; the trainer stops after its step
        ui.stop.click(self.on_stop, inputs=ui.session, outputs=ui.stop_note, api_name="stop", queue=False)

    def _wire_after_run(self) -> None:
        ui = self.ui
        ui.compare.click(
            self.on_compare, inputs=[ui.session, ui.n_compare], outputs=[ui.ba_text, ui.ba_table, ui.sample_pick],
            api_name="before_after",
        )  # fmt: skip
        ui.reliability_go.click(
            self.on_reliability, inputs=[ui.session, ui.n_compare], outputs=ui.reliability, api_name="reliability"
        )
        ui.tokens.click(
            on_tokens, inputs=[ui.session, ui.sample_pick, ui.colour_by],
            outputs=[ui.token_text, ui.token_table, ui.token_sum], api_name="tokens",
        )  # fmt: skip
        if ui.bon is not None:
            ui.bon.click(
                self.on_bon, inputs=[ui.session, ui.task, ui.bon_reward, ui.bon_n, ui.bon_prompts],
                outputs=[ui.bon_text, ui.bon_table, ui.session], api_name="best_of_n",
            )  # fmt: skip
            self.demo.load(self.on_reward_models, outputs=ui.bon_reward, api_name=False)
        ui.inspect.click(
            self.on_inspect, inputs=[ui.session, ui.inspect_run, ui.inspect_step],
            outputs=[ui.inspected, ui.inspect_html, ui.equation], api_name="inspect",
        )  # fmt: skip
        ui.inspect_html.click(on_token_pick, inputs=ui.inspected, outputs=ui.equation, api_name=False)

    def _wire_runs(self) -> None:
        ui = self.ui
        filters = [ui.run_pick, ui.filter_method, ui.filter_task, ui.filter_status]
        listing = [ui.run_pick, ui.runs_table]
        ui.refresh.click(self.on_refresh, inputs=filters, outputs=listing, api_name="runs")
        for box in filters[1:]:
            box.change(self.on_refresh, inputs=filters, outputs=listing, api_name=False)
        self.demo.load(self.on_refresh, inputs=filters, outputs=listing, api_name=False)
        ui.runs_tab.select(self.on_refresh, inputs=filters, outputs=listing, api_name=False)  # runs made since
        ui.run_pick.change(
            self.on_overlay, inputs=ui.run_pick, outputs=[ui.overlay, ui.config_diff, ui.answers], api_name="overlay"
        )
        ui.delete.click(self.on_delete, inputs=filters, outputs=[ui.runs_note, *listing], api_name="delete_runs")
        ui.resume.click(
            self.on_resume, inputs=ui.run_pick, outputs=[ui.runs_note, ui.method, *self.controls.values()],
            api_name=False,
        )  # fmt: skip
        ui.experiment.change(experiment_text, inputs=ui.experiment, outputs=ui.experiment_text, api_name=False)
        ui.run_experiment.click(
            self.on_experiment, inputs=[ui.session, ui.experiment],
            outputs=[ui.experiment_status, ui.experiment_charts, ui.session], api_name="experiment",
            concurrency_limit=1, concurrency_id="training",
        )  # fmt: skip

    # --- handlers: settings and the launch ------------------------------------------------------------------------

    def on_method(self, name):
        """Show the method's panel; the task and weights follow the method's own defaults."""
        defaults = {f["name"]: f["default"] for f in describe_fields(get_method(name)[0])}
        return [gr.update(visible=(m == name)) for m in self.methods] + [
            gr.update(value=defaults.get("task") or "arith"),
            gr.update(value="full" if defaults.get("mode") == "full" else "lora"),
        ]

    def on_launch(self, state, method=None, task=None, model=None, data_file=None, mode=None, four_bit=None, **fields):
        """Generator: the whole live view once at the start, then at most every UPDATE_EVERY seconds while the run
        goes, then the before/after comparison."""
        out = LiveOut(state if state is not None else live.Session())
        job = yield from self._start(out, method or self.first, task, model, data_file, mode, four_bit, fields)
        if job is not None:
            yield from self._watch(out, job)
            yield from self._wrap_up(out, job)

    def _start(self, out: LiveOut, method, task, model, data_file, mode, four_bit, fields):
        if method not in self.fields_of:
            choices = ", ".join(self.methods)
            yield out(status=error_text(f"unknown method {method!r}; choose one of: {choices}"), final=True)
            return None
        # Every field goes to the config, an emptied box too (None): it is refused with the field's range, not
        # replaced by the default. API callers who omit a field get its widget's value from gradio_client.
        values = {field: fields.get(key) for key, field in self.fields_of[method].items()}
        values.update(
            task=(f"jsonl:{data_file}" if data_file else (task or "arith")),
            model=(model or "").strip() or None,
            mode="qlora" if four_bit else (mode or "lora"),
            out=self.runs_dir,
        )
        try:
            served = (f"jsonl:{data_file}",) if data_file else ()
            if self.serving.shared:
                served += tuple(live.reward_models(self.runs_dir))
            self.serving.check(values, served)
            job = live.start(out.state, method, values)
        except Exception as err:  # noqa: BLE001 - a bad setting must never take the app down
            message = live.user_message(err)
            if data_file:
                message = message.replace(str(data_file), Path(data_file).name)
            gr.Warning(message)
            yield out(status=error_text(message), progress=progress_html(None), final=True)
            return None
        yield out(
            status=f"**{method}** on `{short_task(job.cfg.task)}`: loading the model…",
            progress=progress_html(job),
            charts=charts_html({}),
            samples=samples_html([]),
            metrics=[],
            ba_text="",
            ba_table=before_after_frame([]),
            pick=gr.update(choices=[], value=None),
        )
        return job

    def _watch(self, out: LiveOut, job: live.Job):
        """While the run goes: at most one update per UPDATE_EVERY, with only what changed (the progress line
        always, the charts when steps arrived, the samples when a step logged new ones)."""
        method, task = job.method, str(job.cfg.task)
        seen, shown_samples, shown_at, samples_at, status = 0, None, 0.0, 0.0, None
        try:
            while not job.done:
                job.wait(seen, timeout=UPDATE_EVERY)
                if not job.done and time.time() - shown_at < UPDATE_EVERY:
                    time.sleep(UPDATE_EVERY - (time.time() - shown_at))
                shown_at = time.time()
                update = {"progress": progress_html(job)}
                if len(job.history) > seen and time.time() - samples_at >= SAMPLES_EVERY:
                    samples_at = time.time()  # the table is the page's heaviest redraw: every few seconds only
                    rows = job.samples()
                    if rows and rows[0].get("step") != shown_samples:
                        out.state.samples, shown_samples = rows, rows[0].get("step")
                        update["samples"] = samples_html(rows)
                if len(job.history) > seen:
                    seen = len(job.history)
                    update["charts"] = charts_html({method: job.history}, method, task, running=True)
                text = f"**{method}** on `{short_task(task)}`: " + (
                    "stopping after this step…" if job.stop.is_set() else "running" if seen else "loading the model…"
                )
                if text != status:
                    update["status"] = status = text
                yield out(**update)
        finally:
            if not job.done:  # the tab went away or the event was cancelled: end the run cleanly
                job.request_stop()
                job.join(timeout=600)

    def _wrap_up(self, out: LiveOut, job: live.Job):
        """The final charts, samples and metrics; then before/after on held-out prompts."""
        state = out.state
        if job.error:
            gr.Warning(job.error)
            yield out(status=error_text(job.error), progress=progress_html(job), metrics=job.history, final=True)
            return
        live.finish(state)
        rows = job.samples()
        if rows:
            state.samples = rows
        done = (
            f"**{job.method}** on `{short_task(str(job.cfg.task))}`: {job.phase} after {len(job.history)} steps · "
            f"record `{job.record_path}`"
        )
        yield out(
            status=done + " · comparing before and after…",
            progress=progress_html(job),
            charts=charts_html({job.method: job.history}, job.method, str(job.cfg.task)),
            samples=samples_html(rows),
            metrics=job.history,
            pick=sample_choices(state),
        )
        if state.policy is None:
            note = "Before/after compares policies; this method trains a reward model."
            yield out(status=done, ba_text=note, final=True)
            return
        try:
            ba_rows, summary = live.compare(state, n=None)
        except Exception as err:  # noqa: BLE001
            yield out(status=done, ba_text=error_text(live.user_message(err)), final=True)
            return
        live.save_before_after(job.record_path, ba_rows)
        yield out(
            status=done,
            ba_text=before_after_text(summary),
            ba_table=before_after_frame(ba_rows),
            pick=sample_choices(state),
            final=True,
        )

    def on_stop(self, state):
        job = state.job if state is not None else None
        if job is None or job.done:
            return "No run is going in this tab."
        job.request_stop()
        return f"Stopping after the current step (step {len(job.history) + 1})…"

    # --- handlers: after a run ------------------------------------------------------------------------------------

    def on_compare(self, state, n):
        if state is None or state.policy is None:
            return (
                error_text("no trained policy in this tab yet: launch a run first"),
                before_after_frame([]),
                gr.skip(),
            )
        try:
            rows, summary = live.compare(state, n=n)
        except Exception as err:  # noqa: BLE001
            return error_text(live.user_message(err)), before_after_frame([]), gr.skip()
        return before_after_text(summary), before_after_frame(rows), sample_choices(state)

    def on_reliability(self, state, n):
        try:
            bins = live.reliability(state if state is not None else live.Session(), n=n)
        except Exception as err:  # noqa: BLE001
            return error_text(live.user_message(err))
        return reliability_html(bins)

    def on_bon(self, state, task_name, reward, n, prompts):
        state = state if state is not None else live.Session()
        try:
            reward = reward or "gold"
            self.serving.check({"reward": reward}, tuple(live.reward_models(self.runs_dir)))
            rows, summary = live.best_of_n(state, task_name, reward, n, prompts)
        except Exception as err:  # noqa: BLE001
            return error_text(live.user_message(err)), pd.DataFrame(), state
        text = (
            f"Gold reward on {summary['prompts']} held-out prompts: **best of {summary['n']}: "
            f"{summary['best_gold']:.3f}** vs. one sample: {summary['sample_gold']:.3f} · "
            f"KL(π_BoN ‖ π_ref) ≤ {summary['kl_bound']:.3f} nats"
        )
        return text, best_of_n_frame(rows), state

    def on_reward_models(self):
        return gr.update(choices=[("gold", "gold"), *live.reward_model_choices(self.runs_dir)])

    def on_inspect(self, state, run_id, step):
        """One logged step of this tab's run (or of ``run_id``): its completions, token by token."""
        try:
            path = live.inspect_target(self.runs_dir, run_id, state)
            inspected = live.inspect_step(path, step)
        except Exception as err:  # noqa: BLE001
            return None, "", error_text(live.user_message(err))
        return inspected, inspector_html(inspected), "Click a token to see its equation."

    # --- handlers: past runs and experiments ----------------------------------------------------------------------

    def on_refresh(self, selected, method="all", task="all", status="all"):
        rows = live.past_runs(self.runs_dir)
        wanted = {"method": method, "task": task, "status": status}
        rows = [r for r in rows if all(v in (None, "", "all") or short_task(str(r[k])) == v for k, v in wanted.items())]
        ids = {r["id"] for r in rows}
        choices = [(r["label"] + f" [{r['status']}]", r["id"]) for r in rows]
        keep = [s for s in (selected or []) if s in ids]
        return gr.update(choices=choices, value=keep), runs_frame(rows)

    def on_overlay(self, selected):
        """Overlaid curves, the settings that differ and the answers side by side, for the ticked runs."""
        if not selected:
            return charts_html({}, overlay=True), pd.DataFrame(), pd.DataFrame()
        try:
            runs = live.load_runs(self.runs_dir, list(selected))
        except Exception as err:  # noqa: BLE001
            return error_text(live.user_message(err)), pd.DataFrame(), pd.DataFrame()
        histories = {label: run.metrics for label, run in runs.items()}
        bandit = all((run.config or {}).get("task") == "bandit" for run in runs.values())
        method = next((run.method for run in runs.values()), "") or ""
        html_ = charts_html(histories, method, "bandit" if bandit else "", overlay=True)
        diff = live.config_diff(runs) or [{"setting": "(the ticked runs have the same settings)"}]
        return html_, pd.DataFrame(diff), pd.DataFrame(live.answers_side_by_side(runs))

    def on_delete(self, selected, method="all", task="all", status="all"):
        if self.serving.shared and not self.serving.allow_local:
            note = error_text("runs are not deleted on a shared app")
        elif not selected:
            note = "Tick the runs to delete first."
        else:
            try:
                gone = live.delete_runs(self.runs_dir, list(selected))
                note = f"Deleted {len(gone)} run(s): {', '.join(gone)}"
            except Exception as err:  # noqa: BLE001
                note = error_text(live.user_message(err))
        return note, *self.on_refresh(selected, method, task, status)

    def on_resume(self, selected):
        """Put the ticked run's method and id in the Train tab, for Launch to resume it."""
        skip = [gr.skip()] * len(self.controls)
        if not selected or len(selected) != 1:
            return "Tick one stopped or interrupted run to resume.", gr.skip(), *skip
        try:
            method = live.resumable(self.runs_dir, selected[0])
        except Exception as err:  # noqa: BLE001
            return error_text(live.user_message(err)), gr.skip(), *skip
        updates = [
            gr.update(value=selected[0]) if key == param_name(method, "resume") else gr.skip() for key in self.controls
        ]
        return f"Resuming `{selected[0]}`: press **Launch** in the Train tab.", method, *updates

    def on_experiment(self, state, name):
        """Run an experiment's runs one after another in this tab, overlaying them as they go."""
        state = state if state is not None else live.Session()
        experiment = EXPERIMENTS.get(name)
        if experiment is None:
            yield error_text(f"experiment: unknown {name!r}; choose one of: {', '.join(EXPERIMENTS)}"), gr.skip(), state
            return
        done: dict[str, list[dict]] = {}
        first_dir = None
        frontier = "bandit" if experiment.frontier else ""
        for i, spec in enumerate(experiment.runs):
            values = {**resolve(spec, first_dir), "out": self.runs_dir}
            try:
                self.serving.check(values, tuple(live.reward_models(self.runs_dir)))
                job = live.start(state, spec.method, values)
            except Exception as err:  # noqa: BLE001
                yield error_text(live.user_message(err)), gr.skip(), state
                return
            shown_at = 0.0
            while not job.done:
                job.wait(len(job.history), timeout=UPDATE_EVERY)
                if time.time() - shown_at >= UPDATE_EVERY:
                    shown_at = time.time()
                    text = f"run {i + 1} of {len(experiment.runs)}: **{spec.label}**, step {len(job.history)}"
                    yield text, charts_html({**done, spec.label: job.history}, spec.method, frontier, True), state
            if job.error:
                yield error_text(f"{spec.label}: {job.error}"), gr.skip(), state
                return
            first_dir = first_dir or str(job.record_path)
            done[spec.label] = job.history
        text = f"Done: {', '.join(done)}. Past runs lists each one. " + experiment.look_for
        yield text, charts_html(done, experiment.runs[-1].method, frontier, True), state


def build_app(runs_dir: str = "runs", serving: live.Serving | None = None) -> gr.Blocks:
    """The whole UI. ``runs_dir`` is where runs are recorded and where "past runs" looks; ``serving`` says what a
    shared app refuses (default: nothing, the app is on this machine only)."""
    return LabApp(runs_dir, serving).build()


# ----------------------------------------------------------------------------------------------------------------------
# Handlers that need no app state


def on_upload(path):
    if not path:
        return ""
    from lab.data import DataError, load_rows

    try:
        rows = load_rows(f"jsonl:{path}")
    except DataError as err:
        return error_text(str(err).replace(str(path), Path(path).name))
    return f"{len(rows)} rows, format **{rows.format}**: training will use this file instead of the task."


def on_tokens(state, index, colour):
    job = state.job if state is not None else None
    if job is not None and job.method == "rm" and state.policy is None:
        return *empty_token_view()[:2], "A reward-model run samples no completions: the per-token view is for policies."
    row = picked_row(state, index) if state is not None else None
    if row is None:
        return *empty_token_view()[:2], "No samples yet: launch a run first."
    if job is not None and not job.done:
        return *empty_token_view()[:2], "Wait for the run to end (or stop it): the policy is training."
    policy = state.policy or (job.policy if job is not None else None)
    if policy is None:
        return *empty_token_view()[:2], "No policy in this tab (a reward model run has no per-token KL)."
    try:
        tokens = live.token_kl(policy, row["prompt"], row["completion"], add_eos=not row.get("truncated", False))
    except Exception as err:  # noqa: BLE001
        return *empty_token_view()[:2], error_text(live.user_message(err))
    table = pd.DataFrame(tokens, columns=["token", "logprob", "ref_logprob", "kl"]).round(4)
    if colour == "advantage":
        adv = next((row[k] for k in ("advantages", "advantage") if k in row), None)
        if adv is None:
            return [], table, "This method logs no advantage with its samples; colour by KL instead."
        values = adv if isinstance(adv, list) and len(adv) == len(tokens) else [float(_first(adv))] * len(tokens)
        table["advantage"] = values
        note = "Coloured by advantage (red: pushed up, blue: pushed down)."
    else:
        values = [t["kl"] for t in tokens]
        note = f"Σ_t kl_t = log π_θ(y|x) − log π_ref(y|x) = **{sum(values):+.3f}** nats over {len(values)} tokens."
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    return [(t["token"], round(v / scale, 3)) for t, v in zip(tokens, values)], table, note


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def on_token_pick(inspected, evt: gr.EventData):
    """A click on a token of the step inspector: the method's equation with that token's numbers."""
    data = getattr(evt, "_data", None) or {}
    try:
        row, tok = int(data["row"]), int(data["tok"])
        term = inspected["terms"][row][tok]
    except (KeyError, IndexError, TypeError, ValueError):
        return "Click a token of an inspected step."
    return inspector.equation(term, inspected["config"])


def experiment_text(name: str) -> str:
    e = EXPERIMENTS.get(name)
    if e is None:
        return ""
    runs = ", ".join(f"{s.label} ({s.method})" for s in e.runs)
    return f"**{e.title}**: {runs}.  \n*What to look for:* {e.look_for}"


# ----------------------------------------------------------------------------------------------------------------------
# A shared app: one user's launches waiting or running are capped when they are queued


def _client_host(request) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


def user_launches(demo: gr.Blocks, host: str | None, concurrency_id: str = "training") -> int:
    """Launches from ``host`` now waiting in gradio's queue or running (read from the queue itself, so that a
    launch that ended or was cancelled while waiting never counts)."""
    queue = demo._queue
    waiting = getattr(queue.event_queue_per_concurrency_id.get(concurrency_id), "queue", [])
    running = [event for job in queue.active_jobs if job for event in job]
    return sum(
        1
        for event in [*waiting, *running]
        if event.concurrency_id == concurrency_id and _client_host(event.request) == host
    )


def queue_validator(demo: gr.Blocks, serving: live.Serving):
    """A gradio validator for /launch: it runs when a launch is queued, before it waits its turn, and refuses it
    when its user (the client address) already has ``serving.max_queue`` launches waiting or running."""

    def validate(request: gr.Request, state=None, **fields):
        # one verdict per input (the tab's state, then the launch inputs): the refusal shows on "method"
        verdicts = [gr.validate(True, "") for _ in range(1 + len(fields))]
        try:
            live.check_queue(user_launches(demo, _client_host(request)), serving.max_queue)
        except live.NotServed as err:
            verdicts[1] = gr.validate(False, str(err))
        return verdicts

    return validate


WARM_UP: threading.Thread | None = None  # imports the model libraries while the first page loads


def warm_up() -> None:
    """Do the slow first-time work (library imports, the first model call) while the page loads, not after the
    user's first click on Launch."""
    live.warm_up()


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    runs_dir: str = "runs",
    prevent_thread_lock: bool = False,
    warm: bool = True,
    allow_local: bool = False,
    max_steps: int = live.SHARED_MAX_STEPS,
    max_queue: int = live.SHARED_MAX_QUEUE,
    shared: bool | None = None,
):
    """Build and launch the app; returns the Blocks (with ``prevent_thread_lock`` the call returns at once).
    ``warm``: do the first-time work in the background right away (tests turn it off to keep the CPU).
    ``shared`` (default: ``--share`` or a host other than localhost) refuses server paths and code unless
    ``allow_local``, and caps steps per run and each user's queued launches."""
    global WARM_UP
    if warm:
        WARM_UP = threading.Thread(target=warm_up, name="lab-warm-up", daemon=True)
        WARM_UP.start()
    shared = live.is_shared(host, share) if shared is None else shared
    demo = build_app(runs_dir, live.Serving(shared, allow_local, max_steps, max_queue))
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        css=CSS,
        theme=gr.themes.Soft(),
        footer_links=["api"],
        quiet=prevent_thread_lock,
    )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The lab's web app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (Colab)")
    parser.add_argument("--runs", default="runs", help="folder that holds run records")
    parser.add_argument(
        "--allow-local",
        action="store_true",
        help="on a shared app (--share or a host other than localhost) still take server paths, "
        "python: rewards and trust_remote_code: only for users you trust with this machine",
    )
    parser.add_argument(
        "--max-steps", type=int, default=live.SHARED_MAX_STEPS, help="on a shared app, the most steps one run may take"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=live.SHARED_MAX_QUEUE,
        help="on a shared app, the most launches one user may have waiting or running",
    )
    args = parser.parse_args(argv)
    serve(
        args.host,
        args.port,
        args.share,
        args.runs,
        allow_local=args.allow_local,
        max_steps=args.max_steps,
        max_queue=args.max_queue,
    )


if __name__ == "__main__":
    main()
