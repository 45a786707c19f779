"""`python train/evaluate.py [experiment=...] [key=value ...]`: Evaluate a checkpoint: held-out loss per codebook, generated samples (wav), intelligibility."""

from _entry import run

from csm_jax.experiment import run_evaluation

if __name__ == "__main__":
    run(run_evaluation)()
