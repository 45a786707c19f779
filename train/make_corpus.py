"""`python train/make_corpus.py [experiment=...] [key=value ...]`: Synthesise the espeak-ng corpus of `data.corpus` (wavs + manifest.jsonl + corpus.txt)."""

from _entry import run

from csm_jax.experiment import make_corpus

if __name__ == "__main__":
    run(make_corpus)()
