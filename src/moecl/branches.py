"""The zero-shot branch, one definition for every module that names it: the untouched backbone (no task's router),
which DDAS picks when no learned task explains an image, per-sample task id -1 in MoEAdapterModel, and the accuracy
matrix row measured before any task is learned."""

ZERO_SHOT = -1  # its task index / row index
ZERO_SHOT_NAME = "zero-shot"  # its label in reports, tables, trackers and predictions
