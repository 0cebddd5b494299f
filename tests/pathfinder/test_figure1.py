"""``crbp-fast figure1`` at toy size: end to end, resume, summary schema, figures; the readable-plot fixes."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest

from crbp_fast import cli
from crbp_fast.tasks.pathfinder.figure1 import Figure1Config, Figure1Error, parse_model, run_figure1, run_training

matplotlib.use("Agg")

FIGURES = ["distances.png", "forward_trace.png", "metric_vs_step.png", "segmentations.png", "state_space.png",
           "training_loss.png"]


def toy(tmp_path, **kw) -> Figure1Config:
    base = dict(out=str(tmp_path / "fig1"), models=("bptt:2", "crbp:3"), size=32, length=4, train_images=16,
                channels=4, kernel_size=3, batch_size=4, iterations=2, backend="torch", conv="direct",
                eval_images=8, eval_batch=4, test_steps=5, pca_images=3, train_eval_every=0, train_eval_images=4,
                checkpoint_every=1, parallel=2, data_workers=1, progress=False, report_every=0.0)
    base.update(kw)
    return Figure1Config(**base)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figure1")
    lines: list[str] = []
    summary = run_figure1(toy(tmp), log=lines.append)
    return tmp, summary, lines


def test_end_to_end_summary_and_figures(done):
    tmp, summary, lines = done
    out = tmp / "fig1"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["format"] == "crbp_fast.figure1/1"
    assert sorted(summary["figures"]) == FIGURES
    assert all((out / "figures" / f).stat().st_size > 1000 for f in FIGURES)
    assert set(summary["models"]) == {"bptt2", "crbp3"}
    for name, n in (("bptt2", 2), ("crbp3", 3)):
        m = summary["models"][name]
        assert m["N"] == n and len(m["f1_per_step"]) == 5 and len(m["iou_per_step"]) == 5
        assert m["f1_at_N"] == m["f1_per_step"][n - 1] and 1 <= m["f1_peak_step"] <= 5
        assert m["distance"]["n"] == 8 and len(m["distance"]["values"]) == 8
        assert m["training"]["steps"] == 2 and len(m["segmentation_image_f1_per_step"]) == 5
    (ks,) = summary["ks"]
    assert (ks["a"], ks["b"], ks["n_a"], ks["n_b"]) == ("bptt2", "crbp3", 8, 8) and 0 <= ks["statistic"] <= 1
    assert summary["settings"]["iterations"] == 2 and summary["paper"]["bptt6"]["f1"]["39"] == 0.2297
    wall = summary["wall"]
    assert wall["total_seconds"] >= wall["train_wall_seconds"] > 0
    assert any("train: started bptt2" in line for line in lines) and any(line.startswith("result:") for line in lines)


def test_rerun_resumes_and_more_steps_continue(done):
    """A rerun skips finished trainers; more optimizer steps continue them from their checkpoints."""
    tmp, _, _ = done
    data = tmp / "fig1" / "data"
    lines: list[str] = []
    run_training(toy(tmp), data, lines.append)
    assert any("already at step 2" in line for line in lines) and not any("started" in line for line in lines)
    lines.clear()
    run_training(toy(tmp, iterations=3, models=("bptt:2",)), data, lines.append)
    assert any("started bptt2" in line for line in lines)
    log = [json.loads(r) for r in (tmp / "fig1" / "runs" / "bptt2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3]
    assert "--resume" in (tmp / "fig1" / "runs" / "bptt2" / "train.out").read_text()


def test_other_settings_in_the_same_folder_are_refused(done, tmp_path):
    tmp, _, _ = done
    with pytest.raises(Figure1Error, match="lr"):
        run_figure1(toy(tmp, lr=0.5), log=lambda s: None)
    with pytest.raises(Figure1Error, match="models"):
        parse_model("adam:3")
    with pytest.raises(Figure1Error, match="test_steps"):
        toy(tmp_path, models=("bptt:6",), test_steps=5).check()


def test_cli_registers_figure1(capsys):
    with pytest.raises(SystemExit):
        cli.main(["figure1", "--help"])
    text = capsys.readouterr().out
    assert "--out" in text and "--iterations" in text and "--models" in text


# --- the readable-plot fixes of diagnose.plot_summary ---------------------------------------------------


def synthetic_summary(tmp_path, test_steps=12):
    rng = np.random.default_rng(0)
    logs = []
    entries = []
    for i, (label, algorithm, n, scale) in enumerate((("bptt6", "bptt", 6, 300.0), ("crbp10", "crbp", 10, 1.0))):
        d = tmp_path / label
        d.mkdir()
        (d / "log.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) + "\n"
                                             for s in range(1, 41)))
        logs.append(d)
        f1 = list(np.linspace(0.2, 0.9, test_steps))
        entries.append({
            "label": label, "path": str(d / "checkpoint.pt"), "algorithm": algorithm, "task": "segmentation",
            "trained_steps": n, "train_steps": n, "metric": "f1",
            "per_step": {"f1": f1, "iou": f1},  # identical curves: both must stay visible
            "distance": {"values": list(scale * rng.lognormal(0, 0.5, 200))},
            "pca": {"explained_variance": [0.6, 0.3], "points": rng.normal(size=(test_steps, 4, 2)).tolist()},
        })
    return {"test_steps": test_steps, "n_images": 200, "checkpoints": entries,
            "ks": [{"a": "bptt6", "b": "crbp10", "statistic": 1.0, "pvalue": 1e-90, "n_a": 200, "n_b": 200}]}


def test_plots_are_readable(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from crbp_fast.tasks.pathfinder.diagnose import plot_summary

    figs = {}
    original = Figure.savefig

    def capture(self, path, *a, **kw):
        figs[str(path).rsplit("/", 1)[-1]] = self
        return original(self, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_summary(synthetic_summary(tmp_path), tmp_path)
    assert set(figs) == {"metric_vs_step.png", "state_space.png", "distances.png", "training_loss.png"}
    # metric per step: F1 and IoU panels, integer step ticks, the coinciding curves differ in style and marker
    axes = figs["metric_vs_step.png"].axes
    assert len(axes) == 2
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) == 12]
        assert len(curves) == 2
        assert curves[0].get_linestyle() != curves[1].get_linestyle() and curves[0].get_marker() != curves[1].get_marker()
        assert ax.get_xlabel() and ax.get_ylabel()
    # state space: a legend names every kind of mark
    legend_texts = [t.get_text() for leg in figs["state_space.png"].legends for t in leg.get_texts()]
    assert len(legend_texts) == 5 and any("t = 1" in t for t in legend_texts) and any("t = T" in t for t in legend_texts)
    # distances: each model's 200 images spread over many bins of its own histogram (not one bin,
    # though the two models differ 300x), n shown; the ECDFs on a log axis with the KS results
    dist_axes = figs["distances.png"].axes
    for ax in dist_axes[:2]:
        filled = [p for p in ax.patches if p.get_height() > 0]
        assert len(filled) >= 10 and "n = 200" in ax.get_title()
    ecdf = dist_axes[2]
    assert ecdf.get_xscale() == "log" and len(ecdf.get_lines()) == 2
    text = " ".join(t.get_text() for t in ecdf.texts)
    assert "D = 1.000" in text and "n = 200 / 200" in text
    # training loss: one panel per model, integer ticks, raw line and moving average both drawn
    for ax in figs["training_loss.png"].axes:
        lines = ax.get_lines()
        assert len(lines) == 2 and lines[0].get_alpha() and lines[1].get_alpha() is None
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)


def test_preview_titles_clear_of_the_row_above(tmp_path, monkeypatch):
    """`crbp-fast pathfinder preview`: the second row's titles sit below the first row's images."""
    from matplotlib.figure import Figure

    figs = []
    original = Figure.savefig

    def capture(self, path, *a, **kw):
        figs.append(self)
        return original(self, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    assert cli.main(["pathfinder", "preview", "--length", "4", "--size", "32", "-n", "8",
                     "--out", str(tmp_path / "p.png")]) == 0
    (fig,) = figs
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    axes = fig.axes
    cols = len(axes) // 2
    for top, bottom in zip(axes[:cols], axes[cols:]):
        title = bottom.title.get_window_extent(renderer)
        assert bottom.get_title() and title.y1 <= top.get_window_extent(renderer).y0 + 0.5
