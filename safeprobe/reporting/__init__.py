"""Comparison reports: per-run figures and their spread over seeds (`summary`), the plots (`plots`) and the
report.md / self-contained report.html writer (`report`)."""
from .report import write_report
from .summary import aggregate, run_metrics, stats, summarise

__all__ = ["aggregate", "run_metrics", "stats", "summarise", "write_report"]
