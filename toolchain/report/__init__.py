"""The run report: what a run measured (``collect``) rendered as report.json, .md and .html (``write_report``)."""
from toolchain.report.collect import collect
from toolchain.report.render import write_report

__all__ = ["collect", "write_report"]
