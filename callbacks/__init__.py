"""Lightning callbacks of the SigLIP 2 recipe (loss schedule, hand-off checkpoints, evaluation)."""
