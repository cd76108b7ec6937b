"""The e2e run's progress lines; main() copies them to <out-dir>/progress.log, which the
re-analysis of a finished run reads for each phase's time window."""

from eval.lib.progress import Progress

log = Progress()
