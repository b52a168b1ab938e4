"""Builds the GM instrument-family probe task (task.csv + 16 kHz FLACs) from a General MIDI SoundFont.

Source: Debian's `fluid-soundfont-gm` (FluidR3_GM.sf2, MIT licence; see README.md and LICENSE). The
SoundFont's own samples are real instrument recordings; every clip here is one of those samples
played back as stored (no synthesis, envelopes or filters), so the task is NSynth-like: which GM
instrument family does a single note come from.

Steps (all deterministic; every list is sorted before it is used):

1. Parse the SF2 RIFF (`parse_sf2`): presets (phdr/pbag/pgen -> instrument ids, generator 41),
   instruments (inst/ibag/igen -> sample ids, generator 53, with key ranges, generator 43) and
   sample headers (shdr). Global zones (no instrument / no sample) are skipped.
2. Keep the bank-0 presets whose GM program is in a family of FAMILIES and not in
   EXCLUDED_PROGRAMS. A program's samples are its instruments' zones' samples, minus ROM samples and
   right channels of stereo pairs (sampleType 2; FluidR3's wSampleLink fields are all 0, so pairs
   cannot be merged reliably: the left channel, sampleType 4, stands for the pair).
3. Group: programs that share any sample are one group (connected components), named after its
   lowest program (`gm044_tremolo`), so identical samples never straddle a split. The build fails if
   a group spans two families. Families with fewer than MIN_GROUPS groups are dropped.
4. Subsample: per program (ascending), its samples sorted by (lowest key, name, index), at most
   MAX_PER_PROGRAM of them evenly spread over that list (first and last included); a sample already
   chosen for a lower program of the group is not repeated (one clip per sample).
5. Clip: the sample's frames from start to end; one shorter than MIN_SECONDS with a loop is extended
   by repeating its loop up to LOOP_FILL_SECONDS; cut at MAX_SECONDS; resampled to 16 kHz with soxr
   'HQ' (the quality of `aasp_jax.audio.decode`'s 'soxr_hq'), quantised with
   `aasp_jax.data.records.to_int16` and written as 16-bit mono FLAC (level 8). File names:
   `<program>_<preset>__<sample index>_<sample name>.flac`.

Usage (from the repository root; needs `apt-get download`, or an extracted FluidR3_GM.sf2):

  python data/gm_instruments/build.py                      # apt-get download + extract to a tmp dir
  python data/gm_instruments/build.py --deb fluid-soundfont-gm_3.1-5.3_all.deb
  python data/gm_instruments/build.py --sf2 /usr/share/sounds/sf2/FluidR3_GM.sf2
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import glob
import hashlib
import os
import struct
import subprocess
import sys
import tempfile

PACKAGE = 'fluid-soundfont-gm'
PACKAGE_VERSION = '3.1-5.3'
DEB_SHA256 = '6f531493ac4e4d9772fd96b2488ea1790af81c196135fbdd25997da0781fc60e'
SF2_IN_DEB = 'usr/share/sounds/sf2/FluidR3_GM.sf2'
COPYRIGHT_IN_DEB = 'usr/share/doc/fluid-soundfont-gm/copyright'

SAMPLE_RATE = 16000
MAX_PER_PROGRAM = 8
MIN_SECONDS = 0.5
LOOP_FILL_SECONDS = 1.0
MAX_SECONDS = 1.2

# GM program ranges (0-based) -> family, as in the GM 1 sound set's instrument groups. Left out:
# 55 orchestra hit, 80-87 synth leads, 88-95 pads, 96-103 synth effects, 104-111 ethnic, 112-119
# percussive, 120-127 sound effects and bank 128 (drum kits): synthetic, mixed or not one family.
FAMILIES = (
  ('keyboard', range(0, 8)),
  ('mallet', range(8, 16)),
  ('organ', range(16, 24)),  # incl. accordion, harmonica, bandoneon (GM's organ group)
  ('guitar', range(24, 32)),
  ('bass', range(32, 40)),
  ('string', range(40, 52)),  # solo strings, tremolo, pizzicato, harp, string ensembles
  ('vocal', range(52, 55)),
  ('brass', range(56, 64)),
  ('reed', range(64, 72)),
  ('flute', range(72, 80)),
)
# Programs left out of their family: GM's synthesiser programs (FluidR3 plays most of them from
# single-cycle oscillator waves, and their samples are shared with synth leads; not real instrument
# recordings) and 47 timpani (a drum in GM's string group).
EXCLUDED_PROGRAMS = frozenset({38, 39, 47, 50, 51, 54, 62, 63})
# A family needs this many groups to stay in the task (a 5-fold group split needs several groups per
# class); with the exclusions, 'vocal' (52 Ahh Choir, 53 Ohh Voices) has 2 and is dropped.
MIN_GROUPS = 3

# SF2 2.04 generator operators and sample types used here.
GEN_INSTRUMENT = 41
GEN_KEY_RANGE = 43
GEN_SAMPLE_ID = 53
SAMPLE_MONO, SAMPLE_RIGHT, SAMPLE_LEFT, SAMPLE_LINKED = 1, 2, 4, 8
SAMPLE_ROM = 0x8000


def family_of(program: int) -> str | None:
  """The program's family, or None for a program that is not part of the task."""
  if program in EXCLUDED_PROGRAMS:
    return None
  for name, programs in FAMILIES:
    if program in programs:
      return name
  return None


