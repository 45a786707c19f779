"""`python train/export_codec.py [key=value ...] [export_checkpoint=best|latest|STEP]`: export a codec run's
checkpoint (configs/train_codec.yaml, same overrides as the training command) to `export`: a converted codec
(`export/codec`, what `codec.path` of a CSM experiment reads) and a transformers Mimi directory."""

from _entry import run

from csm_jax.training.codec.recipe import export_checkpoint

if __name__ == "__main__":
    run(export_checkpoint, config_name="train_codec")()
