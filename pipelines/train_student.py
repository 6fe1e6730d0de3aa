"""The train stage as a job: `python -m pipelines.train_student CONFIG.yaml [dotted.key=value ...]`.

Same code as `distill-llm train`; this form is what `ray job submit -- python -m pipelines.train_student ...` runs.
"""

import sys

from distill_llm.cli import main

if __name__ == "__main__":  # vLLM starts its workers with spawn: nothing may run on import
    sys.exit(main(["train", *sys.argv[1:]]))