# ---------------------------------------------------------------------------------------------
# SF2 parsing


@dataclasses.dataclass(frozen=True)
class Sample:
  """One shdr record; start/end/loops are sample-frame indices into the smpl chunk."""

  index: int
  name: str
  start: int
  end: int
  loop_start: int
  loop_end: int
  sample_rate: int
  original_pitch: int
  link: int
  sample_type: int


@dataclasses.dataclass(frozen=True)
class Zone:
  """An instrument zone: a sample id and the key range it plays (inclusive)."""

  sample: int
  key_lo: int = 0
  key_hi: int = 127


@dataclasses.dataclass(frozen=True)
class Instrument:
  name: str
  zones: tuple[Zone, ...]


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  program: int
  bank: int
  instruments: tuple[int, ...]  # instrument ids of its zones, in file order


@dataclasses.dataclass(frozen=True)
class SoundFont:
  presets: tuple[Preset, ...]
  instruments: tuple[Instrument, ...]
  samples: tuple[Sample, ...]
  smpl_offset: int  # byte offset of the smpl chunk's data in the file
  smpl_frames: int


def _name(raw: bytes) -> str:
  return raw.split(b'\0', 1)[0].decode('latin-1').strip()


def _chunks(data: bytes, start: int, end: int):
  """(id, data offset, size) of the RIFF sub-chunks in data[start:end]."""
  pos = start
  while pos + 8 <= end:
    cid, size = struct.unpack_from('<4sI', data, pos)
    yield cid, pos + 8, size
    pos += 8 + size + (size & 1)


