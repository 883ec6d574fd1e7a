"""The lab in a browser: pick a method and a task, tune it, launch, watch every step, compare before and after.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8000 --host 0.0.0.0
    python app.py --share              # a public gradio.live link (in Colab: !python app.py --share)
    python app.py --share --allow-local  # shared, yet still taking server paths and code: trusted users only

This file is UI only. Every control is built from a method's config dataclass (``lab.config.describe_fields``),
the run itself goes through ``lab.live`` (a trainer generator in a thread, one metrics dict per step), and
the numbers come from ``lab.evaluate`` and ``lab.ops``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import torch  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from lab import live  # noqa: E402
from lab.config import describe_fields  # noqa: E402
from lab.methods import available, get_method  # noqa: E402
from lab.tasks import TASKS  # noqa: E402

# The knobs shown up front for every method that has them; the rest of its fields go in "advanced".
MAIN_FIELDS = (
    "loss_type",
    "reward",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "cliprange",
    "group_size",
    "lr",
    "steps",
    "batch_size",
    "temperature",
    "lora_r",
)
# Chart panels in this order first, then the method's own metrics alphabetically.
PANEL_ORDER = ("reward", "kl", "loss", "entropy", "completion length", "completion", "rewards", "clip", "value", "eval")
SKIP_METRICS = ("step", "time/elapsed")
HAS_CUDA = torch.cuda.is_available()
UPDATE_EVERY = 1.0  # seconds between redraws of the live view; every step still arrives, batched
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#475569")

CSS = """
.lab-progress { height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden; margin: 4px 0; }
.lab-progress > div { height: 100%; background: #2563eb; transition: width 0.3s; }
.lab-progress-text { font-size: 0.9em; color: #4b5563; }
"""


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
# Charts and tables


def panel_of(key: str) -> str:
    """Which chart a metric goes on: its namespace ("kl/ref" → "kl"), except that every gold reward sits with
    the reward and completion lengths (also per-outcome ones such as "length/correct") share one chart."""
    if "gold" in key:
        return "reward"
    if key == "completion/length" or key.startswith("length/"):
        return "completion length"
    return key.split("/", 1)[0]


def _panel_title(panel: str, keys: list[str], overlay: bool) -> str:
    """The chart's title names its lines: in their colour (live) or their dash style (overlay)."""

    def short(key):
        return key.split("/", 1)[1] if "/" in key else key

    if len(keys) == 1 and short(keys[0]) == panel:
        return f"<b>{panel}</b>"
    if overlay:
        names = [f"{short(k)} ({DASHES[j % len(DASHES)]})" if len(keys) > 1 else short(k) for j, k in enumerate(keys)]
    else:
        names = [f"<span style='color:{COLORS[j % len(COLORS)]}'>{short(k)}</span>" for j, k in enumerate(keys)]
    return f"<b>{panel}</b>: " + ", ".join(names)


DASHES = ("solid", "dash", "dot", "dashdot", "longdash")


def metrics_figure(histories: dict[str, list[dict]], *, overlay: bool = False) -> go.Figure:
    """One chart per metric namespace: reward (with the gold reward), kl, loss, entropy, completion length,
    then the method's own (clip fractions, DPO margins, value loss...).

    Live view: one run, one colour per metric (named in the chart's title). Overlay: one colour per run (the
    legend), one dash style per metric.
    """
    keys: dict[str, list[str]] = {}
    for history in histories.values():
        for row in history:
            for key, value in row.items():
                if key in SKIP_METRICS or key.startswith("time/") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) or value is None:
                    panel = keys.setdefault(panel_of(key), [])
                    if key not in panel:
                        panel.append(key)
    panels = sorted(keys, key=lambda p: (PANEL_ORDER.index(p) if p in PANEL_ORDER else len(PANEL_ORDER), p))
    if not panels:
        fig = go.Figure()
        fig.update_layout(
            height=260,
            template="plotly_white",
            margin=dict(l=40, r=20, t=30, b=30),
            annotations=[
                dict(
                    text="charts appear with the first step", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
                )
            ],
        )
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return fig
    cols = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    titles = [_panel_title(p, keys[p], overlay) for p in panels]
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=titles,
        horizontal_spacing=0.06,
        vertical_spacing=min(0.12, 0.35 / rows) if rows > 1 else 0.1,
    )
    in_legend: set[str] = set()
    for i, panel in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        for j, key in enumerate(keys[panel]):
            for k, (label, history) in enumerate(histories.items()):
                points = [(m["step"], m.get(key)) for m in history if key in m]
                if not points:
                    continue
                xs, ys = zip(*points)
                color = COLORS[(k if overlay else j) % len(COLORS)]
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        name=label if overlay else key,
                        mode="lines+markers" if len(xs) < 30 else "lines",
                        line=dict(color=color, dash=DASHES[j % len(DASHES)] if overlay else "solid", width=2),
                        marker=dict(size=4),
                        connectgaps=True,
                        legendgroup=label if overlay else key,
                        showlegend=overlay and label not in in_legend,
                        hovertemplate=f"{key}<br>step %{{x}}: %{{y:.4g}}<extra>{label if overlay else ''}</extra>",
                    ),
                    row=r,
                    col=c,
                )
                in_legend.add(label)
    n_runs = len(histories) if overlay else 0
    fig.update_layout(
        height=max(300, 250 * rows + 22 * n_runs),
        template="plotly_white",
        hovermode="closest",
        margin=dict(l=40, r=20, t=50, b=30 + 22 * n_runs),
        showlegend=overlay,
        legend=dict(orientation="h", yanchor="top", y=-0.25 / rows, x=0, font=dict(size=11)),
    )
    fig.update_annotations(font_size=12)
    last_step = max((m.get("step", 0) for h in histories.values() for m in h), default=0)
    fig.update_xaxes(tickfont=dict(size=10), dtick=1 if last_step <= 8 else None)
    fig.update_yaxes(tickfont=dict(size=10))
    return fig


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


