"""The rounds command as a job: `python -m pipelines.rounds CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm rounds`; this form is what `ray job submit -- python -m pipelines.rounds ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run on import
    sys.exit(main(["rounds", *sys.argv[1:]]))
