from __future__ import annotations

import csv
import io
import math
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from matplotlib.text import Text
from step_keeper import KeepSteps

from trustregion.batching import BatchSettings
from trustregion.callbacks import DriftMonitor, DriftPlots, TrustRegionController
from trustregion.cli import main
from trustregion.interface import StepOutput
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW
from trustregion.plots import (
    DRIFT_PANELS,
    TOKEN_SAMPLE_COLUMNS,
    drift_figure,
    drift_panel_keys,
    find_metrics_csv,
    join_versions,
    load_metrics,
    load_run_metrics,
    load_run_strategy,
    load_token_samples,
    logged_widths,
    monitors_figure,
    plot_drift_panel,
    plot_monitors,
    plot_reward,
    plot_weight_vs_shift,
    render_run,
    reward_figure,
    run_metrics_csvs,
    strategy_label,
    version_history,
    weight_chart_title,
    weight_vs_shift_figure,
)
from trustregion.rollout import SamplingSettings
from trustregion.strategies import DRPO, METRIC_PREFIX, SHARED_METRICS, DivergenceMask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A Lightning-style metrics.csv: one row per step, some cells empty, a NaN-only column and
# only a subset of the keys a run can log.
METRICS_CSV = """\
epoch,reward/mean,reward/std,step,trust_region/outside_frac,drift/behavior/kl_k3,response/length_mean
0,0.25,0.5,0,0.0,nan,3.0
0,,0.4,1,0.125,nan,
0,0.5,,2,0.25,nan,3.5
"""


