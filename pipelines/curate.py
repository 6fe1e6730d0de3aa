"""The curate stage as a job: `python -m pipelines.curate CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm curate`; this form is what `ray job submit -- python -m pipelines.curate ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # nothing may run on import (Ray workers import the entrypoint's module)
    sys.exit(main(["curate", *sys.argv[1:]]))
