"""`python train/evaluate_codec.py [key=value ...]`: held-out resynthesis metrics of a trained codec, per voice
(configs/train_codec.yaml): mel distance, SI-SNR, F0 error and voicing, word error rates. It evaluates `codec.path`
when given, else the export of the run the same overrides name; `evaluate_codec.out=FILE` also writes the JSON."""

from _entry import run

from csm_jax.training.codec.recipe import evaluate_trained_codec

if __name__ == "__main__":
    run(evaluate_trained_codec, config_name="train_codec")()
