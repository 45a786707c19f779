"""`python train/train.py [experiment=...] [key=value ...]`: Train on the prepared data; reruns with the same overrides resume from the last checkpoint."""

from _entry import run

from csm_jax.experiment import run_training

if __name__ == "__main__":
    run(run_training)()
