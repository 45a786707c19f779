"""Training data: manifests, a synthetic espeak-ng corpus, preparation into Mimi-code shards, batch loading.

    manifest = make_espeak_corpus("outputs/corpus")                     # or your own manifest.jsonl
    prepare(manifest, "outputs/prepared", codec, tokenizer, num_codebooks=8)
    train, held_out = split(Dataset.open("outputs/prepared"), eval_fraction=0.1)
    loader = Loader(train, tokenizer, num_codebooks=8, audio_vocab_size=2051, batch_size=8, max_rows=2048)
"""

from csm_jax.data.corpus import VOICES, CorpusError, Voice, make_espeak_corpus, sentences
from csm_jax.data.loader import Dataset, DatasetError, Entry, Example, Loader, default_buckets, split
from csm_jax.data.manifest import ManifestError, Utterance, read_manifest, write_manifest
from csm_jax.data.prepare import PrepareError, Summary, bucket_frames, prepare

__all__ = [
    "VOICES", "CorpusError", "Dataset", "DatasetError", "Entry", "Example", "Loader", "ManifestError",
    "PrepareError", "Summary", "Utterance", "Voice", "bucket_frames", "default_buckets", "make_espeak_corpus",
    "prepare", "read_manifest", "sentences", "split", "write_manifest",
]