def _write_run(root: Path, version: int, rows: int = 40) -> Path:
    """A run directory laid out like the quickstart's, with a longer generated metrics.csv."""
    directory = root / "csv" / f"version_{version}"
    directory.mkdir(parents=True)
    keys = ["reward/mean", "reward/std", "reward/frac_zero_std", "trust_region/outside_frac",
            "trust_region/zero_weight_frac", "drift/behavior/kl_k1", "drift/behavior/kl_k3",
            "drift/behavior/ratio_max", "train/grad_norm"]
    with open(directory / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", *keys])
        for step in range(rows):
            values = [0.2 + 0.01 * step, 0.3, 0.5 - 0.01 * step, 0.02 * math.sin(step) ** 2,
                      0.0, 0.001 * math.cos(step), 0.002 + 0.001 * step, 1.5 + 0.1 * step, 2.0]
            cells = ["" if (step + i) % 7 == 0 else f"{v:.6g}" for i, v in enumerate(values)]
            writer.writerow([0, step, *cells])
    return directory


def _check_png(path: Path, size: tuple[int, int] | None = None) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # a drawn chart, not an empty canvas
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    if size is not None:
        assert image.shape[:2] == size  # (height, width) in pixels at dpi 120
    assert image[..., :3].std() > 0.05  # something is drawn


# ------------------------------------------------------------------------------ reading
def test_load_metrics_reads_exact_values_and_skips_empty_cells(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    metrics = load_metrics(path)
    assert set(metrics) == {"reward/mean", "reward/std", "trust_region/outside_frac",
                            "drift/behavior/kl_k3", "response/length_mean"}
    assert metrics["reward/mean"] == [(0, 0.25), (2, 0.5)]
    assert metrics["reward/std"] == [(0, 0.5), (1, 0.4)]
    assert metrics["trust_region/outside_frac"] == [(0, 0.0), (1, 0.125), (2, 0.25)]
    assert metrics["response/length_mean"] == [(0, 3.0), (2, 3.5)]
    assert all(math.isnan(v) for _, v in metrics["drift/behavior/kl_k3"])


def test_load_metrics_needs_a_step_column(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,reward/mean\n0,1.0\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        load_metrics(path)


def test_find_metrics_csv_picks_the_latest_version(tmp_path) -> None:
    _write_run(tmp_path, 0)
    latest = _write_run(tmp_path, 10)
    _write_run(tmp_path, 2)
    assert find_metrics_csv(tmp_path) == latest / "metrics.csv"
    assert find_metrics_csv(latest) == latest / "metrics.csv"
    assert find_metrics_csv(latest / "metrics.csv") == latest / "metrics.csv"


def test_find_metrics_csv_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        find_metrics_csv(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.csv under"):
        find_metrics_csv(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        render_run(tmp_path / "missing")


# The label lists every hyperparameter the rebuilt strategy has, as DriftPlots' live title does.
DRPO_LABEL = "DRPO(delta=0.1, anchor=behavior)"
CLIP_LABEL = "RatioClip(epsilon=0.1, anchor=behavior)"
CLIP = "trustregion.strategies.ratio_clip.RatioClip"


@pytest.mark.parametrize(("name", "text", "label"), [
    ("config.yaml", "model:\n  trust_region: {name: drpo, delta: 0.1, delta_low: null}\n",
     DRPO_LABEL),
    ("config.yaml", f"model:\n  trust_region:\n    class_path: {CLIP}\n"
                    "    init_args: {epsilon: 0.1}\n", CLIP_LABEL),
    ("hparams.yaml", f"trust_region:\n  class_path: {CLIP}\n  init_args: {{epsilon: 0.1}}\n",
     CLIP_LABEL),
    ("hparams.yaml", "trust_region: {name: drpo, delta: 0.1}\n", DRPO_LABEL),
    ("hparams.yaml", "trust_region: ratio_clip\n", "RatioClip(epsilon=0.2, anchor=behavior)"),
])
def test_the_weight_chart_names_the_strategy_from_the_run_files(tmp_path, name, text,
                                                                label) -> None:
    assert load_run_strategy(tmp_path) is None
    (tmp_path / name).write_text(text)
    strategy = load_run_strategy(tmp_path)
    assert strategy is not None
    assert strategy_label(type(strategy).__name__, strategy.hparams()) == label
    assert weight_chart_title(strategy) == f"{label}: gradient weight against probability shift"
    assert weight_chart_title(None) == ""


def test_the_module_hparams_name_the_strategy_before_the_cli_config(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("model:\n  trust_region: {name: drpo, delta: 0.1}\n")
    (tmp_path / "hparams.yaml").write_text(f"trust_region: {{class_path: {CLIP}}}\n")
    assert type(load_run_strategy(tmp_path)).__name__ == "RatioClip"
    # files that name no strategy are passed over
    (tmp_path / "hparams.yaml").write_text("lr: 0.001\n")
    assert type(load_run_strategy(tmp_path)).__name__ == "DRPO"
    (tmp_path / "config.yaml").write_text("trainer: {max_steps: 1}\n")
    assert load_run_strategy(tmp_path) is None


@pytest.mark.parametrize(("text", "reason"), [
    ("trust_region: {class_path: my.pkg.MyClip, init_args: {epsilon: 0.2}}\n",
     "cannot import class_path 'my.pkg.MyClip'"),
    ("trust_region: {name: drpo, delta: -1.0}\n", "delta"),
    ("trust_region: {name: no_such_strategy}\n", "no_such_strategy"),
])
def test_a_strategy_that_cannot_be_rebuilt_is_reported(tmp_path, text, reason) -> None:
    (tmp_path / "hparams.yaml").write_text(text)
    with pytest.warns(UserWarning, match=r"cannot rebuild the strategy named in .*hparams\.yaml"
                      ) as caught:
        assert load_run_strategy(tmp_path) is None
    assert reason in str(caught[0].message)


def test_invalid_yaml_is_an_error(tmp_path) -> None:
    (tmp_path / "hparams.yaml").write_text("trust_region: [unclosed\n")
    with pytest.raises(ValueError, match=r"hparams\.yaml is not valid YAML"):
        load_run_strategy(tmp_path)


def test_strategy_label_leaves_out_unset_settings() -> None:
    assert strategy_label("DRPO", {"delta": 0.15, "delta_low": None, "anchor": "behavior"}) \
        == "DRPO(delta=0.15, anchor=behavior)"


# ------------------------------------------------------------------------------ drawing
def test_render_run_on_a_hand_written_csv(tmp_path) -> None:
    version = _write_run(tmp_path, 0)
    paths = render_run(tmp_path)
    plots = version / "plots"
    assert paths == [plots / "reward.png", plots / "drift.png"]  # no token samples
    _check_png(plots / "reward.png", size=(720, 1020))  # 8.5 × 6 in with the second panel
    _check_png(plots / "drift.png")


def test_render_run_with_missing_cells_and_few_columns(tmp_path) -> None:
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    paths = render_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "drift.png"]
    _check_png(tmp_path / "plots" / "reward.png", size=(504, 1020))  # no frac_zero_std panel
    _check_png(tmp_path / "plots" / "drift.png")


def test_charts_without_data_are_skipped(tmp_path) -> None:
    assert plot_reward({}, tmp_path / "a.png") is None
    assert plot_reward({"reward/mean": [(0, float("nan"))]}, tmp_path / "b.png") is None
    assert plot_drift_panel({"drift/behavior/kl_k3": [(0, float("nan")), (1, float("inf"))],
                             "unknown/key": [(0, 1.0)]}, tmp_path / "c.png") is None
    assert plot_weight_vs_shift({"delta": [0.1], "weight": [1.0], "adv_sign": [0.0]},
                                tmp_path / "d.png") is None
    assert not list(tmp_path.iterdir())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,foo\n0,\n1,\n")
    assert render_run(tmp_path / "run") == []


def test_each_drift_panel_line_reads_one_logged_key() -> None:
    keys = drift_panel_keys()
    assert len(keys) == len(set(keys))  # no statistic drawn twice
    monitor = set(DriftMonitor.metric_names(["behavior", "ref"]))
    for key in keys:
        if key.startswith(METRIC_PREFIX):
            assert key[len(METRIC_PREFIX):] in SHARED_METRICS, key
        elif key.startswith(("drift/", "region/")):
            assert key in monitor, key
    # The out-of-region fraction and its split by the sign of Â are the strategy's own metric,
    # which every run logs; only the split by μ comes from DriftMonitor.
    outside = [key for key in keys if "outside_frac" in key]
    assert outside == [METRIC_PREFIX + "outside_frac", METRIC_PREFIX + "outside_frac_pos_adv",
                       METRIC_PREFIX + "outside_frac_neg_adv",
                       *(f"region/outside_frac_nu_{b}" for b in ("0_0.01", "0.01_0.1",
                                                                 "0.1_0.5", "0.5_1"))]
    titles = [panel.title for panel in DRIFT_PANELS]
    assert titles.index("Trust region: tokens affected") < titles.index(
        "Outside the region, by μ")


def test_the_drift_panel_draws_the_strategy_outside_fraction_only(tmp_path) -> None:
    # DriftMonitor's windowed region/outside_frac is not what the panel draws: alone it draws
    # nothing; the strategy's trust_region/outside_frac draws the panel.
    windowed = {"region/outside_frac": [(0, 0.1), (1, 0.2)]}
    assert plot_drift_panel(windowed, tmp_path / "a.png") is None
    strategy = {"trust_region/outside_frac": [(0, 0.1), (1, 0.2)]}
    _check_png(plot_drift_panel(strategy, tmp_path / "b.png"))


@pytest.mark.parametrize("tokens", [60, 5000])  # a scatter, then a 2-D histogram
def test_weight_vs_shift(tmp_path, tokens) -> None:
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.05, tokens).clip(-1, 1)
    sign = rng.choice([-1.0, 0.0, 1.0], tokens)
    weight = np.where(sign * delta > 0.1, 0.0, 1.0)  # ratio-clip-like: 0 beyond the region
    path = plot_weight_vs_shift({"delta": delta, "weight": weight, "adv_sign": sign},
                                tmp_path / "w.png", title="Clip(ε=0.1)")
    assert path == tmp_path / "w.png"
    _check_png(path, size=(600, 1320))  # 11 × 5 in
    with pytest.raises(ValueError, match="differ in length"):
        plot_weight_vs_shift({"delta": delta, "weight": weight[:-1], "adv_sign": sign},
                             tmp_path / "x.png")


# --------------------------------------------------------------------------- reservoir
def _rows(start: int, count: int) -> dict[str, torch.Tensor]:
    index = torch.arange(start, start + count, dtype=torch.float64)
    return {"step": index, "delta": index, "weight": -index, "adv_sign": torch.ones(count),
            "mu": torch.full((count,), 0.5)}


def test_reservoir_is_bounded_uniform_and_resumable() -> None:
    plots = DriftPlots(max_tokens=500, seed=3)
    for start in range(0, 10_000, 400):
        plots.add_tokens(_rows(start, 400))
    kept = plots.sample["delta"]
    assert len(kept) == 500 and plots.tokens_seen == 10_000
    assert len(set(kept.tolist())) == 500  # no token twice
    assert torch.equal(plots.sample["weight"], -kept)  # rows stay together
    # uniform over 0..9999: mean ≈ 5000 ± 2887/√500 ≈ ± 129
    assert abs(kept.mean().item() - 4999.5) < 4 * 129
    assert (kept < 5000).float().mean().item() == pytest.approx(0.5, abs=0.1)

    # stopping, saving and resuming continues exactly as an uninterrupted run
    full, first = DriftPlots(max_tokens=50, seed=1), DriftPlots(max_tokens=50, seed=1)
    for plots in (full, first):
        plots.add_tokens(_rows(0, 120))
    resumed = DriftPlots(max_tokens=50, seed=99)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as in a checkpoint, loadable with weights_only
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for plots in (full, resumed):
        plots.add_tokens(_rows(120, 300))
    assert all(torch.equal(full.sample[k], resumed.sample[k]) for k in TOKEN_SAMPLE_COLUMNS)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "max_tokens must be an integer ≥ 1"),
    ({"every_n_steps": 0}, "every_n_steps must be None or an integer ≥ 1"),
])
def test_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DriftPlots(**kwargs)


# ----------------------------------------------------------------------------- a real run
SMALL = {"batching": BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4,
                                   micro_batch_size=2),
         "sampling": SamplingSettings(max_new_tokens=5)}




