"""Training: the loop (trainer), optimizers and schedules (optim), checkpoints, metrics and plots, dry run.

    from scratchlm.train.trainer import train_model
    from scratchlm.train.checkpoint import find_checkpoint, load_model_state
    from scratchlm.train.dryrun import dry_run

Submodules are imported where used so that ``import scratchlm.train`` stays cheap.
"""
