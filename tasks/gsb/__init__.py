"""GSB human rating (paper 001 §4.1): rating tasks, stored ratings and tallies (`ratings`),
and the rating page (`web`, served by `regdpo gsb serve`)."""