def _records(data: bytes, offset: int, size: int, fmt: str) -> list[tuple]:
  rec = struct.calcsize(fmt)
  if size % rec:
    raise ValueError(f'SF2 chunk of {size} bytes is not a whole number of {rec}-byte records')
  return [struct.unpack_from(fmt, data, offset + i * rec) for i in range(size // rec)]


def _zone_generators(bags, gens, first: int, last: int) -> list[dict[int, int]]:
  """The generators (oper -> raw 16-bit amount) of bag records first..last-1."""
  zones = []
  for b in range(first, last):
    g0, g1 = bags[b][0], bags[b + 1][0]
    zones.append({oper: amount for oper, amount in gens[g0:g1]})
  return zones


def parse_sf2(path: str | os.PathLike) -> SoundFont:
  """Parses the preset, instrument and sample headers of an SF2 file (sample data is not read)."""
  with open(path, 'rb') as f:
    head = f.read(12)
    riff, riff_size, form = struct.unpack('<4sI4s', head)
    if riff != b'RIFF' or form != b'sfbk':
      raise ValueError(f'{path}: not a SoundFont 2 file')
    # Read only the list headers and the pdta list; the sample data can be 100+ MB.
    lists = {}
    pos = 12
    end = 8 + riff_size
    while pos + 12 <= end:
      f.seek(pos)
      cid, size, kind = struct.unpack('<4sI4s', f.read(12))
      if cid == b'LIST':
        lists[kind] = (pos + 12, size - 4)
      pos += 8 + size + (size & 1)
    if b'sdta' not in lists or b'pdta' not in lists:
      raise ValueError(f'{path}: no sdta or pdta list')
    sdta_start, sdta_size = lists[b'sdta']
    smpl_offset = smpl_frames = None
    spos = sdta_start
    while spos + 8 <= sdta_start + sdta_size:
      f.seek(spos)
      cid, size = struct.unpack('<4sI', f.read(8))
      if cid == b'smpl':
        smpl_offset, smpl_frames = spos + 8, size // 2
        break
      spos += 8 + size + (size & 1)
    if smpl_offset is None:
      raise ValueError(f'{path}: no smpl chunk')
    pdta_start, pdta_size = lists[b'pdta']
    f.seek(pdta_start)
    pdta = f.read(pdta_size)

  sub = {cid: (off, size) for cid, off, size in _chunks(pdta, 0, len(pdta))}
  missing = [
    c for c in (b'phdr', b'pbag', b'pgen', b'inst', b'ibag', b'igen', b'shdr') if c not in sub
  ]
  if missing:
    raise ValueError(f'{path}: pdta lacks {missing}')
  phdr = _records(pdta, *sub[b'phdr'], '<20sHHHIII')
  pbag = _records(pdta, *sub[b'pbag'], '<HH')
  pgen = _records(pdta, *sub[b'pgen'], '<HH')
  inst = _records(pdta, *sub[b'inst'], '<20sH')
  ibag = _records(pdta, *sub[b'ibag'], '<HH')
  igen = _records(pdta, *sub[b'igen'], '<HH')
  shdr = _records(pdta, *sub[b'shdr'], '<20sIIIIIBbHH')

  samples = tuple(
    Sample(i, _name(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[8], r[9])
    for i, r in enumerate(shdr[:-1])  # the last record is the terminal 'EOS'
  )
  instruments = []
  for i in range(len(inst) - 1):  # the last record is the terminal 'EOI'
    zones = []
    for gens in _zone_generators(ibag, igen, inst[i][1], inst[i + 1][1]):
      if GEN_SAMPLE_ID not in gens:
        continue  # a global zone (or an empty one) plays no sample
      key_range = gens.get(GEN_KEY_RANGE, 127 << 8)
      zones.append(Zone(gens[GEN_SAMPLE_ID], key_range & 0xFF, key_range >> 8))
    instruments.append(Instrument(_name(inst[i][0]), tuple(zones)))
  presets = []
  for i in range(len(phdr) - 1):  # the last record is the terminal 'EOP'
    name, program, bank, bag = _name(phdr[i][0]), phdr[i][1], phdr[i][2], phdr[i][3]
    ids = tuple(
      gens[GEN_INSTRUMENT]
      for gens in _zone_generators(pbag, pgen, bag, phdr[i + 1][3])
      if GEN_INSTRUMENT in gens
    )
    presets.append(Preset(name, program, bank, ids))
  return SoundFont(tuple(presets), tuple(instruments), samples, smpl_offset, smpl_frames)


def preset_samples(sf2: SoundFont, preset: Preset) -> list[tuple[int, int, int]]:
  """(key_lo, key_hi, sample id) of every zone of the preset's instruments, sorted, deduplicated."""
  out = set()
  for inst_id in preset.instruments:
    for z in sf2.instruments[inst_id].zones:
      out.add((z.key_lo, z.key_hi, z.sample))
  return sorted(out)


# ---------------------------------------------------------------------------------------------
# Selection: programs -> families, groups and clips


@dataclasses.dataclass(frozen=True)
class Clip:
  program: int
  preset: str
  family: str
  group: str
  sample: Sample
  key_lo: int


def slug(text: str) -> str:
  out = ''.join(c.lower() if c.isalnum() else '_' for c in text)
  return '_'.join(filter(None, out.split('_'))) or 'x'


def clip_name(clip: Clip) -> str:
  s = clip.sample
  return f'{clip.program:03d}_{slug(clip.preset)}__{s.index:04d}_{slug(s.name)}.flac'


def program_samples(sf2: SoundFont, preset: Preset) -> list[tuple[int, Sample]]:
  """(lowest key, sample) of the preset's playable samples, by (key, name, index).

  Right channels of stereo pairs (sampleType 2) and ROM samples are left out; FluidR3's stereo
  samples carry no usable wSampleLink (all 0), so the left channel stands for the pair.
  """
  lowest = {}
  for key_lo, _, sid in preset_samples(sf2, preset):
    s = sf2.samples[sid]
    if s.sample_type & SAMPLE_ROM or s.sample_type & SAMPLE_RIGHT or s.end <= s.start:
      continue
    lowest[sid] = min(key_lo, lowest.get(sid, 128))
  return sorted(
    ((key, sf2.samples[sid]) for sid, key in lowest.items()),
    key=lambda t: (t[0], t[1].name, t[1].index),
  )


def spread(items: list, n: int) -> list:
  """At most n items, evenly spaced over the list (first and last included)."""
  if len(items) <= n:
    return list(items)
  if n == 1:
    return [items[len(items) // 2]]
  return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def select_clips(sf2: SoundFont, max_per_program: int = MAX_PER_PROGRAM) -> tuple[list[Clip], dict]:
  """The task's clips (sorted by program, key) and {family: sorted group names} of dropped families.

  Groups are the connected components of "programs share a sample" over the kept bank-0 programs.
  """
  presets = sorted(
    (p for p in sf2.presets if p.bank == 0 and family_of(p.program) is not None),
    key=lambda p: p.program,
  )
  if len({p.program for p in presets}) != len(presets):
    raise ValueError('two bank-0 presets with one program number')
  samples_of = {p.program: program_samples(sf2, p) for p in presets}
  presets = [p for p in presets if samples_of[p.program]]  # e.g. only ROM samples: not a group
  parent = {p.program: p.program for p in presets}

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  first_user = {}
  for p in presets:
    for _, s in samples_of[p.program]:
      if s.index in first_user:
        a, b = find(first_user[s.index]), find(p.program)
        parent[max(a, b)] = min(a, b)  # the root is always the component's lowest program
      else:
        first_user[s.index] = p.program
  name_of = {p.program: p.name for p in presets}
  group_of = {}
  for p in presets:
    root = find(p.program)
    group_of[p.program] = f'gm{root:03d}_{slug(name_of[root])}'
    if family_of(root) != family_of(p.program):
      raise ValueError(
        f'group {group_of[p.program]} spans families {family_of(root)} and {family_of(p.program)}'
      )
  groups_per_family = collections.defaultdict(set)
  for p in presets:
    groups_per_family[family_of(p.program)].add(group_of[p.program])
  dropped = {f: sorted(g) for f, g in groups_per_family.items() if len(g) < MIN_GROUPS}

  clips, used = [], set()
  for p in presets:
    family = family_of(p.program)
    if family in dropped:
      continue
    for key, s in spread(samples_of[p.program], max_per_program):
      if s.index in used:
        continue  # the same sample chosen for a lower program of the group: one clip is enough
      used.add(s.index)
      clips.append(Clip(p.program, p.name, family, group_of[p.program], s, key))
  return clips, dropped


# ---------------------------------------------------------------------------------------------
# Audio


def read_sample(f, sf2: SoundFont, s: Sample):
  """The sample's frames start..end as float32 in [-1, 1), extended by its loop if it is short."""
  import numpy as np

  if not 0 <= s.start < s.end <= sf2.smpl_frames:
    raise ValueError(f'sample {s.index} {s.name!r}: frames {s.start}..{s.end} outside smpl')
  f.seek(sf2.smpl_offset + 2 * s.start)
  data = np.frombuffer(f.read(2 * (s.end - s.start)), dtype='<i2').astype(np.float32) / 32768.0
  loop_ok = s.start <= s.loop_start < s.loop_end <= s.end and s.loop_end - s.loop_start >= 2
  if len(data) < MIN_SECONDS * s.sample_rate and loop_ok:
    head = data[: s.loop_end - s.start]
    loop = data[s.loop_start - s.start : s.loop_end - s.start]
    want = int(LOOP_FILL_SECONDS * s.sample_rate)
    repeats = max(0, -(-(want - len(head)) // len(loop)))
    data = np.concatenate([head] + [loop] * repeats)[: max(want, len(head))]
  return data[: int(MAX_SECONDS * s.sample_rate)]


def write_clip(wave, rate: int, path: str) -> int:
  """Resamples to SAMPLE_RATE, writes 16-bit FLAC; returns how many samples were clipped."""
  import soundfile as sf
  import soxr

  from aasp_jax.data import records

  if rate != SAMPLE_RATE:
    wave = soxr.resample(wave, rate, SAMPLE_RATE, quality='HQ')
  clipped = records.count_clipped(wave)
  sf.write(
    path,
    records.to_int16(wave),
    SAMPLE_RATE,
    subtype='PCM_16',
    format='FLAC',
    compression_level=1.0,
  )
  return clipped


# ---------------------------------------------------------------------------------------------
# Source and outputs


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def extract_deb(deb: str, into: str) -> tuple[str, str]:
  """Checks the .deb's sha256, extracts it; returns (sf2 path, copyright path)."""
  digest = sha256_of(deb)
  if digest != DEB_SHA256:
    raise ValueError(f'{deb}: sha256 {digest}, expected {DEB_SHA256} ({PACKAGE} {PACKAGE_VERSION})')
  subprocess.run(['dpkg-deb', '-x', deb, into], check=True)
  return os.path.join(into, SF2_IN_DEB), os.path.join(into, COPYRIGHT_IN_DEB)


def download_deb(into: str) -> str:
  subprocess.run(['apt-get', 'download', f'{PACKAGE}={PACKAGE_VERSION}'], check=True, cwd=into)
  (deb,) = glob.glob(os.path.join(into, f'{PACKAGE}_*.deb'))
  return deb


def build(sf2_path: str, out: str, copyright_path: str | None = None) -> None:
  sf2 = parse_sf2(sf2_path)
  clips, dropped = select_clips(sf2)
  audio_out = os.path.join(out, 'audio')
  os.makedirs(audio_out, exist_ok=True)
  names = [clip_name(c) for c in clips]
  if len(set(names)) != len(names):
    raise ValueError('two clips with one file name')
  for stale in sorted(set(os.listdir(audio_out)) - set(names)):
    os.remove(os.path.join(audio_out, stale))
  clipped = {}
  with open(sf2_path, 'rb') as f:
    for clip, name in zip(clips, names):
      n = write_clip(
        read_sample(f, sf2, clip.sample), clip.sample.sample_rate, os.path.join(audio_out, name)
      )
      if n:
        clipped[name] = n
  with open(os.path.join(out, 'task.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path', 'label', 'group'])
    for clip, name in zip(clips, names):
      writer.writerow([f'audio/{name}', clip.family, clip.group])
  if copyright_path:
    with (
      open(copyright_path, encoding='utf-8') as src,
      open(os.path.join(out, 'LICENSE'), 'w', encoding='utf-8') as dst,
    ):
      dst.write(src.read())
  report(clips, names, audio_out, dropped, clipped)


def report(clips, names, audio_out, dropped, clipped) -> None:
  import soundfile as sf

  per_family = collections.defaultdict(lambda: [0, set(), set(), 0.0, 0, collections.Counter()])
  for clip, name in zip(clips, names):
    row = per_family[clip.family]
    path = os.path.join(audio_out, name)
    row[0] += 1
    row[1].add(clip.group)
    row[2].add(clip.program)
    row[3] += sf.info(path).duration
    row[4] += os.path.getsize(path)
    row[5][clip.sample.sample_rate] += 1
  print(
    '| family | clips | groups | programs with clips | seconds | kB | source sample rates (Hz: clips) |'
  )
  print('|---|---|---|---|---|---|---|')
  for family, _ in FAMILIES:
    if family not in per_family:
      continue
    n, groups, programs, seconds, size, rates = per_family[family]
    rates = ', '.join(f'{r}: {c}' for r, c in sorted(rates.items()))
    print(
      f'| {family} | {n} | {len(groups)} | {len(programs)} | {seconds:.1f} | {size / 1e3:,.0f} | {rates} |'
    )
  total = sum(r[4] for r in per_family.values())
  seconds = sum(r[3] for r in per_family.values())
  groups = sum(len(r[1]) for r in per_family.values())
  print(
    f'| **total** | **{len(clips)}** | **{groups}** | | **{seconds:.1f}** | **{total / 1e3:,.0f}** | |'
  )
  print(f'{total:,} bytes of FLAC')
  for family, groups in sorted(dropped.items()):
    print(f'dropped family {family}: {len(groups)} group(s) {groups} < {MIN_GROUPS}')
  if clipped:
    print(f'{len(clipped)} clips had samples clipped at int16 full scale: {clipped}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--deb', help=f'a downloaded {PACKAGE}_{PACKAGE_VERSION}_all.deb')
  source.add_argument('--sf2', help='an extracted FluidR3_GM.sf2 (LICENSE is then not rewritten)')
  parser.add_argument(
    '--out',
    default=os.path.dirname(os.path.abspath(__file__)),
    help="where to write (default: this script's folder)",
  )
  args = parser.parse_args(argv)
  if args.sf2:
    build(args.sf2, args.out)
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    deb = args.deb or download_deb(tmp)
    sf2_path, copyright_path = extract_deb(deb, os.path.join(tmp, 'deb'))
    build(sf2_path, args.out, copyright_path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
