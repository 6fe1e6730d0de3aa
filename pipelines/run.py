"""The run stage as a job: `python -m pipelines.run CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm run`; this form is what `ray job submit -- python -m pipelines.run ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run on import
    sys.exit(main(["run", *sys.argv[1:]]))
