"""The curation stage: shard sets in, deduplicated, decontaminated and verified shard set out."""
