"""The PNG chart (matplotlib, from the optional `bench` extra)."""

SHORT = {"tensorflow": "tf", "jax": "jax", "torch": "torch"}
ROWS = ("full", "core_lora", "keras_lora", "floor", "peft")
COLORS = {
    "full": "#9e9e9e",
    "core_lora": "#e57373",
    "keras_lora": "#1e88e5",
    "floor": "#43a047",
    "peft": "#fb8c00",
}


def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write(path, all_results):
    """Training step times, inference ratios and merge scaling, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [r["backend"] for r in all_results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    ax = axes[0]
    width = 0.16
    for i, row in enumerate(ROWS):
        xs, ys = [], []
        for j, r in enumerate(all_results):
            rows = r["sections"].get("training", {}).get("rows", {})
            if row in rows:
                xs.append(j + (i - 2) * width)
                ys.append(rows[row]["median_ms"])
        if xs:
            ax.bar(xs, ys, width, label=row, color=COLORS[row])
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("ms per train step (median)")
    ax.set_title("Training step, 4 x Dense(1024), batch 256")
    ax.legend(fontsize=7)

    ax = axes[1]
    labels, values = [], []
    for r in all_results:
        for batch, d in r["sections"].get("inference", {}).get("batches", {}).items():
            for key in ("unmerged/plain", "merged/plain"):
                labels.append(f"{SHORT.get(r['backend'], r['backend'])} b{batch}")
                values.append(d["ratios"][key])
    colors = ["#1e88e5", "#43a047"] * (len(labels) // 2)
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.15, color="#e57373", linestyle="--", linewidth=0.8)
    ax.axhline(1.03, color="#43a047", linestyle=":", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=60)
    ax.bar([], [], color="#1e88e5", label="unmerged / plain")
    ax.bar([], [], color="#43a047", label="merged / plain")
    ax.legend(fontsize=7)
    ax.set_ylabel("latency / plain Dense")
    ax.set_title("Inference (targets: merged 1.03, unmerged 1.15)")

    ax = axes[2]
    for r in all_results:
        points = r["sections"].get("merge", {}).get("points", [])
        if points:
            params = [p["params"] for p in points]
            ax.loglog(
                params,
                [p["merge_s"] for p in points],
                "o-",
                label=f"merge_lora, {r['backend']}",
            )
    if all_results and all_results[0]["sections"].get("merge"):
        points = all_results[0]["sections"]["merge"]["points"]
        ax.loglog(
            [p["params"] for p in points],
            [p["numpy_s"] for p in points],
            "k--",
            label=f"NumPy W + s*A@B ({all_results[0]['backend']} run)",
        )
    ax.set_xlabel("parameters merged")
    ax.set_ylabel("seconds")
    ax.set_title("merge_lora scaling")
    ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
