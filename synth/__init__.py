"""Knowledge-enhanced question synthesis: HPO disease knowledge (`synth.knowledge`) and dense
retrieval over it or user corpora (`synth.retrieval`, BERT encoders + ScaNN)."""
