"""Layer `benchmark`: the timing harness behind `ddengine bench` and bench/ (imports nothing heavy at import time).

May import `runtime` and every layer below it."""
