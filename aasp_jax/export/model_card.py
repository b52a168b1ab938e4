"""The model card (README.md) of an export folder: YAML metadata for the Hugging Face Hub, what the
model is and how it was made, its files, and three ways to load it (transformers, PyTorch alone,
onnxruntime). `exporter.write_model_card` renders it from the folder's config.json.
"""

import json
import textwrap

import numpy as np

_FILE_NOTES = {
  'model.safetensors': 'float32 weights, PyTorch layout (the state dict of `aasp_torch`)',
  'config.json': 'transformers config: architecture (`model`), front end (`frontend`), shapes',
  'preprocessor_config.json': 'the feature extractor: Kaldi log-mel front end, `sampling_rate`',
  'README.md': 'this card',
  'aasp_torch.py': 'the model in PyTorch (torch, numpy, safetensors; no transformers needed)',
  'configuration_aasp.py': '`AaSPConfig` for transformers',
  'modeling_aasp.py': '`AaSPModel`, `AaSPForAudioClassification` for transformers',
  'feature_extraction_aasp.py': '`AaSPFeatureExtractor`: waveforms -> `input_values`',
  'timm_model.safetensors': 'the encoder in timm / Audio-MAE names, for `timm.VisionTransformer`',
  'model.onnx': 'ONNX graph, log-mel (and a frame mask) in, dynamic batch and time, checked against '
  'PyTorch',
}
_POSEMB_NOTES = {
  'sincos': 'fixed 2-D sin-cos positions (time in the first half of each vector)',
  'sincos_mae': 'fixed 2-D sin-cos positions (frequency first, as Audio-MAE / EAT)',
  'learned': 'a learned position table',
}


