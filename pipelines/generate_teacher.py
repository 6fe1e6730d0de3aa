"""The generate stage as a job: `python -m pipelines.generate_teacher CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm generate`; this form is what `ray job submit -- python -m pipelines.generate_teacher ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run on import
    sys.exit(main(["generate", *sys.argv[1:]]))
