"""The quantize stage as a job: `python -m pipelines.quantize CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm quantize`; this form is what `ray job submit -- python -m pipelines.quantize ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # nothing may run on import (Ray workers import the entrypoint's module)
    sys.exit(main(["quantize", *sys.argv[1:]]))
