"""The texts of the real speech clips in tests/data (for recognition and WER checks)."""

# The texts the clips were synthesised from (scripts/make_test_audio.py).
TEXTS = {
    "speech_1s.wav": "Hello there.",
    "speech_3s.wav": "The quick brown fox jumps over the lazy dog.",
    "speech_14s.wav": "Once upon a time, in a small village by the sea, there lived an old fisherman. Every morning he "
                      "rowed his boat out and cast his nets into the cold water. Most days he caught only a few fish, "
                      "but he always came home singing.",
    "speech_stereo_44k.wav": "Left and right, together.",
}
