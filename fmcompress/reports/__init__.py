"""The reports of fmcompress, one module per job.

* analysis: the memory analysis's typed report (AnalysisReport, RuntimeView): data only.
* compile: compile's report.json dict, the emitted model's metadata, the `--report` files.
* terminal: the `analyze` and `codec` tables (rich).
* markdown: compile's report.md.
* plot: memory.png (matplotlib).
* progress: the training monitor (progress bars, epoch lines, the JSON event log).

Nothing is imported here, so that reading the data (analysis) pulls in neither rich nor
matplotlib nor the passes.
"""


def format_shape(shape: list[int]) -> str:
    """A shape as the tables and report.md write it: 1x64x56x56."""
    return "x".join(map(str, shape))
