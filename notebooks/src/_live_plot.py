# A live plot: the trainer calls on_log(row) with each row it writes to metrics.jsonl; we redraw in place
import matplotlib.pyplot as plt
from IPython.display import display


class LivePlot:
    """Redraws one panel per group of metric names from the trainer's rows (every `every` rows)."""

    def __init__(self, panels, every=1, title=""):
        self.panels, self.every, self.rows = panels, every, []
        self.fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
        self.axes = list(axes) if len(panels) > 1 else [axes]
        self.fig.suptitle(title)
        self.handle = display(self.fig, display_id=True)
        plt.close(self.fig)  # shown through the handle only

    def __call__(self, row):
        self.rows.append(row)
        if len(self.rows) % self.every == 0:
            self.draw()

    def draw(self):
        for ax, (label, keys) in zip(self.axes, self.panels):
            ax.clear()
            for key in keys:
                points = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), float)]
                if points:
                    ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
            ax.set_xlabel("step")
            ax.set_title(label)
            if len(keys) > 1 and ax.lines:
                ax.legend(fontsize=8)
        self.fig.tight_layout()
        self.handle.update(self.fig)

    def save(self, path):
        self.draw()
        self.fig.savefig(path, dpi=100, bbox_inches="tight")
        print("saved", path)
