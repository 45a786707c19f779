"""`python train/export.py experiment=... [export.dir=DIR] [export.dtype=float16] [export.checkpoint=best]`: export
a trained CSM (with its codec, tokenizer and prompt settings) as a transformers CSM directory."""

from _entry import run

from csm_jax.experiment import run_export

if __name__ == "__main__":
    run(run_export)()
