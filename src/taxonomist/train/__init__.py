"""Training: validated config, data set-up, the loop, checkpoints and auto-resume."""