def render(config: dict, files) -> str:
  """The export's README.md: YAML metadata, what the model is, its files and three ways to load
  it (transformers, PyTorch alone, onnxruntime)."""
  m, p = config['model'], config['frontend']  # the exporter writes every model field
  classifier = 'id2label' in config
  num_params = sum(int(np.prod(s)) for s in config['tensors'].values())
  window_s = ((p['target_length'] - 1) * p['frame_shift_ms'] + p['frame_length_ms']) / 1000.0
  frame_width = (p['num_mel_bins'] // m['patch_f']) * m['width']
  if m['stem'] == 'aape':
    a = m['aape']
    stem = (
      f'AaPE (aliasing-aware patch embedding: {a["num_modes"]} SBLU modes per group, kernel '
      f'{a["kernel_size"]}, {a["window"]} window, {a["phase"]} phase, {a["lambda_mode"]} Lambda, '
      f'{a["fusion"]} fusion)'
    )
  else:
    stem = 'conv (the ViT / Audio-MAE patch projection)'
  norms = (
    'pre-LN blocks, a final LayerNorm'
    if m['block_norm'] == 'pre'
    else 'post-LN blocks, a LayerNorm on the input tokens'
  )
  data = config.get('data')
  trained_on = f', trained on `{data}`' if data else ''
  who = 'fine-tuned model' if config['which'] == 'finetuned' else f'{config["which"]} encoder'
  bullets = [
    (
      f'Weights: the {who} of step {config["step"]} of the run `{config["source"]}`'
      f'{trained_on}: {num_params:,} float32 parameters.'
    ),
    (
      f'Architecture: ViT, width {m["width"]}, depth {m["depth"]}, {m["num_heads"]} heads, MLP '
      f'{m["mlp_dim"]}, {m["patch_t"]}x{m["patch_f"]} patches, '
      f'{_POSEMB_NOTES.get(m["posemb"], m["posemb"])} for up to {m["max_time_patches"]} time '
      f'patches, a CLS token, {norms}. Patch stem: {stem}.'
    ),
    (
      f'Front end (preset `{p["name"]}`): mono {p["sample_rate"]} Hz float waveform in [-1, 1] '
      f'-> Kaldi log-mel ({p["num_mel_bins"]} bins, {p["frame_length_ms"]} ms window, '
      f'{p["frame_shift_ms"]} ms hop) -> padded or cropped to {p["target_length"]} frames '
      f'({window_s:g} s windows) -> normalised ({p["norm_mode"]}, mean {p["norm_mean"]}, std '
      f'{p["norm_std"]}).'
    ),
    f'Trained in JAX with compute dtype {m["dtype"]}; the PyTorch module computes in float32.',
  ]
  if classifier:
    labels = [config['id2label'][str(i)] for i in range(len(config['id2label']))]
    shown = ', '.join(f'`{label}`' for label in labels[:8]) + (', ...' if len(labels) > 8 else '')
    kind = (
      'sigmoid per label'
      if config.get('problem_type') == 'multi_label_classification'
      else 'softmax'
    )
    bullets.append(
      f'Classifier: a linear head on the CLS token, {len(labels)} labels ({kind}): {shown}.'
    )
  made = (
    'pre-trained with AaSP (aliasing-aware self-supervised pre-training)'
    if not config.get('imported_from')
    else f'imported from {config["imported_from"]} (not pre-trained by aasp-jax)'
  )
  intro = textwrap.fill(
    f'An audio spectrogram transformer {made}'
    f'{", then fine-tuned," if classifier else ","} exported from aasp-jax '
    f'{config["aasp_jax_version"]}. The folder runs with PyTorch alone: neither JAX nor aasp-jax '
    'is needed.',
    100,
    break_on_hyphens=False,
  )
  about = '\n'.join(
    textwrap.fill(b, 100, initial_indent='- ', subsequent_indent='  ') for b in bullets
  )
  file_list = '\n'.join(f'- `{name}`: {_FILE_NOTES[name]}' for name in files)
  tags = ['audio', 'audio-spectrogram-transformer', 'aasp', 'aasp-jax', 'custom_code']
  pipeline = 'audio-classification' if classifier else 'feature-extraction'
  header = [
    '---',
    'license: apache-2.0',
    'library_name: transformers',
    f'pipeline_tag: {pipeline}',
    'tags:',
    *[f'- {tag}' for tag in tags],
  ]
  if data:
    header.append(f'data: {json.dumps(data)}  # the training data (not a Hugging Face dataset id)')
  header.append('---')
  title = 'classifier' if classifier else 'encoder'
  return f"""{chr(10).join(header)}

# AaSP audio {title} ({m['variant']}, {m['stem']} stem)

{intro}

{about}

## Files

{file_list}

## Use

{_usage(m, p, classifier, window_s, frame_width, 'model.onnx' in files)}
"""


def _usage(m, p, classifier: bool, window_s: float, frame_width: int, has_onnx: bool) -> str:
  rate, width = p['sample_rate'], m['width']
  if classifier:
    hf = f"""```python
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

folder = 'path/to/this/folder'
extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForAudioClassification.from_pretrained(folder, trust_remote_code=True)
inputs = extractor([wave], sampling_rate={rate}, return_tensors='pt')  # mono float32 at {rate} Hz
with torch.no_grad():
  logits = model(**inputs).logits  # [1, labels]: the clip's first {window_s:g} s
print(model.config.id2label[int(logits.argmax())])
```"""
    torch_only = """```python
import sys
import torch
sys.path.insert(0, 'path/to/this/folder')
import aasp_torch  # torch, numpy and safetensors

model = aasp_torch.AaSPClassifier.from_pretrained('path/to/this/folder')
logits = model.predict(torch.from_numpy(wave)[None])  # [1, labels], first window from the start
model.labels  # the label names, in logit order
```"""
    onnx_out = "logits = session.run(['logits'], {'log_mel': x['input_values']})[0]  # [B, labels]"
  else:
    hf = f"""```python
import torch
from transformers import AutoFeatureExtractor, AutoModel

folder = 'path/to/this/folder'
extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
inputs = extractor([wave], sampling_rate={rate}, return_tensors='pt')  # mono float32 at {rate} Hz
with torch.no_grad():
  out = model(**inputs)  # the clip's first {window_s:g} s; attention_mask masks the padding
  long = model.embed(torch.from_numpy(wave)[None])  # any length, cut into windows as HEAR does
out.scene  # [1, {2 * width}]: CLS ++ mean of the clip's patch tokens
out.cls, out.tokens  # [1, {width}], [1, patches (time-major), {width}]
```

A clip shorter than the window is zero-padded; the extractor's `attention_mask` marks its frames,
and the time patches with none of them are neither attended to nor pooled (aasp-jax's rule, so
`scene` is the project's scene embedding). Pass it, as `model(**inputs)` does."""
    torch_only = f"""```python
import sys
import torch
sys.path.insert(0, 'path/to/this/folder')
import aasp_torch  # torch, numpy and safetensors

model = aasp_torch.AaSPEncoder.from_pretrained('path/to/this/folder')  # eval mode, float32
out = model.embed(torch.from_numpy(wave)[None])  # any length: cut into {window_s:g} s windows
out['scene']  # [1, {2 * width}]: CLS ++ mean of the clip's patch tokens
out['frames']  # [1, T, {frame_width}]: one per {m['patch_t']}-frame time patch
out['timestamps_ms']  # [1, T]: the time patches' centres
tokens = model(model.features(torch.from_numpy(wave)[None]))['tokens']  # log-mel -> tokens
```"""
    onnx_out = (
      "scene, cls, tokens = session.run(None, {'log_mel': x['input_values'],\n"
      "                                        'attention_mask': x['attention_mask']})"
    )
  mask_line = '' if classifier else (
    '`attention_mask` is int32 [batch, frames], 1 for the frames of the clip (the extractor\'s); '
  )
  if has_onnx:
    onnx = f"""```python
import onnxruntime
session = onnxruntime.InferenceSession('path/to/this/folder/model.onnx')
x = extractor([wave], sampling_rate={rate}, return_tensors='np')  # or any log-mel
{onnx_out}
```

`log_mel` is float32 [batch, frames, {p['num_mel_bins']}], normalised as the feature extractor
returns it; batch and frames are dynamic (frames a multiple of {m['patch_t']}, up to
{m['max_time_patches'] * m['patch_t']}). {mask_line}Longer clips: run it on consecutive windows."""
  else:
    onnx = (
      'Not in this folder: `aasp-export --onnx` adds model.onnx (log-mel in, dynamic batch and '
      'time).'
    )
  return f"""1. Hugging Face transformers (the code of this folder runs: `trust_remote_code=True`):

{hf}

2. PyTorch alone (`pip install torch numpy safetensors`):

{torch_only}

3. onnxruntime:

{onnx}

Back in JAX: `aasp_jax.export.exporter.encoder_from_export('path/to/this/folder')` returns the
flax encoder, its parameters and the front-end preset."""
