"""Everything that loops or samples: KV cache, generation, flow matching, the pipeline."""
