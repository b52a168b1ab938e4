"""Tiny datasets in the real download layouts of ESC-50, UrbanSound8K, NSynth, Speech Commands v2
and AudioSet, for the reader and fine-tuning tests.

  import dataset_layouts
  root = dataset_layouts.build_layout('esc50', tmp_path / 'esc50')

The metadata files are written in the released formats (ESC-50's esc50.csv, UrbanSound8K.csv,
NSynth's examples.json, the Speech Commands split lists, AudioSet's commented segment CSVs and
class_labels_indices.csv), with real class names. The audio is short synthetic WAV/FLAC: a tone per
class (log-spaced from 200 Hz to 5 kHz, so classes are far apart on the mel scale and a fine-tuned
model can separate them), a little per-clip pitch jitter and noise, and 20 ms fades.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import soundfile as sf

LAYOUT_NAMES = ('esc50', 'us8k', 'nsynth', 'spc2', 'audioset')

# Class names of the real datasets, by class id.
ESC50_CATEGORIES = (
  'dog', 'rooster', 'pig', 'cow', 'frog', 'cat', 'hen', 'insects', 'sheep', 'crow', 'rain',
  'sea_waves', 'crackling_fire', 'crickets', 'chirping_birds', 'water_drops', 'wind',
  'pouring_water', 'toilet_flush', 'thunderstorm', 'crying_baby', 'sneezing', 'clapping',
  'breathing', 'coughing', 'footsteps', 'laughing', 'brushing_teeth', 'snoring',
  'drinking_sipping', 'door_wood_knock', 'mouse_click', 'keyboard_typing', 'door_wood_creaks',
  'can_opening', 'washing_machine', 'vacuum_cleaner', 'clock_alarm', 'clock_tick',
  'glass_breaking', 'helicopter', 'chainsaw', 'siren', 'car_horn', 'engine', 'train',
  'church_bells', 'airplane', 'fireworks', 'hand_saw',
)  # fmt: skip
ESC10 = {
  'dog', 'rooster', 'rain', 'sea_waves', 'crackling_fire', 'crying_baby', 'sneezing', 'clock_tick',
  'helicopter', 'chainsaw',
}  # fmt: skip
US8K_CLASSES = (
  'air_conditioner', 'car_horn', 'children_playing', 'dog_bark', 'drilling', 'engine_idling',
  'gun_shot', 'jackhammer', 'siren', 'street_music',
)  # fmt: skip
NSYNTH_FAMILIES = (
  'bass', 'brass', 'flute', 'guitar', 'keyboard', 'mallet', 'organ', 'reed', 'string',
  'synth_lead', 'vocal',
)  # fmt: skip
SPC2_WORDS = (
  'backward', 'bed', 'bird', 'cat', 'dog', 'down', 'eight', 'five', 'follow', 'forward', 'four',
  'go', 'happy', 'house', 'learn', 'left', 'marvin', 'nine', 'no', 'off', 'on', 'one', 'right',
  'seven', 'sheila', 'six', 'stop', 'three', 'tree', 'two', 'up', 'visual', 'wow', 'yes', 'zero',
)  # fmt: skip
# The first rows of AudioSet's class_labels_indices.csv; classes past these get made-up MIDs.
AUDIOSET_CLASSES = (
  ('/m/09x0r', 'Speech'),
  ('/m/05zppz', 'Male speech, man speaking'),
  ('/m/02zsn', 'Female speech, woman speaking'),
  ('/m/0ytgt', 'Child speech, kid speaking'),
  ('/m/01h8n0', 'Conversation'),
  ('/m/02qldy', 'Narration, monologue'),
  ('/m/0261r1', 'Babbling'),
  ('/m/0brhx', 'Speech synthesizer'),
  ('/m/07p6fty', 'Shout'),
  ('/m/07q4ntr', 'Bellow'),
)
_MAX_CLASSES = {
  'esc50': len(ESC50_CATEGORIES),
  'us8k': len(US8K_CLASSES),
  'nsynth': len(NSYNTH_FAMILIES),
  'spc2': len(SPC2_WORDS),
  'audioset': 200,
}


def build_layout(
  name: str,
  root,
  clips_per_class: int = 2,
  num_classes: int = 3,
  seconds: float = 1.0,
  sample_rate: int = 16000,
) -> str:
  """Writes a tiny dataset `name` (one of LAYOUT_NAMES) in its real layout under `root`.

  Args:
    name: 'esc50', 'us8k', 'nsynth', 'spc2' or 'audioset'.
    root: the folder to create (it may exist; files in it are overwritten).
    clips_per_class: clips of each class. ESC-50 / UrbanSound8K: in all, spread over the folds
      (clip j of every class goes to fold j % 5 + 1 / j % 10 + 1, so each fold used holds every
      class). NSynth / Speech Commands: in each of the train, valid and test splits. AudioSet: in
      each of balanced_train_segments and eval_segments; every second clip of class k also carries
      class (k + 1) % num_classes and holds both tones.
    num_classes: how many classes (at most the real dataset's; AudioSet up to 200). They are spread
      over the real class ids (ESC-50: targets 0, 50 // K, 2 * (50 // K), ...), so class order by
      id differs from alphabetical order.
    seconds: length of each clip.
    sample_rate: its sample rate.

  Returns:
    `root` as an absolute path, ready for `datasets.read_dataset(name, root)`.

  Layout notes: AudioSet audio goes to audio/balanced_train_segments/<YTID>_<start>.wav (start as
  the CSV writes it, e.g. 30.000) and audio/eval_segments/<YTID>.flac; the CSV rows claim 10 s
  segments while the files hold `seconds`. Speech Commands gets a `_background_noise_` folder and
  README / LICENSE files as in the release.
  """
  if name not in LAYOUT_NAMES:
    raise ValueError(f'unknown layout {name!r}; choose one of {list(LAYOUT_NAMES)}')
  if not 1 <= num_classes <= _MAX_CLASSES[name]:
    raise ValueError(f'{name}: num_classes must be in 1..{_MAX_CLASSES[name]}, got {num_classes}')
  if clips_per_class < 1:
    raise ValueError(f'clips_per_class must be >= 1, got {clips_per_class}')
  root = os.path.abspath(os.fspath(root))
  os.makedirs(root, exist_ok=True)
  writer = _Audio(num_classes, seconds, sample_rate, seed=LAYOUT_NAMES.index(name))
  build = {
    'esc50': _esc50,
    'us8k': _us8k,
    'nsynth': _nsynth,
    'spc2': _spc2,
    'audioset': _audioset,
  }[name]
  build(root, clips_per_class, num_classes, writer)
  return root


def class_ids(num_classes: int, total: int) -> list[int]:
  """The real class ids the layouts use: spread evenly over 0..total-1."""
  step = total // num_classes
  return [k * step for k in range(num_classes)]


class _Audio:
  """Writes the synthetic clip of a class (or several classes, mixed)."""

  def __init__(self, num_classes: int, seconds: float, sample_rate: int, seed: int):
    top = min(5000.0, 0.4 * sample_rate)
    spread = np.arange(num_classes) / max(num_classes - 1, 1)
    self.frequencies = 200.0 * (top / 200.0) ** spread
    self.num_samples = max(round(seconds * sample_rate), 1)
    self.sample_rate = sample_rate
    self.rng = np.random.default_rng(seed)

  def write(self, path: str, classes, subtype: str = 'PCM_16', frequency: float | None = None):
    t = np.arange(self.num_samples) / self.sample_rate
    wave = np.zeros(self.num_samples)
    for k in np.atleast_1d(classes):
      f = frequency or self.frequencies[k] * (1 + self.rng.uniform(-0.02, 0.02))
      wave += 0.3 * np.sin(2 * np.pi * f * t + self.rng.uniform(0, 2 * np.pi))
    wave += 0.01 * self.rng.standard_normal(self.num_samples)
    fade = min(int(0.02 * self.sample_rate), self.num_samples // 2)
    if fade:
      ramp = np.linspace(0.0, 1.0, fade)
      wave[:fade] *= ramp
      wave[-fade:] *= ramp[::-1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    file_format = 'FLAC' if path.endswith('.flac') else 'WAV'
    sf.write(path, np.clip(wave, -0.99, 0.99).astype(np.float32), self.sample_rate,
             format=file_format, subtype=subtype)  # fmt: skip
    return path


def _write_csv(path: str, header, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _esc50(root, clips_per_class, num_classes, audio):
  rows = []
  for k, target in enumerate(class_ids(num_classes, len(ESC50_CATEGORIES))):
    category = ESC50_CATEGORIES[target]
    for j in range(clips_per_class):
      fold, src_file, take = j % 5 + 1, 100000 + 100 * target + j, 'ABC'[j % 3]
      filename = f'{fold}-{src_file}-{take}-{target}.wav'
      audio.write(os.path.join(root, 'audio', filename), k)
      rows.append([filename, fold, target, category, category in ESC10, src_file, take])
  rows.sort(key=lambda row: row[0])  # the released CSV is sorted by file name
  header = ['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take']
  _write_csv(os.path.join(root, 'meta', 'esc50.csv'), header, rows)


def _us8k(root, clips_per_class, num_classes, audio):
  rows = []
  for k, class_id in enumerate(class_ids(num_classes, len(US8K_CLASSES))):
    for j in range(clips_per_class):
      fold, fs_id = j % 10 + 1, 200000 + 100 * class_id + j
      slice_name = f'{fs_id}-{class_id}-0-{j}.wav'
      audio.write(os.path.join(root, 'audio', f'fold{fold}', slice_name), k)
      start = round(float(audio.rng.uniform(0, 30)), 6)
      end = round(start + float(audio.rng.uniform(0.5, 4.0)), 6)
      salience = 1 + j % 2
      rows.append([slice_name, fs_id, start, end, salience, fold, class_id, US8K_CLASSES[class_id]])
  rows.sort(key=lambda row: row[0])
  header = ['slice_file_name', 'fsID', 'start', 'end', 'salience', 'fold', 'classID', 'class']
  _write_csv(os.path.join(root, 'metadata', 'UrbanSound8K.csv'), header, rows)


def _nsynth(root, clips_per_class, num_classes, audio):
  families = class_ids(num_classes, len(NSYNTH_FAMILIES))
  sources = ('acoustic', 'electronic', 'synthetic')
  note = 0
  for split in ('train', 'valid', 'test'):
    examples = {}
    for k, family_id in enumerate(families):
      family = NSYNTH_FAMILIES[family_id]
      # The note's pitch is the MIDI note nearest to the class tone, so the metadata is consistent.
      pitch = round(69 + 12 * math.log2(audio.frequencies[k] / 440.0))
      for j in range(clips_per_class):
        source_id = j % 3
        instrument = 10 * family_id + j
        instrument_str = f'{family}_{sources[source_id]}_{instrument:03d}'
        velocity = (25, 50, 75, 100, 127)[j % 5]
        note_str = f'{instrument_str}-{pitch:03d}-{velocity:03d}'
        note += 1
        examples[note_str] = {
          'note': note,
          'note_str': note_str,
          'instrument': instrument,
          'instrument_str': instrument_str,
          'pitch': pitch,
          'velocity': velocity,
          'sample_rate': audio.sample_rate,
          'qualities': [0] * 10,
          'qualities_str': [],
          'instrument_source': source_id,
          'instrument_source_str': sources[source_id],
          'instrument_family': family_id,
          'instrument_family_str': family,
        }
        frequency = 440.0 * 2 ** ((pitch - 69) / 12)
        path = os.path.join(root, f'nsynth-{split}', 'audio', f'{note_str}.wav')
        audio.write(path, k, frequency=frequency)
    with open(os.path.join(root, f'nsynth-{split}', 'examples.json'), 'w') as f:
      json.dump(examples, f, indent=4)


def _spc2(root, clips_per_class, num_classes, audio):
  lists = {'valid': [], 'test': []}
  for k, word_id in enumerate(class_ids(num_classes, len(SPC2_WORDS))):
    word = SPC2_WORDS[word_id]
    for split in ('train', 'valid', 'test'):
      for j in range(clips_per_class):
        speaker = f'{int(audio.rng.integers(0, 2**32)):08x}'
        relpath = f'{word}/{speaker}_nohash_{j}.wav'
        audio.write(os.path.join(root, word, f'{speaker}_nohash_{j}.wav'), k)
        if split != 'train':
          lists[split].append(relpath)
  for split, filename in (('valid', 'validation_list.txt'), ('test', 'testing_list.txt')):
    with open(os.path.join(root, filename), 'w') as f:
      f.writelines(f'{p}\n' for p in sorted(lists[split]))
  noise = os.path.join(root, '_background_noise_', 'white_noise.wav')
  os.makedirs(os.path.dirname(noise), exist_ok=True)
  sf.write(noise, 0.1 * audio.rng.standard_normal(audio.num_samples), audio.sample_rate)
  for name in ('_background_noise_/README.md', 'README.md', 'LICENSE'):
    with open(os.path.join(root, name), 'w') as f:
      f.write('Speech Commands v0.02 test fixture.\n')


def _audioset(root, clips_per_class, num_classes, audio):
  classes = list(AUDIOSET_CLASSES[:num_classes])
  classes += [
    (f'/t/fixture{k:03d}', f'Fixture sound {k}') for k in range(len(classes), num_classes)
  ]
  _write_csv(
    os.path.join(root, 'class_labels_indices.csv'),
    ['index', 'mid', 'display_name'],
    [[i, mid, name] for i, (mid, name) in enumerate(classes)],
  )
  alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  for stem, pattern in (
    ('balanced_train_segments', '{ytid}_{start}.wav'),
    ('eval_segments', '{ytid}.flac'),
  ):
    lines, labels_seen, num_positive = [], set(), 0
    for k in range(num_classes):
      for j in range(clips_per_class):
        ytid = ''.join(audio.rng.choice(list(alphabet), 11))
        start = f'{10 * int(audio.rng.integers(0, 30)):.3f}'
        end = f'{float(start) + 10:.3f}'
        labels = [k] if j % 2 == 0 or num_classes == 1 else [k, (k + 1) % num_classes]
        labels_seen.update(labels)
        num_positive += len(labels)
        mids = ','.join(classes[i][0] for i in labels)
        lines.append(f'{ytid}, {start}, {end}, "{mids}"\n')
        path = os.path.join(root, 'audio', stem, pattern.format(ytid=ytid, start=start))
        audio.write(path, labels)
    header = [
      '# Segments csv created Sun Mar  5 10:54:31 2017\n',
      f'# num_ytids={len(lines)}, num_segs={len(lines)}, '
      + f'num_unique_labels={len(labels_seen)}, num_positive_labels={num_positive}\n',
      '# YTID, start_seconds, end_seconds, positive_labels\n',
    ]
    with open(os.path.join(root, f'{stem}.csv'), 'w') as f:
      f.writelines(header + lines)
