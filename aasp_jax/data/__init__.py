"""Audio data: clip decoding with skip reasons, manifests, ArrayRecord packs and grain pipelines."""
