"""Making drafts: teacher data, the small-LM distillation, EAGLE-style and EAGLE-3 training, evaluation and the design study."""
