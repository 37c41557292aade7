"""The pieces of train.py's loop that deserve their own tests: schedule, accumulation, state,
data parallelism under torchrun."""
