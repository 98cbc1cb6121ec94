"""Data for the study: math word problems for fine-tuning (`math_data`) and the synthetic
arithmetic problems and corpus of the embedded default study (`synthetic`)."""
