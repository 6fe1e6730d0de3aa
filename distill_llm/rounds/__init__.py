"""On-policy and self-distillation rounds: the student samples, the teacher scores, the student trains."""
