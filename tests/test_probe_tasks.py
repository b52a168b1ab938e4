"""The probe tasks (data/*/task.csv) are well formed and grouped as their READMEs say, and the
GM-instruments builder's SoundFont parser reads a small SF2 that this test writes itself, and the
benchmark's SoundFont note renderer (benchmarks/soundfont_notes.py) plays it at the right pitch.
"""

import collections
import importlib.util
import os
import re
import struct
import sys

import numpy as np
import pytest
import soundfile as sf

from aasp_jax.data import manifest
from conftest import REPO_ROOT

SONICPI = os.path.join(REPO_ROOT, 'data', 'sonicpi')
GM = os.path.join(REPO_ROOT, 'data', 'gm_instruments')
TASKS = {'sonicpi': SONICPI, 'gm_instruments': GM}
# sonicpi's `mehackit` is two sound families (phone 1-4, robot 1-7) from one uploader; numbered
# variants share a group, so it has 2 (README "task.csv"). Every other class has at least 3.
FEWER_GROUPS = {'sonicpi': {'mehackit': 2}, 'gm_instruments': {}}
GM_FAMILIES = {'keyboard', 'mallet', 'organ', 'guitar', 'bass', 'string', 'brass', 'reed', 'flute'}


def load_builder():
  """data/gm_instruments/build.py as a module (it is a script, not part of the package)."""
  name = 'gm_instruments_build'
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(GM, 'build.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
  return sys.modules[name]


@pytest.fixture(scope='module', params=sorted(TASKS))
def task(request):
  return request.param, manifest.read_manifest(os.path.join(TASKS[request.param], 'task.csv'))


def test_task_is_well_formed_and_groups_never_span_classes(task):
  name, entries = task
  assert entries
  label_of_group = {}
  groups_of_class = collections.defaultdict(set)
  for e in entries:
    assert os.path.isfile(e.path), e.path
    assert os.path.dirname(e.path) == os.path.join(TASKS[name], 'audio'), e.path
    assert len(e.labels) == 1 and e.labels[0], e.clip_id
    assert e.group, e.clip_id
    assert label_of_group.setdefault(e.group, e.labels[0]) == e.labels[0], e.group
    groups_of_class[e.labels[0]].add(e.group)
  assert len({e.path for e in entries}) == len(entries)
  for label, groups in groups_of_class.items():
    assert len(groups) >= FEWER_GROUPS[name].get(label, 3), (label, sorted(groups))


def test_sonicpi_task_is_the_probe_clips_with_their_labels():
  entries = manifest.read_manifest(os.path.join(SONICPI, 'task.csv'))
  probe = manifest.read_manifest(os.path.join(SONICPI, 'probe_train.csv'))
  probe += manifest.read_manifest(os.path.join(SONICPI, 'probe_test.csv'))
  assert sorted((e.path, e.labels) for e in entries) == sorted((e.path, e.labels) for e in probe)
  assert len(entries) == 167 and len({e.labels[0] for e in entries}) == 10


def test_sonicpi_variants_of_one_sound_share_a_group():
  """Independently of build.py: names that differ only by a take number or a dynamics / drum pitch
  / hi-hat-state word, and the two Amen breaks, are in one group."""
  entries = manifest.read_manifest(os.path.join(SONICPI, 'task.csv'))
  group = {os.path.basename(e.path)[: -len('.flac')]: e.group for e in entries}
  variant = re.compile(r'_(soft|hard|hi|mid|lo|open|closed|pedal)(?=_|$)')
  families = collections.defaultdict(set)
  for stem in group:
    families[re.sub(r'_?[0-9]+$', '', variant.sub('', stem))].add(stem)
  for family, stems in families.items():
    assert len({group[s] for s in stems}) == 1, (family, {s: group[s] for s in stems})
  assert len({group[s] for s in group if s.startswith('drum_tom_')}) == 1
  assert group['loop_amen'] == group['loop_amen_full']
  assert group['mehackit_robot1'] == group['mehackit_robot7']
  # PROVENANCE.md gives tabla_re and tabla_tas1 the same Freesound sound.
  assert group['tabla_re'] == group['tabla_tas1']


def test_gm_clips_are_short_16khz_mono_flac_and_the_folder_is_small():
  entries = manifest.read_manifest(os.path.join(GM, 'task.csv'))
  assert {e.labels[0] for e in entries} == GM_FAMILIES
  audio = os.path.join(GM, 'audio')
  assert sorted(os.listdir(audio)) == sorted(os.path.basename(e.path) for e in entries)
  for e in entries:
    info = sf.info(e.path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
      'FLAC', 'PCM_16', 16000, 1,
    ), e.path  # fmt: skip
    assert 0.25 <= info.duration <= 2.0, e.path
  assert sum(os.path.getsize(e.path) for e in entries) <= 10_000_000
  with open(os.path.join(GM, 'LICENSE'), encoding='utf-8') as f:
    assert 'MIT license' in f.read()


def test_gm_group_is_the_lowest_program_of_its_sample_set():
  """File names start with the GM program; a group is named after its lowest program, which is in
  the same family (programs are numbered family by family)."""
  builder = load_builder()
  for e in manifest.read_manifest(os.path.join(GM, 'task.csv')):
    program = int(os.path.basename(e.path)[:3])
    root = int(re.match(r'gm([0-9]{3})_', e.group).group(1))
    assert root <= program
    assert builder.family_of(program) == builder.family_of(root) == e.labels[0], e.path


# -------------------------------------------------------------------------------------------------
# A synthetic SoundFont, written here from the SF2 2.04 layout (not with build.py's code).


def chunk(cid: bytes, data: bytes) -> bytes:
  return cid + struct.pack('<I', len(data)) + data + (b'\0' if len(data) % 2 else b'')


def riff_list(kind: bytes, *chunks: bytes) -> bytes:
  return chunk(b'LIST', kind + b''.join(chunks))


def name20(text: str) -> bytes:
  return text.encode('latin-1').ljust(20, b'\0')


def zones_to_bags(zones):
  """(bag records, gen records) for a list of zones (each a list of (oper, amount))."""
  bags, gens = [], []
  for zone in zones:
    bags.append(struct.pack('<HH', len(gens), 0))
    gens += [struct.pack('<HH', oper, amount) for oper, amount in zone]
  return bags, gens


def write_sf2(path, presets, instruments, samples, pcm):
  """presets: (name, program, bank, zones); instruments: (name, zones); samples: shdr tuples."""
  phdr, pbag, pgen = b'', [], []
  for name, program, bank, zones in presets:
    phdr += struct.pack('<20sHHHIII', name20(name), program, bank, len(pbag), 0, 0, 0)
    bags, gens = zones_to_bags(zones)
    pbag += [struct.pack('<HH', struct.unpack('<HH', b)[0] + len(pgen), 0) for b in bags]
    pgen += gens
  phdr += struct.pack('<20sHHHIII', name20('EOP'), 0, 0, len(pbag), 0, 0, 0)
  pbag.append(struct.pack('<HH', len(pgen), 0))
  pgen.append(struct.pack('<HH', 0, 0))
  inst, ibag, igen = b'', [], []
  for name, zones in instruments:
    inst += struct.pack('<20sH', name20(name), len(ibag))
    bags, gens = zones_to_bags(zones)
    ibag += [struct.pack('<HH', struct.unpack('<HH', b)[0] + len(igen), 0) for b in bags]
    igen += gens
  inst += struct.pack('<20sH', name20('EOI'), len(ibag))
  ibag.append(struct.pack('<HH', len(igen), 0))
  igen.append(struct.pack('<HH', 0, 0))
  shdr = b''.join(struct.pack('<20sIIIIIBbHH', name20(s[0]), *s[1:]) for s in samples)
  shdr += struct.pack('<20sIIIIIBbHH', name20('EOS'), 0, 0, 0, 0, 0, 0, 0, 0, 0)
  body = b'sfbk' + riff_list(
    b'INFO', chunk(b'ifil', struct.pack('<HH', 2, 4)), chunk(b'INAM', b'test\0')
  )
  body += riff_list(b'sdta', chunk(b'smpl', pcm.astype('<i2').tobytes()))
  body += riff_list(
    b'pdta',
    chunk(b'phdr', phdr),
    chunk(b'pbag', b''.join(pbag)),
    chunk(b'pmod', b'\0' * 10),
    chunk(b'pgen', b''.join(pgen)),
    chunk(b'inst', inst),
    chunk(b'ibag', b''.join(ibag)),
    chunk(b'imod', b'\0' * 10),
    chunk(b'igen', b''.join(igen)),
    chunk(b'shdr', shdr),
  )
  with open(path, 'wb') as f:
    f.write(b'RIFF' + struct.pack('<I', len(body)) + body)


KEYS, INST, SAMPLE, ATTEN = 43, 41, 53, 48


@pytest.fixture(scope='module')
def synthetic_sf2(tmp_path_factory):
  path = tmp_path_factory.mktemp('sf2') / 'tiny.sf2'
  rng = np.random.default_rng(0)
  pcm = (rng.standard_normal(20_000) * 3000).astype(np.int16)
  # name, start, end, loop start, loop end, rate, pitch, correction, link, type
  samples = [
    ('Piano C4(L)', 0, 4000, 3000, 3900, 8000, 60, 0, 0, 4),  # 0.5 s, left channel
    ('Piano C4(R)', 4000, 8000, 7000, 7900, 8000, 60, 0, 0, 2),  # its right channel
    ('Piano C6', 8000, 9000, 8100, 8600, 16000, 84, 0, 0, 1),  # 62.5 ms, looped: extended
    ('Violin G3', 9000, 15000, 14000, 14800, 32000, 55, -3, 0, 1),
    ('ROM Bell', 0, 100, 0, 50, 22050, 72, 0, 0, 0x8001),
  ]
  instruments = [
    ('Piano', [[(ATTEN, 10)], [(KEYS, 0 | 71 << 8), (SAMPLE, 0)], [(KEYS, 0 | 71 << 8), (SAMPLE, 1)],
               [(KEYS, 72 | 127 << 8), (SAMPLE, 2)]]),
    ('Violin', [[(KEYS, 55 | 100 << 8), (SAMPLE, 3)]]),
    ('Bell', [[(SAMPLE, 4)]]),
  ]  # fmt: skip
  presets = [
    ('Grand', 0, 0, [[(ATTEN, 5)], [(KEYS, 0 | 127 << 8), (INST, 0)]]),
    ('Bright', 1, 0, [[(INST, 0)]]),
    ('Violin', 40, 0, [[(INST, 1)]]),
    ('Bells', 14, 0, [[(INST, 2)]]),
    ('Kit', 0, 128, [[(INST, 2)]]),
  ]
  write_sf2(path, presets, instruments, samples, pcm)
  return path, pcm


def test_sf2_parser_reads_presets_instruments_and_samples(synthetic_sf2):
  builder = load_builder()
  path, pcm = synthetic_sf2
  font = builder.parse_sf2(path)
  assert [(p.name, p.program, p.bank, p.instruments) for p in font.presets] == [
    ('Grand', 0, 0, (0,)),
    ('Bright', 1, 0, (0,)),
    ('Violin', 40, 0, (1,)),
    ('Bells', 14, 0, (2,)),
    ('Kit', 0, 128, (2,)),
  ]
  assert [i.name for i in font.instruments] == ['Piano', 'Violin', 'Bell']
  assert [(z.sample, z.key_lo, z.key_hi) for z in font.instruments[0].zones] == [
    (0, 0, 71), (1, 0, 71), (2, 72, 127),
  ]  # fmt: skip
  assert [(z.sample, z.key_lo, z.key_hi) for z in font.instruments[2].zones] == [(4, 0, 127)]
  violin = font.samples[3]
  assert (violin.name, violin.start, violin.end, violin.loop_start, violin.loop_end) == (
    'Violin G3', 9000, 15000, 14000, 14800,
  )  # fmt: skip
  assert (violin.sample_rate, violin.original_pitch, violin.sample_type) == (32000, 55, 1)
  assert [s.sample_type for s in font.samples] == [4, 2, 1, 1, 0x8001]
  assert font.smpl_frames == len(pcm)
  with open(path, 'rb') as f:
    f.seek(font.smpl_offset + 2 * 9000)
    assert np.array_equal(np.frombuffer(f.read(8), '<i2'), pcm[9000:9004])
    # A short looped sample is extended by repeating its loop to LOOP_FILL_SECONDS.
    wave = builder.read_sample(f, font, font.samples[2])
    assert len(wave) == int(builder.LOOP_FILL_SECONDS * 16000)
    np.testing.assert_array_equal(wave[:600], pcm[8000:8600] / 32768.0)
    np.testing.assert_array_equal(wave[600:1100], pcm[8100:8600] / 32768.0)


def test_sf2_selection_skips_right_and_rom_samples_and_groups_shared_samples(
  synthetic_sf2, monkeypatch
):
  builder = load_builder()
  path, _ = synthetic_sf2
  font = builder.parse_sf2(path)
  monkeypatch.setattr(builder, 'MIN_GROUPS', 1)
  clips, dropped = builder.select_clips(font)
  assert not dropped
  # Program 1 shares the piano samples with program 0: one group, and each sample is one clip.
  assert [(c.program, c.sample.name, c.family, c.group) for c in clips] == [
    (0, 'Piano C4(L)', 'keyboard', 'gm000_grand'),
    (0, 'Piano C6', 'keyboard', 'gm000_grand'),
    (40, 'Violin G3', 'string', 'gm040_violin'),
  ]
  monkeypatch.setattr(builder, 'MIN_GROUPS', 2)
  clips, dropped = builder.select_clips(font)
  assert clips == [] and dropped == {'keyboard': ['gm000_grand'], 'string': ['gm040_violin']}


def load_notes():
  """benchmarks/soundfont_notes.py (the in-domain pre-training notes; a script) as a module."""
  name = 'soundfont_notes'
  if name not in sys.modules:
    path = os.path.join(REPO_ROOT, 'benchmarks', 'soundfont_notes.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def test_soundfont_notes_pick_one_zone_per_key_skip_right_and_rom_and_dedupe(synthetic_sf2):
  notes = load_notes()
  font = notes.gm.parse_sf2(synthetic_sf2[0])
  # Sorted by (bank, program): Grand 0, Bright 1 (the same piano: nothing new), Bells 14 (ROM:
  # nothing), Violin 40 (keys 55..100), Kit 128 (its only sample is ROM). The right channel
  # (sample 1) never plays; keys above 71 take the C6 zone.
  keys = notes.KEYS
  expected = [(0, k) for k in keys if k <= 71] + [(2, k) for k in keys if k >= 72]
  expected += [(3, k) for k in keys if 55 <= k <= 100]
  assert notes.notes_of(font) == expected


def test_soundfont_note_is_the_sample_transposed_by_resampling(tmp_path):
  """A stored 440 Hz sine (root key 69, 8 kHz, looped over whole cycles) rendered at key 81 and 57
  sounds at 880 and 220 Hz, lasts NOTE_SECONDS at 16 kHz and fades to silence."""
  notes = load_notes()
  rate, cycles = 8000, 44  # 44 cycles of 440 Hz = 800 frames exactly
  t = np.arange(4000) / rate
  pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
  path = tmp_path / 'sine.sf2'
  samples = [('Sine A4', 0, 4000, 4000 - cycles * rate // 440, 4000, rate, 69, 0, 0, 1)]
  write_sf2(path, [('Sine', 80, 0, [[(INST, 0)]])], [('Sine', [[(SAMPLE, 0)]])], samples, pcm)
  font = notes.gm.parse_sf2(path)
  with open(path, 'rb') as f:
    for key, hz in ((81, 880.0), (57, 220.0), (None, 440.0)):
      wave = notes.render(f, font, font.samples[0], key)
      assert len(wave) == int(notes.NOTE_SECONDS * 16000)
      assert wave[-1] == 0.0 and np.abs(wave[:8000]).max() > 0.3
      spectrum = np.abs(np.fft.rfft(wave[:16000] * np.hanning(16000)))
      assert abs(np.argmax(spectrum) - hz) <= 1.0  # 1 Hz bins


def test_soundfont_overlap_check_finds_a_shifted_scaled_copy_and_not_other_audio():
  notes = load_notes()
  rng = np.random.default_rng(1)
  n = int(notes.OVERLAP_SECONDS * 16000)
  refs = np.stack([notes._unit(rng.standard_normal(n), n) for _ in range(4)])
  copy = -0.2 * np.concatenate([np.zeros(30), refs[2] * 7.0])  # shifted, scaled, inverted
  corr = notes.max_correlation(notes._unit(copy, n), refs)
  assert corr[2] > 0.99 and np.all(np.delete(corr, 2) < 0.1)
  assert notes.max_correlation(notes._unit(rng.standard_normal(n), n), refs).max() < 0.1