def _fit(random_model_dir: Path, steps: int, callbacks: list, **trainer) -> TrustRegionModule:
    torch.manual_seed(0)
    module = TrustRegionModule(policy=f"config:{random_model_dir}", task=DigitRichArithmetic(),
                               optimizer=partial(AdamW, lr=1e-2), **SMALL)
    L.Trainer(max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, log_every_n_steps=1, callbacks=callbacks,
              **trainer).fit(module)
    return module


@pytest.fixture(scope="module")
def real_run(random_model_dir, tmp_path_factory) -> tuple[Path, list[StepOutput]]:
    """Three rollout batches (two optimiser steps each) with DriftPlots and a CSV logger."""
    root = tmp_path_factory.mktemp("real-run")
    keep = KeepSteps()
    _fit(random_model_dir, 6, [DriftPlots(), keep],
         logger=CSVLogger(root, name="csv", version=0))
    return root, keep.steps


def test_drift_plots_writes_charts_and_token_samples(real_run) -> None:
    root, outputs = real_run
    plots = root / "csv" / "version_0" / "plots"
    for name in ("reward.png", "drift.png", "weight_vs_shift.png"):
        _check_png(plots / name)
    with open(plots / "token_samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == TOKEN_SAMPLE_COLUMNS

    # fewer tokens than the reservoir holds: the file has every masked token of every update
    expected = DriftPlots.token_rows([r for out in outputs for r in out.updates], step=0)
    n_tokens = sum(int(r.batch.bool_mask().sum()) for out in outputs for r in out.updates)
    assert len(rows) == n_tokens == len(expected["delta"])
    assert sorted({int(row["step"]) for row in rows}) == [0, 1, 2]

    samples = load_token_samples(plots / "token_samples.csv")
    assert np.all(np.abs(samples["delta"]) <= 1)
    assert set(samples["adv_sign"].tolist()) <= {-1.0, 0.0, 1.0}
    assert np.all((samples["mu"] > 0) & (samples["mu"] <= 1))
    # Δ = π − μ and the strategy's weight, token by token (the file is ordered by step, and
    # within a step by update, as the records are)
    pi, mu, weight = [], [], []
    for out in outputs:
        for record in out.updates:
            mask = record.batch.bool_mask()
            pi.append(record.batch.logp[mask].double().exp())
            mu.append(record.batch.behavior_logp[mask].double().exp())
            weight.append(record.output.weight[mask].double())
    np.testing.assert_allclose(samples["delta"], (torch.cat(pi) - torch.cat(mu)).numpy(),
                               atol=1e-7)
    np.testing.assert_allclose(samples["mu"], torch.cat(mu).numpy(), rtol=1e-7)
    np.testing.assert_allclose(samples["weight"], torch.cat(weight).numpy(), rtol=1e-7,
                               atol=1e-7)


def test_plot_command_renders_a_real_run(real_run, capsys) -> None:
    root, _ = real_run
    main(["plot", str(root)])
    printed = capsys.readouterr().out.split()
    plots = root / "csv" / "version_0" / "plots"
    assert printed == [str(plots / name)
                       for name in ("reward.png", "drift.png", "weight_vs_shift.png")]
    assert (plots / "weight_vs_shift.png").stat().st_size > 10_000
    # the title's strategy comes from the hparams.yaml the run's logger wrote
    strategy = load_run_strategy(plots.parent)
    assert isinstance(strategy, DRPO) and strategy.hparams() == DRPO().hparams()


def test_drift_plots_without_a_logger(random_model_dir, tmp_path) -> None:
    plots = DriftPlots(max_tokens=7, every_n_steps=1)
    _fit(random_model_dir, 2, [plots], logger=False, default_root_dir=tmp_path)
    out = tmp_path / "plots"
    assert sorted(p.name for p in out.iterdir()) == [
        "drift.png", "reward.png", "token_samples.csv", "weight_vs_shift.png"]
    assert len(load_token_samples(out / "token_samples.csv")["delta"]) == 7
    assert plots.iterations == 1 and [step for step, _ in plots.history] == [0]
    state = plots.state_dict()
    assert state["iterations"] == 1 and len(state["sample"]["delta"]) == 7


# ----------------------------------------------------------------- a run across versions
def _write_version(root: Path, version: int, rows: dict[int, dict[str, float]]) -> Path:
    """``root/csv/version_<N>/metrics.csv`` with the given ``{step: {key: value}}`` rows."""
    directory = root / "csv" / f"version_{version}"
    directory.mkdir(parents=True)
    keys = sorted({key for row in rows.values() for key in row})
    with open(directory / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", *keys])
        for step, row in rows.items():
            writer.writerow([0, step, *(row.get(key, "") for key in keys)])
    return directory


def test_join_versions_lets_each_version_supersede_from_its_first_step() -> None:
    first = {"a": [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)], "b": [(3, 7.0)]}
    resumed = {"a": [(2, 5.0), (3, 5.0), (4, 5.0)]}  # resumed from the step-2 checkpoint
    empty: dict[str, list[tuple[int, float]]] = {}  # crashed before logging anything
    # steps 0-1 from the first version; 2-4 from the resumed one; b's step 3 was abandoned
    assert join_versions([first, resumed, empty]) == {
        "a": [(0, 1.0), (1, 1.0), (2, 5.0), (3, 5.0), (4, 5.0)]}
    # a resume from the last checkpoint continues after the last step: nothing is dropped
    later = {"a": [(4, 2.0), (5, 2.0)]}
    assert join_versions([first, later])["a"] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0),
                                                  (4, 2.0), (5, 2.0)]
    # a fresh run in the same directory starts at step 0 and replaces everything
    assert join_versions([first, resumed, {"a": [(0, 9.0)]}]) == {"a": [(0, 9.0)]}


