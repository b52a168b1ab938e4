"""Export cost and PyTorch-vs-JAX CPU inference speed of the ViT-B encoder (`aasp-export`'s path).

A randomly initialised encoder (weights do not change any cost measured here) is saved as a
step-0 training checkpoint (`timm_layout.write_encoder_checkpoint`: teacher and student encoders,
scanned blocks for B, the resolved config; the layout `pretrained.load_pretrained` reads), then
exported with the real exporter, as `aasp-export` does:
  1. `exporter.export_checkpoint` (read the checkpoint, unstack, write model.safetensors + JSON);
  2. with the conv stem, `timm_layout.save_timm` from the export folder (timm_model.safetensors);
  3. `onnx_export.export_encoder_onnx` (model.onnx) and its onnxruntime check.
Then the same encoder runs on the same inputs in JAX (jitted `encoder.apply`, float32) and in
PyTorch (`AaSPEncoder` from the export folder, float32, `torch.no_grad`), and in onnxruntime on the
ONNX file: `--repeats` rounds, interleaved (one batch in each runtime per round) so background load
hits all alike; the medians are printed with their ratio. A pause separates the runs, and
onnxruntime's worker threads do not spin-wait, so no runtime's idle threads slow the next one. Two inputs: normalised log-mel windows
(the encoder alone) and 10.24 s waveforms (front end + encoder + 'cls_mean' scene pooling: JAX
`Embedder.scene_embeddings`, PyTorch `AaSPEncoder.embed`).

  python benchmarks/export_b.py                    # ViT-B/16, configs/pretrain_base.py (AaPE)
  python benchmarks/export_b.py --stem conv        # ViT-B/16 with the plain stem (+ timm file)
  python benchmarks/export_b.py --model tiny       # configs/quickstart.py: seconds, to try it
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch

from aasp_jax import configuration
from aasp_jax.evaluate import embed, pretrained
from aasp_jax.export import exporter, onnx_export, timm_layout
from aasp_jax.export.hf import aasp_torch

# Between timed runs: lets the previous runtime's worker threads (OpenMP, XLA's pool) go idle.
PAUSE_S = 1.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
  'tiny': os.path.join(REPO, 'configs', 'quickstart.py'),
  'B': os.path.join(REPO, 'configs', 'pretrain_base.py'),
}


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def synthetic_waves(count: int, samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
  """[count, samples] float32: amplitude-modulated tones in noise, different per clip."""
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / sample_rate
  out = np.empty((count, samples), np.float32)
  for i in range(count):
    tones = np.sin(2 * np.pi * rng.uniform(100, 4000, size=(3, 1)) * t).sum(0)
    out[i] = 0.1 * tones * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 8) * t))
    out[i] += 0.01 * rng.standard_normal(samples)
  return out


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def interleaved(runners: dict, repeats: int) -> dict:
  """{name: [seconds per round]}: each round runs every runner once, in turn."""
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, fn in runners.items():
      time.sleep(PAUSE_S)
      seconds, _ = timed(fn)
      times[name].append(seconds)
  return times


def report(title: str, times: dict, clips: int, reference: str) -> None:
  print(f'  {title} ({clips} clips per batch, median of {len(times[reference])} rounds):')
  base = clips / statistics.median(times[reference])
  for name, seconds in times.items():
    rate = clips / statistics.median(seconds)
    spread = f'{clips / max(seconds):.2f}-{clips / min(seconds):.2f}'
    print(
      f'    {name:<22} {rate:8.2f} clips/s  (range {spread})   x{rate / base:.2f} of {reference}'
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='B')
  parser.add_argument('--stem', choices=('aape', 'conv'), default=None, help="default: config's")
  parser.add_argument(
    '--clips', type=int, default=None, help='clips per batch (default B 4, tiny 16)'
  )
  parser.add_argument('--repeats', type=int, default=5, help='interleaved timing rounds')
  parser.add_argument('--no_onnx', action='store_true', help='skip the ONNX export and runtime')
  args = parser.parse_args()
  overrides = ['model.dtype=float32']  # bf16 matmuls are slower than fp32 on most CPUs
  if args.stem:
    overrides.append(f'model.stem={args.stem}')
  config = configuration.load_config(MODELS[args.model], overrides)
  clips = args.clips or (4 if args.model == 'B' else 16)
  m = config.model
  print(
    f'[{args.model}] {os.path.relpath(MODELS[args.model], REPO)}: width {m.width}, depth {m.depth}'
    f', heads {m.num_heads}, stem {m.stem}, float32; window {config.frontend.target_length} frames'
  )
  print(
    f'  host: {os.cpu_count()} CPUs; JAX {jax.__version__} on {jax.devices()[0].platform}; '
    f'torch {torch.__version__} with {torch.get_num_threads()} threads'
  )

  with tempfile.TemporaryDirectory() as root:
    workdir = os.path.join(root, 'run')
    seconds, _ = timed(
      lambda: timm_layout.write_encoder_checkpoint(
        workdir, config, pretrained.random_encoder(config, seed=0).params
      )
    )
    print(f'  random-init checkpoint written in {seconds:.1f} s (not part of the export)')
    out = os.path.join(root, 'export')
    result = exporter.export_checkpoint(workdir, out)
    print(f'  export_checkpoint: {result.seconds:.2f} s')
    files = dict(result.files)
    if m.stem == 'conv':
      t0 = time.perf_counter()
      cfg, preset, tensors = exporter.load_export(out)
      path = os.path.join(out, 'timm_model.safetensors')
      timm_layout.save_timm(
        path,
        exporter.unflatten_params(tensors),
        cfg['model'],
        target_length=preset['target_length'],
        num_mel_bins=preset['num_mel_bins'],
      )
      print(f'  timm layout (from the export folder): {time.perf_counter() - t0:.2f} s')
      files['timm_model.safetensors'] = os.path.getsize(path)
    session = None
    if not args.no_onnx:
      import onnxruntime

      onnx_path = os.path.join(out, 'model.onnx')
      seconds, done = timed(lambda: onnx_export.export_encoder_onnx(out, onnx_path))
      error = onnx_export.check_onnx(onnx_path, done.module, done.inputs)
      print(
        f'  ONNX export: {seconds:.2f} s ({done.exporter} exporter, opset {done.opset}); '
        f'onnxruntime vs PyTorch max relative error {error:.2e}'
      )
      files['model.onnx'] = os.path.getsize(onnx_path)
      options = onnxruntime.SessionOptions()
      # By default its threads spin after a run, taking the cores from the runtime timed next.
      options.add_session_config_entry('session.intra_op.allow_spinning', '0')
      session = onnxruntime.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
    for name, size in files.items():
      print(f'    {name:<26} {size / 2**20:9.2f} MiB')

    # Inference: the same encoder and inputs in each runtime.
    model = pretrained.load_pretrained(workdir)
    encoder = aasp_torch.AaSPEncoder.from_pretrained(out)
    opts = encoder.front_end.opts
    rng = np.random.default_rng(0)
    x = rng.standard_normal((clips, opts.target_length, opts.num_mel_bins)).astype(np.float32)
    x_torch = torch.from_numpy(x)
    apply = jax.jit(lambda p, v: model.encoder.apply({'params': p}, v))
    jax_out = jax.block_until_ready(apply(model.params, x))  # compile
    with torch.no_grad():
      torch_out = encoder(x_torch)
    print(
      f'  log-mel -> tokens, PyTorch vs JAX: max relative error '
      f'{rel_err(torch_out["tokens"].numpy(), jax_out["tokens"]):.2e}'
    )

    def run_torch():
      with torch.no_grad():
        return encoder(x_torch)['tokens']

    runners = {
      'JAX (jit, XLA CPU)': lambda: jax.block_until_ready(apply(model.params, x)),
      'PyTorch (eager)': run_torch,
    }
    if session is not None:
      runners['onnxruntime (CPU)'] = lambda: session.run(['tokens'], {'log_mel': x})
    report(
      'log-mel windows -> encoder', interleaved(runners, args.repeats), clips, 'JAX (jit, XLA CPU)'
    )

    waves = synthetic_waves(clips, opts.window_samples, opts.sample_rate)
    embedder = embed.Embedder(model, batch_size=clips, pooling='cls_mean')
    jax_scene = embedder.scene_embeddings(waves)  # compile
    with torch.no_grad():
      torch_scene = encoder.embed(torch.from_numpy(waves), batch_size=clips)['scene'].numpy()
    print(
      f'  waveform -> scene embedding, PyTorch vs JAX: max relative error '
      f'{rel_err(torch_scene, jax_scene):.2e}'
    )
    wave_runners = {
      'JAX (Embedder)': lambda: embedder.scene_embeddings(waves),
      'PyTorch (embed)': lambda: encoder.embed(torch.from_numpy(waves), batch_size=clips),
    }
    report(
      f'{opts.window_samples / opts.sample_rate:g} s waveforms -> scene embeddings',
      interleaved(wave_runners, args.repeats),
      clips,
      'JAX (Embedder)',
    )


if __name__ == '__main__':
  main()
