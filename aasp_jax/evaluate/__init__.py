"""Evaluation of frozen encoders: clip embeddings and the linear probe.

  from aasp_jax.evaluate import linear_probe
  result = linear_probe.probe_encoder(encoder, params, preset, 'data/sonicpi/probe_train.csv',
                                      'data/sonicpi/probe_test.csv')
"""
