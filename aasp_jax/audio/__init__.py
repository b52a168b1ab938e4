"""Audio front end: decoding, resampling and Kaldi-compatible log-mel features (host numpy and device JAX)."""
