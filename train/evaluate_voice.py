"""`python train/evaluate_voice.py experiment=voice [evaluate.model=DIR] [key=value ...]`: does the trained voice
speak? WER against eSpeak NG's rendering of held-out sentences, durations, end of turn, voice prompting."""

from _entry import run

from csm_jax.experiment import run_voice_evaluation

if __name__ == "__main__":
    run(run_voice_evaluation)()
