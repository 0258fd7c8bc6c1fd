"""The evaluator's metric names and cut-offs, and their text table, without torch: what `status`
and the stages print is formatted here, so printing a date's metrics imports no model code."""

from __future__ import annotations

KS: tuple[int, ...] = (10, 20, 50)
SETTINGS: tuple[str, ...] = ("standard", "visited", "unvisited", "long_tail", "tail_items")
METRICS: tuple[str, ...] = ("HR", "NDCG", "Recall")


def format_metrics(values: dict[str, dict[str, float | None]], ks: tuple[int, ...] = KS) -> str:
    """A markdown table: one row per setting, columns metric@K, then chance HR@K beside them."""
    cols = [f"{m}@{k}" for k in ks for m in METRICS]
    chance = [f"chance_HR@{k}" for k in ks]
    head = "| setting | users | candidates | " + " | ".join(cols + chance) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * (len(cols) + len(chance))]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for setting in SETTINGS:
        if setting in values:
            v = values[setting]
            cand = "-" if v.get("candidates") is None else f"{v['candidates']:.1f}"
            row = " | ".join(cell(v.get(c)) for c in cols + chance)
            lines.append(f"| {setting} | {v['users']} | {cand} | {row} |")
    return "\n".join(lines)