def test_a_resumed_run_is_read_and_drawn_whole(tmp_path, monkeypatch) -> None:
    _write_version(tmp_path, 0, {s: {"reward/mean": 0.1} for s in range(8)})
    _write_version(tmp_path, 1, {s: {"reward/mean": 0.5} for s in range(6, 10)})
    latest = _write_version(tmp_path, 2, {s: {"reward/mean": 0.9} for s in range(10, 12)})
    _write_version(tmp_path / "other", 0, {0: {"reward/mean": 0.0}})  # another run
    csvs = [tmp_path / "csv" / f"version_{n}" / "metrics.csv" for n in range(3)]
    assert run_metrics_csvs(tmp_path) == csvs
    assert version_history(csvs[1]) == csvs[:2]
    assert run_metrics_csvs(latest) == [csvs[2]]  # a version directory: that version only
    # version_0 up to step 5, version_1 from its first step 6 (it superseded 6-7), version_2
    expected = [(s, 0.1) for s in range(6)] + [(s, 0.5) for s in range(6, 10)] \
        + [(10, 0.9), (11, 0.9)]
    assert load_run_metrics(tmp_path)["reward/mean"] == expected

    drawn: dict[str, object] = {}
    monkeypatch.setattr("trustregion.plots.render.plot_reward",
                        lambda metrics, path: drawn.setdefault("reward", metrics) and path)
    paths = render_run(tmp_path)
    assert drawn["reward"]["reward/mean"] == expected  # type: ignore[index]
    assert paths[0] == latest / "plots" / "reward.png"


