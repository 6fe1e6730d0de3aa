"""The eval stage as a job: `python -m pipelines.evaluate CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm eval`; this form is what `ray job submit -- python -m pipelines.evaluate ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run on import
    sys.exit(main(["eval", *sys.argv[1:]]))