# ----------------------------------------------------------------------------------------------------------------------
# The app


def default_method(methods: list[str]) -> str:
    for name in ("grpo", "sft"):
        if name in methods:
            return name
    return methods[0]


def build_app(runs_dir: str = "runs", serving: live.Serving | None = None) -> gr.Blocks:
    """The whole UI. ``runs_dir`` is where runs are recorded and where "past runs" looks; ``serving`` says what a
    shared app refuses (default: nothing, the app is on this machine only)."""
    serving = serving or live.Serving()
    methods = available()
    if not methods:
        raise RuntimeError("no training method could be imported; check the installation (pip install -e .)")
    first = default_method(methods)
    first_defaults = {f["name"]: f["default"] for f in describe_fields(get_method(first)[0])}

    with gr.Blocks(title="lab: RL on language models") as demo:
        session = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
        gr.Markdown(
            "# lab — reinforcement learning on language models\n"
            "Pick a method and a task, tune it, launch, and watch every step arrive. "
            "Every control is a field of the method's config (hover the info lines for what it does)."
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    # ---------------- settings ----------------
                    with gr.Column(scale=2, min_width=340):
                        method = gr.Dropdown(methods, value=first, label="method", elem_id="method")
                        task = gr.Dropdown(
                            list(TASKS),
                            value=first_defaults.get("task") or "arith",
                            allow_custom_value=True,
                            label="task / data",
                            elem_id="task",
                            info="a built-in task, or jsonl:PATH, a local .jsonl, or hf:ID",
                        )
                        model = gr.Textbox(
                            value="",
                            label="model",
                            elem_id="model",
                            placeholder="empty: the task's built-in model",
                            info="a built-in name, a local folder, or a hub id (needs a network)",
                        )
                        data_file = gr.File(
                            label="or upload a JSONL (prompt / completion / chosen / rejected)",
                            file_types=[".jsonl", ".json"],
                            type="filepath",
                            elem_id="data-file",
                        )
                        data_status = gr.Markdown(elem_id="data-status")
                        with gr.Row():
                            mode = gr.Radio(
                                ["lora", "full"],
                                label="weights",
                                elem_id="mode",
                                value="full" if first_defaults.get("mode") == "full" else "lora",
                                info="lora: train adapters, π_ref = adapters off; full: every weight",
                            )
                            four_bit = gr.Checkbox(
                                value=False,
                                label="4-bit base (QLoRA)",
                                interactive=HAS_CUDA,
                                elem_id="four-bit",
                                info="nf4 base + LoRA adapters"
                                if HAS_CUDA
                                else "needs a CUDA GPU; none found here, so it is off",
                            )
                        panels, controls, fields_of = {}, {}, {}  # fields_of: method → {param name: field}
                        for m in methods:
                            with gr.Column(visible=(m == first)) as col:
                                panels[m] = col
                                fields_of[m] = {}
                                for name, comp in method_panel(m, hide=serving.hidden_fields).items():
                                    controls[param_name(m, name)] = comp
                                    fields_of[m][param_name(m, name)] = name
                        with gr.Row():
                            launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        # Stop answers here, so that it never overwrites the run's final status in the live view
                        stop_note = gr.Markdown(elem_id="stop-note")
                    # ---------------- live view ----------------
                    with gr.Column(scale=5):
                        status = gr.Markdown("Choose settings and press **Launch**.", elem_id="status")
                        progress = gr.HTML(progress_html(None), elem_id="progress")
                        plot = gr.Plot(metrics_figure({}), label="metrics, one point per step", elem_id="plot")
                        samples = gr.Dataframe(
                            samples_frame([]),
                            label="latest samples",
                            wrap=True,
                            interactive=False,
                            elem_id="samples",
                            max_height=360,
                        )
                        with gr.Accordion("raw metrics (every step)", open=False):
                            metrics_json = gr.JSON(label="metrics", elem_id="metrics")
                gr.Markdown(
                    "## Before and after\nThe same held-out prompts, answered greedily by the reference "
                    "policy (π_ref: the adapters switched off) and by the tuned policy."
                )
                with gr.Row():
                    n_compare = gr.Number(
                        8,
                        label="held-out prompts",
                        scale=3,
                        elem_id="n-compare",
                        info="at most the task's held-out set (arith 200, reviews 10, bandit 6)",
                    )
                    compare_btn = gr.Button("Compare again", scale=1, elem_id="compare")
                ba_text = gr.Markdown(elem_id="before-after-summary")
                ba_table = gr.Dataframe(before_after_frame([]), wrap=True, interactive=False, elem_id="before-after")
                if live.has_best_of_n():
                    from lab.baselines import BestOfNConfig

                    bon_fields = {f["name"]: f for f in describe_fields(BestOfNConfig)}
                    with gr.Accordion("Best-of-N from π_ref (no training)", open=False):
                        gr.Markdown(
                            "Sample N completions per held-out prompt from the reference policy and keep "
                            "the one the reward scores highest: y = argmax_i r(x, y_i). Its KL to π_ref is "
                            "at most log N − (N − 1)/N."
                        )
                        with gr.Row():
                            bon_reward = gr.Dropdown(
                                ["gold"],
                                value="gold",
                                allow_custom_value=True,
                                label="reward",
                                info="gold (the task's own) or a reward model trained here, "
                                "with the task it was trained on",
                                elem_id="bon-reward",
                            )
                            bon_n = gr.Number(
                                bon_fields["n"]["default"], label="N", elem_id="bon-n", info=bon_fields["n"]["help"]
                            )
                            bon_prompts = gr.Number(
                                6,
                                label="held-out prompts",
                                elem_id="bon-prompts",
                                info="at most the task's held-out set",
                            )
                            bon_btn = gr.Button("Run best-of-N", elem_id="bon")
                        bon_text = gr.Markdown()
                        bon_table = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=300)
                else:
                    bon_btn = None
                gr.Markdown(
                    "## Per token\nEach completion token coloured by its KL term "
                    "log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t): red where the tuned policy is more "
                    "sure of the token than the reference, blue where less. The sum is the sequence's "
                    "log-ratio, the single-sample KL estimate."
                )
                with gr.Row():
                    sample_pick = gr.Dropdown(
                        [],
                        label="completion (latest training samples, then held-out answers)",
                        scale=3,
                        allow_custom_value=True,
                        elem_id="sample-pick",
                    )
                    colour_by = gr.Radio(
                        ["KL to reference", "advantage"], value="KL to reference", label="colour by", scale=2
                    )
                    tokens_btn = gr.Button("Show tokens", scale=1, elem_id="show-tokens")
                token_text = gr.HighlightedText(
                    label="completion tokens", elem_id="tokens", show_legend=False, show_inline_category=False
                )
                token_sum = gr.Markdown()
                token_table = gr.Dataframe(empty_token_view()[1], interactive=False, max_height=260)

            with gr.Tab("Past runs", id="runs"):
                gr.Markdown(
                    f"Runs recorded in `{runs_dir}/`. Tick several to overlay their curves "
                    "(for example β = 0 next to β = 0.1)."
                )
                with gr.Row():
                    refresh_btn = gr.Button("Refresh", scale=1, elem_id="refresh-runs")
                    run_pick = gr.CheckboxGroup([], label="runs", scale=5, elem_id="run-pick")
                overlay = gr.Plot(metrics_figure({}), label="overlay", elem_id="overlay")
                runs_table = gr.Dataframe(
                    pd.DataFrame(), interactive=False, label="all runs", wrap=True, elem_id="runs-table"
                )

        # ------------------------------------------------------------------------------------------------------------
        # Handlers

        def on_method(name):
            """Show the method's panel; the task and weights follow the method's own defaults."""
            cls, _ = get_method(name)
            defaults = {f["name"]: f["default"] for f in describe_fields(cls)}
            return [gr.update(visible=(m == name)) for m in methods] + [
                gr.update(value=defaults.get("task") or "arith"),
                gr.update(value="full" if defaults.get("mode") == "full" else "lora"),
            ]

        method.change(on_method, inputs=method, outputs=[*panels.values(), task, mode], api_name=False, queue=False)

        def on_upload(path):
            if not path:
                return ""
            from lab.data import DataError, load_rows

            try:
                rows = load_rows(f"jsonl:{path}")
            except DataError as err:
                return error_text(str(err).replace(str(path), Path(path).name))
            return f"{len(rows)} rows, format **{rows.format}**: training will use this file instead of the task."

        data_file.change(on_upload, inputs=data_file, outputs=data_status, api_name="check_data")

        def on_launch(state, method=None, task=None, model=None, data_file=None, mode=None, four_bit=None, **fields):
            """Generator: yields the whole live view once at the start, then once per step, then the
            before/after comparison. Outputs: status, progress, plot, samples, metrics, before/after summary,
            before/after table, sample picker, state."""
            state = state if state is not None else live.Session()
            skip = gr.skip()
            shown = [skip] * 8  # what each output holds now, so the last update can repeat it for API callers

            def out(
                status_=skip,
                progress_=skip,
                plot_=skip,
                samples_=skip,
                metrics_=skip,
                ba_text_=skip,
                ba_table_=skip,
                pick_=skip,
                final=False,
            ):
                values = [status_, progress_, plot_, samples_, metrics_, ba_text_, ba_table_, pick_]
                for i, value in enumerate(values):
                    if value is not skip:
                        shown[i] = value
                return (*(shown if final else values), state)

            method = method or first
            if method not in fields_of:
                yield out(error_text(f"unknown method {method!r}; choose one of: {', '.join(methods)}"), final=True)
                return
            # Every field goes to the config, an emptied box too (None): it is refused with the field's range, not
            # replaced by the default. API callers who omit a field get its widget's value from gradio_client.
            values = {field: fields.get(key) for key, field in fields_of[method].items()}
            values.update(
                task=(f"jsonl:{data_file}" if data_file else (task or "arith")),
                model=(model or "").strip() or None,
                mode="qlora" if four_bit else (mode or "lora"),
                out=runs_dir,
            )
            try:
                served = (f"jsonl:{data_file}",) if data_file else ()
                serving.check(values, served + tuple(live.reward_models(runs_dir)) if serving.shared else served)
                job = live.start(state, method, values)
            except Exception as err:  # noqa: BLE001 - a bad setting must never take the app down
                message = live.user_message(err)
                if data_file:
                    message = message.replace(str(data_file), Path(data_file).name)
                gr.Warning(message)
                yield out(error_text(message), progress_html(None), final=True)
                return
            yield out(
                f"**{method}** on `{job.cfg.task}`: loading the model…",
                progress_html(job),
                metrics_figure({}),
                samples_frame([]),
                [],
                "",
                before_after_frame([]),
                gr.update(choices=[], value=None),
            )
            seen, shown_samples, shown_at = 0, None, 0.0
            try:
                while True:
                    job.wait(seen, timeout=1.0)
                    if len(job.history) > seen and not job.done and time.time() - shown_at < UPDATE_EVERY:
                        # fast steps: redraw at most once per UPDATE_EVERY, with every step since the last one
                        time.sleep(UPDATE_EVERY - (time.time() - shown_at))
                    if len(job.history) > seen:
                        shown_at = time.time()
                        seen = len(job.history)
                        rows = job.samples()
                        new_samples = rows and (shown_samples is None or rows[0].get("step") != shown_samples)
                        if new_samples:
                            state.samples = rows
                            shown_samples = rows[0].get("step")
                        yield out(
                            f"**{method}** on `{job.cfg.task}`: running"
                            + (" · stopping after this step" if job.stop.is_set() else ""),
                            progress_html(job),
                            metrics_figure({method: job.history}),
                            samples_frame(rows) if new_samples else skip,
                            job.history,
                            pick_=sample_choices(state) if new_samples else skip,
                        )
                    elif not job.done:
                        yield out(progress_=progress_html(job))
                    if job.done:
                        break
            finally:
                if not job.done:  # the tab went away or the event was cancelled: end the run cleanly
                    job.request_stop()
                    job.join(timeout=600)
            if job.error:
                gr.Warning(job.error)
                yield out(error_text(job.error), progress_html(job), metrics_=job.history, final=True)
                return
            live.finish(state)
            rows = job.samples()
            if rows:
                state.samples = rows
            done = (
                f"**{method}** on `{job.cfg.task}`: {job.phase} after {len(job.history)} steps · record "
                f"`{job.record_path}`"
            )
            yield out(
                done + " · comparing before and after…",
                progress_html(job),
                metrics_figure({method: job.history}),
                samples_frame(rows),
                job.history,
                pick_=sample_choices(state),
            )
            if state.policy is None:
                yield out(
                    done, ba_text_="Before/after compares policies; this method trains a reward model.", final=True
                )
                return
            try:
                ba_rows, summary = live.compare(state, n=None)
            except Exception as err:  # noqa: BLE001
                yield out(done, ba_text_=error_text(live.user_message(err)), final=True)
                return
            yield out(
                done,
                ba_text_=before_after_text(summary),
                ba_table_=before_after_frame(ba_rows),
                pick_=sample_choices(state),
                final=True,
            )

        launch_inputs = {
            "method": method,
            "task": task,
            "model": model,
            "data_file": data_file,
            "mode": mode,
            "four_bit": four_bit,
            **controls,
        }
        # Every input is optional for API callers: an omitted one keeps its widget's default.
        on_launch.__signature__ = inspect.Signature(
            [inspect.Parameter("state", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in launch_inputs]
        )
        launch_outputs = [status, progress, plot, samples, metrics_json, ba_text, ba_table, sample_pick, session]
        launch_btn.click(
            on_launch,
            inputs=[session],
            inputs_kwargs=launch_inputs,
            outputs=launch_outputs,
            api_name="launch",
            concurrency_limit=1,
            concurrency_id="training",
            show_progress="full",
            show_progress_on=[status, progress],
            validator=queue_validator(demo, on_launch.__signature__, serving) if serving.shared else None,
        )
        launch_btn.click(lambda: "", outputs=stop_note, api_name=False, queue=False)  # a new run: no stale note

        def on_stop(state):
            job = state.job if state is not None else None
            if job is None or job.done:
                return "No run is going in this tab."
            job.request_stop()
            return "Stopping after the current step…"

        stop_btn.click(
            on_stop, inputs=session, outputs=stop_note, api_name="stop", concurrency_limit=None, show_progress="hidden"
        )

        def on_compare(state, n):
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

        compare_btn.click(
            on_compare, inputs=[session, n_compare], outputs=[ba_text, ba_table, sample_pick], api_name="before_after"
        )

        def on_tokens(state, index, colour):
            row = picked_row(state, index) if state is not None else None
            if row is None:
                return *empty_token_view()[:2], "No samples yet: launch a run first."
            if state.policy is None and (state.job is None or state.job.policy is None):
                return *empty_token_view()[:2], "No policy in this tab (a reward model run has no per-token KL)."
            if state.job is not None and not state.job.done:
                return *empty_token_view()[:2], "Wait for the run to end (or stop it): the policy is training."
            policy = state.policy or state.job.policy
            try:
                tokens = live.token_kl(
                    policy, row["prompt"], row["completion"], add_eos=not row.get("truncated", False)
                )
            except Exception as err:  # noqa: BLE001
                return *empty_token_view()[:2], error_text(live.user_message(err))
            table = pd.DataFrame(tokens, columns=["token", "logprob", "ref_logprob", "kl"]).round(4)
            if colour == "advantage":
                adv = next((row[k] for k in row if "advantage" in k), None)
                if adv is None:
                    return [], table, "This method logs no advantage with its samples; colour by KL instead."
                values = (
                    adv
                    if isinstance(adv, list) and len(adv) == len(tokens)
                    else [float(adv if not isinstance(adv, list) else adv[0])] * len(tokens)
                )
                table["advantage"] = values
                note = "Coloured by advantage (red: pushed up, blue: pushed down)."
            else:
                values = [t["kl"] for t in tokens]
                total = sum(values)
                note = f"Σ_t kl_t = log π_θ(y|x) − log π_ref(y|x) = **{total:+.3f}** nats over {len(values)} tokens."
            scale = max((abs(v) for v in values), default=0.0) or 1.0
            spans = [(t["token"], round(v / scale, 3)) for t, v in zip(tokens, values)]
            return spans, table, note

        tokens_btn.click(
            on_tokens,
            inputs=[session, sample_pick, colour_by],
            outputs=[token_text, token_table, token_sum],
            api_name="tokens",
        )

        if bon_btn is not None:

            def on_bon(state, task_name, reward, n, prompts):
                state = state if state is not None else live.Session()
                try:
                    reward = reward or "gold"
                    serving.check({"reward": reward}, tuple(live.reward_models(runs_dir)))
                    rows, summary = live.best_of_n(state, task_name, reward, n, prompts)
                except Exception as err:  # noqa: BLE001
                    return error_text(live.user_message(err)), pd.DataFrame(), state
                text = (
                    f"Gold reward on {summary['prompts']} held-out prompts: **best of {summary['n']}: "
                    f"{summary['best_gold']:.3f}** vs. one sample: {summary['sample_gold']:.3f} · "
                    f"KL(π_BoN ‖ π_ref) ≤ {summary['kl_bound']:.3f} nats"
                )
                table = pd.DataFrame(
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
                return text, table, state

            bon_btn.click(
                on_bon,
                inputs=[session, task, bon_reward, bon_n, bon_prompts],
                outputs=[bon_text, bon_table, session],
                api_name="best_of_n",
            )

            def on_reward_models():
                return gr.update(choices=[("gold", "gold"), *live.reward_model_choices(runs_dir)])

            demo.load(on_reward_models, outputs=bon_reward, api_name=False)

        def on_refresh(selected):
            rows = live.past_runs(runs_dir)
            ids = {r["id"] for r in rows}
            choices = [(r["label"] + f" [{r['status']}]", r["id"]) for r in rows]
            keep = [s for s in (selected or []) if s in ids]
            table = pd.DataFrame(rows).drop(columns=["label"], errors="ignore").dropna(axis=1, how="all")
            if "started" in table:
                table["started"] = table["started"].astype(str).str[:16].str.replace("T", " ")
            return gr.update(choices=choices, value=keep), table

        refresh_btn.click(on_refresh, inputs=run_pick, outputs=[run_pick, runs_table], api_name="runs")

        def on_overlay(selected):
            if not selected:
                return metrics_figure({})
            return metrics_figure(live.load_histories(runs_dir, list(selected)), overlay=True)

        run_pick.change(on_overlay, inputs=run_pick, outputs=overlay, api_name="overlay")
        demo.load(on_refresh, inputs=run_pick, outputs=[run_pick, runs_table], api_name=False)
    return demo


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


def queue_validator(demo: gr.Blocks, signature: inspect.Signature, serving: live.Serving):
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

    request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
    validate.__signature__ = signature.replace(parameters=[request, *signature.parameters.values()])
    return validate


WARM_UP: threading.Thread | None = None  # imports the model libraries while the first page loads


def warm_up() -> None:
    """Do the slow first-time work (library imports, the first model call, plotly's first subplot figure) while
    the page loads, not after the user's first click on Launch."""
    live.warm_up()
    metrics_figure({"warm-up": [{"step": 1, "reward/mean": 0.0, "loss/policy": 0.0}]}).to_json()


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