def test_drift_plots_draws_the_whole_run_after_a_resume(tmp_path) -> None:
    _write_version(tmp_path, 0, {0: {"reward/mean": 0.25}, 1: {"reward/mean": 0.5}})
    logger = CSVLogger(tmp_path, name="csv", version=1)  # the resumed run's logger
    logger.log_metrics({"reward/mean": 0.75}, step=2)

    trainer = SimpleNamespace(loggers=[logger])  # DriftPlots.metrics reads only the loggers
    metrics = DriftPlots().metrics(trainer)  # type: ignore[arg-type]
    assert metrics["reward/mean"] == [(0, 0.25), (1, 0.5), (2, 0.75)]


# --------------------------------------------------------------------------- honest charts
def _axis(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def _lines(ax, label: str):
    return [line for line in ax.lines if line.get_label() == label]


def test_the_weight_chart_title_fits_the_figure() -> None:
    strategy = DivergenceMask(divergence="binary_tv", delta=0.15)
    title = weight_chart_title(strategy)
    assert len(title) > 110  # wider than the figure in one line at 12 pt bold
    rng = np.random.default_rng(0)
    fig = weight_vs_shift_figure({"delta": rng.normal(0, 0.05, 50), "weight": np.ones(50),
                                  "adv_sign": rng.choice([-1.0, 1.0], 50)}, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (drawn,) = [text for text in fig.findobj(Text)
                if text.get_text().startswith("DivergenceMask(")]
    assert drawn.get_text().replace("\n", " ") == title  # wrapped at spaces, nothing lost
    assert drawn.get_text().count("\n") >= 1
    box, frame = drawn.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 \
        and box.y1 <= frame.y1


def test_coinciding_lines_stay_visible() -> None:
    # DRPO: every token outside the region has a negative weight, so the two lines coincide
    same = [(0, 0.01), (1, 0.02), (2, 0.0)]
    fig = drift_figure({"trust_region/outside_frac": same,
                        "trust_region/negative_weight_frac": same,
                        "trust_region/zero_weight_frac": [(0, 0.0), (1, 0.0), (2, 0.0)]})
    ax = _axis(fig, "Trust region: tokens affected")
    (outside,) = _lines(ax, "outside the region")
    (negative,) = _lines(ax, "negative weight")
    assert list(outside.get_ydata()) == list(negative.get_ydata()) == [0.01, 0.02, 0.0]
    assert outside.get_linestyle() != negative.get_linestyle()
    # the later line is drawn narrower on top of the earlier one, which shows around it
    assert outside.get_linewidth() > negative.get_linewidth()
    assert outside.get_zorder() <= negative.get_zorder()
    assert ax.lines.index(outside) < ax.lines.index(negative)


def _band(fig) -> dict[float, list[float]]:
    """``{step: [y, ...]}`` of the vertices of the reward chart's ±1 std band."""
    ax = _axis(fig, "Reward")
    (band,) = [c for c in ax.collections if c.get_label().startswith("± 1 std")]
    found: dict[float, list[float]] = {}
    for x, y in band.get_paths()[0].vertices:
        found.setdefault(float(x), []).append(round(float(y), 12))
    return found


REWARDS_01 = {"reward/mean": [(0, 0.2), (1, 0.5), (2, 0.9)],
              "reward/std": [(0, 0.4), (1, 0.5), (2, 0.3)]}


def test_the_reward_band_stays_within_the_rewards_range() -> None:
    # 0/1 rewards (every mean in [0, 1]): mean ± std, 3 points so no smoothing, clipped:
    # step 0: 0.2 ∓ 0.4 → [0, 0.6]; step 1: 0.5 ∓ 0.5 → [0, 1]; step 2: 0.9 ∓ 0.3 → [0.6, 1]
    fig = reward_figure(REWARDS_01)
    band = _band(fig)
    assert {x: sorted(set(ys)) for x, ys in band.items()} == {
        0.0: [0.0, 0.6], 1.0: [0.0, 1.0], 2.0: [0.6, 1.0]}
    label = [c.get_label() for c in _axis(fig, "Reward").collections]
    assert label == ["± 1 std of the rewards, within [0, 1]"]
    # a range given: step 0 reaches 0.2 − 0.4 = −0.2 within [−1, 1]; step 2: 0.9 + 0.3 → 1
    band = _band(reward_figure(REWARDS_01, reward_range=(-1.0, 1.0)))
    assert sorted(set(band[0.0])) == [-0.2, 0.6] and sorted(set(band[2.0])) == [0.6, 1.0]
    # means outside [0, 1]: no range is assumed, the band is mean ± std (2 ∓ 3 → [−1, 5])
    band = _band(reward_figure({"reward/mean": [(0, 2.0), (1, 2.0)],
                                "reward/std": [(0, 3.0), (1, 3.0)]}))
    assert sorted(set(band[0.0])) == [-1.0, 5.0]
    with pytest.raises(ValueError, match=r"reward_range must be \(low, high\) with finite "
                                         r"low < high; got \(1.0, 0.0\)"):
        reward_figure(REWARDS_01, reward_range=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"reward_range must be \(low, high\)"):
        reward_figure(REWARDS_01, reward_range=(0.0, 1.0, 2.0))  # type: ignore[arg-type]


def test_chi2_is_never_drawn_below_zero() -> None:
    # logs of older versions estimated χ² as E[r²] − 1, negative when the tokens' mean ratio is
    # below 1
    fig = drift_figure({"drift/behavior/chi2": [(0, 0.004), (1, -0.002), (2, 0.001)]})
    ax = _axis(fig, "χ² divergence")
    (line,) = ax.lines
    assert list(line.get_ydata()) == [0.004, 0.0, 0.001]
    assert ax.get_ylim()[0] == 0.0
    notes = [text.get_text() for text in ax.texts]
    assert "1 of 3 estimates below 0 (lowest -0.002) drawn at 0" in notes


def test_a_wide_positive_chi2_is_drawn_on_a_log_axis_without_a_warning() -> None:
    # 1e-5 … 3: a range over 100×, all positive: log scale, where a floor of 0 cannot be set
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = drift_figure({"drift/behavior/chi2": [(0, 1e-5), (1, 3.0), (2, 1e-3)]})
    ax = _axis(fig, "χ² divergence")
    assert ax.get_yscale() == "log"
    assert ax.get_ylim()[0] > 0


MONITORED = {
    "trust_region/outside_frac": [(0, 0.02), (1, 0.01), (2, 0.03)],
    "shadow/ratio_clip/outside_frac": [(0, 0.05), (1, 0.04), (2, 0.06)],
    "shadow/ratio_clip/weight_corr": [(0, 0.5), (1, 0.6), (2, 0.7)],
    "shadow/spo/outside_frac": [(0, 0.0), (1, 0.0), (2, 0.01)],
    "guard/fired": [(0, 0.0), (1, 1.0), (2, 0.0)],
    "guard/kl": [(0, 0.01), (1, 0.4), (2, 0.02)],
    "controller/scale": [(0, 0.9), (1, 0.81), (2, 0.729)],
    "controller/observed": [(0, 0.0), (1, 0.0), (2, 0.0)],
    "controller/delta": [(0, 0.135), (1, 0.1215), (2, 0.10935)],
}


def test_the_monitors_chart_draws_shadow_guard_and_controller_keys(tmp_path) -> None:
    fig = monitors_figure(MONITORED)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["Shadow strategies: tokens outside each region",
                      "Weight correlation, shadow vs active", "Collapse guard: mismatch KL (k3)",
                      "Width controller: observed value", "Width controller: trust-region widths",
                      "Width controller: cumulative scale"]
    outside = _axis(fig, "Shadow strategies: tokens outside each region")
    assert [line.get_label() for line in outside.lines if not line.get_label().startswith("_")
            ] == ["active strategy", "ratio_clip", "spo"]
    (fired,) = _lines(_axis(fig, "Collapse guard: mismatch KL (k3)"), "guard fired")
    assert list(fired.get_xdata()) == [1.0, 1.0]  # a vertical line at step 1
    widths = _axis(fig, "Width controller: trust-region widths")
    (delta,) = widths.lines
    assert list(delta.get_ydata()) == [0.135, 0.1215, 0.10935]
    assert widths.get_ylabel() == "delta"  # a single line, named on its axis
    assert _axis(fig, "Weight correlation, shadow vs active").get_ylim() == (-1.05, 1.05)
    # a run without monitors has no monitors chart
    assert plot_monitors({"trust_region/outside_frac": [(0, 0.1)]}, tmp_path / "m.png") is None
    _check_png(plot_monitors(MONITORED, tmp_path / "m.png"))


def test_render_run_draws_monitors_and_titles_with_the_controlled_width(tmp_path,
                                                                        monkeypatch) -> None:
    version = _write_version(tmp_path, 0, {s: {k: v for k, series in MONITORED.items()
                                               for t, v in series if t == s} for s in range(3)})
    (version / "hparams.yaml").write_text("trust_region: {name: drpo, delta: 0.15}\n")
    write_plots = version / "plots"
    write_plots.mkdir()
    (write_plots / "token_samples.csv").write_text(
        "step,delta,weight,adv_sign,mu\n0,0.1,0.5,1,0.2\n1,-0.1,0.5,-1,0.3\n")
    titles: list[str] = []
    monkeypatch.setattr("trustregion.plots.render.plot_weight_vs_shift",
                        lambda samples, path, title: titles.append(title) or path)
    paths = render_run(tmp_path)
    # no reward/mean logged: no reward chart
    assert [p.name for p in paths] == ["drift.png", "monitors.png", "weight_vs_shift.png"]
    # the last logged controller/delta, not the configured 0.15
    assert titles == ["DRPO(delta=0.1094, anchor=behavior): gradient weight against "
                      "probability shift\nwidths set by the width controller: delta 0.15 at "
                      "the start → 0.1094 at the end"]


def test_the_weight_chart_title_names_the_current_widths() -> None:
    strategy = DRPO(delta=0.15)
    metrics = {"controller/delta": [(0, 0.16), (1, 0.18)], "controller/scale": [(1, 1.2)]}
    assert logged_widths(strategy, metrics) == {"delta": 0.18}
    assert logged_widths(strategy, {}) == {}
    assert weight_chart_title(strategy, {"delta": 0.18}) == (
        "DRPO(delta=0.18, anchor=behavior): gradient weight against probability shift\n"
        "widths set by the width controller: delta 0.15 at the start → 0.18 at the end")
    # a width logged in float32 that did not move: no second line
    assert weight_chart_title(strategy, {"delta": float(np.float32(0.15))}) \
        == weight_chart_title(strategy)
    with pytest.raises(ValueError, match=r"widths \['epsilon'\] are not hyperparameters of "
                                         r"DRPO"):
        weight_chart_title(strategy, {"epsilon": 0.2})


def test_drift_plots_titles_with_the_width_the_controller_set(random_model_dir,
                                                              tmp_path) -> None:
    plots = DriftPlots()
    controller = TrustRegionController("outside_frac", target_value=0.5, gain=1.0)
    module = _fit(random_model_dir, 2, [controller, plots], logger=False,
                  default_root_dir=tmp_path)
    delta = module.strategy.delta
    assert delta != DRPO().delta  # the controller moved it
    assert plots.title(module.trainer) == (
        f"DRPO(delta={float(f'{delta:.4g}'):g}, anchor=behavior): gradient weight against "
        f"probability shift\nwidths set by the width controller: delta 0.15 at the start → "
        f"{float(f'{delta:.4g}'):g} at the end")
