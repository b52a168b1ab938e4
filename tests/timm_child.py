"""Runs timm's own VisionTransformer on a state dict, in an environment that has timm.

  python tests/timm_child.py WORK_DIR

WORK_DIR holds `kwargs.json` (timm constructor arguments), `state.safetensors` (timm names) and
`x.npy` (log-mel [B, T, F]); this writes `out.npy`, `forward_features` of the input in float64.
It imports only torch, numpy, safetensors and timm: the test that calls it runs it in an
environment of its own (see tests/test_export_timm.py), since timm cannot be installed next to the
CPU torch of the test extra.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from timm.models import vision_transformer


def main(work: str) -> None:
  with open(os.path.join(work, 'kwargs.json')) as f:
    kwargs = json.load(f)
  for key in ('img_size', 'patch_size'):
    kwargs[key] = tuple(kwargs[key])
  model = vision_transformer.VisionTransformer(**kwargs).eval()
  state = {
    k: torch.from_numpy(v) for k, v in load_file(os.path.join(work, 'state.safetensors')).items()
  }
  model.load_state_dict(state, strict=True)
  x = torch.from_numpy(np.load(os.path.join(work, 'x.npy')))[:, None]
  with torch.no_grad():
    y = model.forward_features(x).double().numpy()
  np.save(os.path.join(work, 'out.npy'), y)
  print(f'timm {sys.modules["timm"].__version__}, torch {torch.__version__}: {tuple(y.shape)}')


if __name__ == '__main__':
  main(sys.argv[1])
