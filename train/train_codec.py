"""`python train/train_codec.py [key=value ...]`: Train the Mimi codec on a corpus (configs/train_codec.yaml), then
export its best checkpoint; reruns with the same overrides resume exactly."""

from _entry import run

from csm_jax.training.codec.recipe import run_codec_training

if __name__ == "__main__":
    run(run_codec_training, config_name="train_codec")()
