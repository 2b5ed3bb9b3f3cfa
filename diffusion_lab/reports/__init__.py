"""Evaluation results as JSON, Markdown tables and plots."""

from diffusion_lab.reports.fid_report import markdown, plot, write_report

__all__ = ["markdown", "plot", "write_report"]
