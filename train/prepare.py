"""`python train/prepare.py [experiment=...] [key=value ...]`: Prepare `data.manifest` into Mimi codes + text tokens in `data.prepared` (resumable)."""

from _entry import run

from csm_jax.experiment import prepare_data

if __name__ == "__main__":
    run(prepare_data)()
