"""A run's ``curves.png`` (training/curves.py): what each panel shows. The figure is drawn for real; the test
keeps a reference to it when plot_curves closes it, to read back its lines, labels and texts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from labelstudio_maskclip.training.curves import plot_curves  # noqa: E402

DECISION = "promoted: candidate 0.61 > served 0.52 (" + "x" * 80 + ")"


def _draw(metrics: dict, tmp_path, monkeypatch):
    """plot_curves(metrics) -> (the closed figure, the PNG as an array)."""
    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), real_close(fig))[1])
    path = tmp_path / "curves.png"
    plot_curves(metrics, path)
    (fig,) = closed
    return fig, np.asarray(Image.open(path))


def _metrics(loss, evals=(), teacher=None, current=None) -> dict:
    return {
        "loss": list(loss),
        "val_miou": [{"step": s, "miou": m} for s, m in evals],
        "miou": {"candidate": 0.6, "teacher": teacher, "current": current},
        "decision": DECISION,
    }


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_loss_raw_and_smoothed_and_the_candidates_miou_against_teacher_and_served(tmp_path, monkeypatch):
    loss = np.linspace(2.0, 0.5, 40) + np.tile([0.1, -0.1], 20)
    fig, png = _draw(
        _metrics(loss, [(10, 0.2), (20, None), (40, 0.61)], teacher=0.3, current=0.52), tmp_path, monkeypatch
    )
    assert png.shape[:2] == (320, 800)  # 10 x 4 inches at 80 dpi
    ax1, ax2 = fig.axes
    left, right = ax1.get_position(), ax2.get_position()
    assert left.y0 == right.y0 and left.x1 < right.x0  # side by side: loss on the left, mIoU on the right
    raw, smooth = ax1.get_lines()
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(1, 41))
    np.testing.assert_allclose(raw.get_ydata(), loss)
    assert raw.get_alpha() == 0.3  # the raw loss is faint, its running mean stands out
    assert smooth.get_alpha() is None
    np.testing.assert_array_equal(smooth.get_xdata(), np.arange(2, 41))  # the mean of steps k-1 and k at k
    np.testing.assert_allclose(smooth.get_ydata(), (loss[:-1] + loss[1:]) / 2)
    assert _legend(ax1) == ["loss", "mean of 2"]
    assert (ax1.get_xlabel(), ax1.get_ylabel()) == ("step", "cross-entropy")

    candidate, teacher, served = ax2.get_lines()
    np.testing.assert_array_equal(candidate.get_xdata(), [10, 40])  # the evaluation without a score is left out
    np.testing.assert_allclose(candidate.get_ydata(), [0.2, 0.61])
    assert candidate.get_marker() == "o"
    assert list(teacher.get_ydata()) == [0.3, 0.3] and teacher.get_linestyle() == "--"
    assert list(served.get_ydata()) == [0.52, 0.52] and served.get_linestyle() == ":"
    assert teacher.get_color() == served.get_color() == "gray"
    assert _legend(ax2) == ["candidate", "teacher", "current"]
    assert (ax2.get_xlabel(), ax2.get_ylabel()) == ("step", "validation mIoU")
    assert ax2.get_title() == DECISION[:60] and ax2.title.get_fontsize() == 8
    assert len(ax2.texts) == 0


@pytest.mark.parametrize(("steps", "k"), [(9, None), (10, 1), (39, 1), (40, 2), (100, 5)])
def test_the_running_mean_starts_at_ten_steps_over_a_twentieth_of_them(tmp_path, monkeypatch, steps, k):
    loss = np.random.default_rng(steps).uniform(0, 2, steps)
    fig, _ = _draw(_metrics(loss, teacher=0.3), tmp_path, monkeypatch)
    lines = fig.axes[0].get_lines()
    if k is None:
        assert len(lines) == 1 and _legend(fig.axes[0]) == ["loss"]
        return
    smooth = lines[1]
    assert _legend(fig.axes[0]) == ["loss", f"mean of {k}"]
    np.testing.assert_array_equal(smooth.get_xdata(), np.arange(k, steps + 1))
    np.testing.assert_allclose(smooth.get_ydata(), [loss[i - k : i].mean() for i in range(k, steps + 1)])


def test_a_run_with_nothing_to_validate_on_says_so(tmp_path, monkeypatch):
    fig, _ = _draw(_metrics([1.0, 0.8, 0.7], [(3, None)]), tmp_path, monkeypatch)
    ax2 = fig.axes[1]
    assert len(ax2.get_lines()) == 0 and ax2.get_legend() is None
    (text,) = ax2.texts
    assert text.get_text() == "no held-out people's masks yet:\nnothing to validate on"
    assert text.get_position() == (0.5, 0.5) and (text.get_ha(), text.get_va()) == ("center", "center")


def test_only_the_contenders_that_have_a_score_are_drawn(tmp_path, monkeypatch):
    fig, _ = _draw(_metrics([1.0, 0.9], current=0.4), tmp_path, monkeypatch)
    (served,) = fig.axes[1].get_lines()
    assert served.get_linestyle() == ":" and _legend(fig.axes[1]) == ["current"]
