"""Ray Serve application builders (`serve run serve_apps.llm:app config=...`)."""

import os

# Before anything here imports torch: torch's OpenMP threads spin for milliseconds after each parallel region
# by default, and between the engine's small torch calls they took the cores from the native kernels' own
# threads (an engine of 2 threads decoded 32 streams at 960-2,600 tokens/s against 3,900-4,700 with
# PASSIVE). OpenMP reads the setting once, when torch loads; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
