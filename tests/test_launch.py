"""Launchers: the cluster scripts print (and, with stand-in tools, execute) the right commands; the
local launcher runs real jax.distributed processes and stops them all when one fails.

No gcloud, xpk or SLURM is needed: the bash launchers run with --dry-run, and their remote command
strings are executed against stand-ins for aasp-pretrain, srun and scontrol.
"""

import importlib.util
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, 'launch')
# An argument that breaks naive quoting: spaces, a glob and a single quote.
TRICKY = "--config.data.train=gs://b/it's *.array_record"


def sh(script, *args, env=None, cwd=None):
  """Runs a launcher in a clean environment, so variables the developer exported (ZONE, BUCKET,
  WORKDIR...) cannot leak into the expectations."""
  base = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'), 'TMPDIR': '/tmp'}
  return subprocess.run(
    ['bash', os.path.join(LAUNCH, script), *args],
    check=False,
    env={**base, **(env or {})},
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=30,
  )


def lines_of(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(argv, name):
  """The value of `name=VALUE` or `name VALUE` in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith(name + '='):
      return arg[len(name) + 1 :]
    if arg == name:
      return argv[i + 1]
  raise AssertionError(f'{name} not in {argv}')


def fake_tool(directory, name, body):
  path = os.path.join(directory, name)
  with open(path, 'w') as f:
    f.write('#!/bin/bash\n' + body + '\n')
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


# ------------------------------------------------------------------------------------------------
# --help documents every variable the script reads.

# Per script: the variables it documents, and flags and commands its --help must mention.
HELP = {
  'tpu_vm.sh': (
    'TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT BUCKET DATA_BUCKET RUN_NAME'
    ' WORKDIR CONFIG REMOTE_DIR PYTHON_VERSION GIT_URL GIT_REF DRY_RUN'
  ).split(),
  'xpk.sh': (
    'CLUSTER ZONE PROJECT TPU_TYPE NUM_SLICES SPOT RESERVATION WORKLOAD BUCKET DATA_BUCKET WORKDIR'
    ' CONFIG DOCKER_IMAGE BASE_DOCKER_IMAGE MAX_RESTARTS PRIORITY DRY_RUN'
  ).split(),
  'slurm_gpu.sh': (
    'WORKDIR CONFIG NODES GPUS_PER_NODE CPUS_PER_GPU PARTITION ACCOUNT TIME_LIMIT JOB_NAME MODE'
    ' COORDINATOR PORT VENV CONTAINER_IMAGE CONTAINER_MOUNTS REPO_DIR LOG_DIR DRY_RUN'
  ).split(),
}
HELP_FLAGS = {
  'tpu_vm.sh': (
    '--name= --zone= --accelerator-type= --version= --spot --bucket= --data-bucket= --dry-run'
    ' create copy setup run logs stop delete all'
  ).split(),
  'xpk.sh': (
    '--cluster= --tpu-type= --num-slices= --docker-image= --base-docker-image= --data-bucket='
    ' cluster-create storage-attach run delete cluster-delete'
  ).split(),
  'slurm_gpu.sh': (
    '--workdir= --nodes= --gpus-per-node= --partition= --time= --per-node --explicit-coordinator'
    ' --port= --venv= --container-image='
  ).split(),
}


@pytest.mark.parametrize('script', sorted(HELP))
def test_help_documents_every_variable(script):
  variables, flags = HELP[script], HELP_FLAGS[script]
  result = sh(script, '--help')
  assert result.returncode == 0, result.stderr
  with open(os.path.join(LAUNCH, script)) as f:
    # Every `NAME=${NAME:-default}` line is a variable read from the environment.
    read = set(re.findall(r'^([A-Z_]+)=\$\{\1:-', f.read(), re.MULTILINE))
  assert read == set(variables)
  for word in variables + flags:
    assert re.search(rf'(^|[\s(`]){re.escape(word)}', result.stdout), f'{word} not in --help'


# ------------------------------------------------------------------------------------------------
# Missing required parameters fail before anything runs, naming the flag.


@pytest.mark.parametrize(
  'script,args,named',
  [
    ('tpu_vm.sh', ['create', '--zone=z'], '--name'),
    ('tpu_vm.sh', ['create', '--name=n'], '--zone'),
    ('tpu_vm.sh', ['all', '--name=n', '--zone=z'], '--bucket'),
    ('tpu_vm.sh', ['--name=n', '--zone=z'], 'no command'),
    ('tpu_vm.sh', ['create', '--name=n', '--zone=z', '--accelerator-type=v9-8'], '--version'),
    ('xpk.sh', ['run', '--zone=z', '--workload=w', '--bucket=b'], '--cluster'),
    ('xpk.sh', ['run', '--cluster=c', '--zone=z', '--bucket=b'], '--workload'),
    ('xpk.sh', ['run', '--cluster=c', '--zone=z', '--workload=w'], '--bucket'),
    ('xpk.sh', ['storage-attach', '--cluster=c', '--zone=z'], '--data-bucket'),
    ('xpk.sh', ['storage-attach', '--cluster=c', '--zone=z', '--data-bucket=B!'], '--data-bucket'),
    ('tpu_vm.sh', ['run', '--name=n', '--zone=z', '--bucket=b', '--data-bucket=a b'], 'bucket'),
    ('slurm_gpu.sh', [], '--workdir'),
    ('slurm_gpu.sh', ['--workdir=/w', '--nodes=zero'], '--nodes'),
    ('slurm_gpu.sh', ['--workdir=/w', '--nodes'], '--nodes=VALUE'),
  ],
)
def test_missing_required_parameter_is_named(script, args, named):
  result = sh(script, *args, '--dry-run')
  assert result.returncode != 0
  assert named in result.stderr
  assert result.stdout == ''  # nothing was printed as if it would run


# ------------------------------------------------------------------------------------------------
# tpu_vm.sh


def test_tpu_vm_all_dry_run_creates_copies_sets_up_and_runs_on_every_worker():
  out = lines_of(
    sh(
      'tpu_vm.sh',
      'all',
      '--name=aasp-v5p',
      '--zone=us-east5-a',
      '--spot',
      '--dry-run',
      '--',
      '--config.global_batch=512',
      TRICKY,
      env={'BUCKET': 'my-bucket', 'PROJECT': 'proj'},
    )
  )
  create, pack, scp, unpack, setup, run = out
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'aasp-v5p']
  assert flag(create, '--zone') == 'us-east5-a'
  assert flag(create, '--project') == 'proj'
  assert flag(create, '--accelerator-type') == 'v5p-64'
  assert flag(create, '--version') == 'v2-alpha-tpuv5'  # derived from the generation
  assert '--spot' in create
  assert pack[0] == 'bash' and 'ls-files' in pack[2] and 'tar -czf' in pack[2]
  assert scp[4] == 'scp' and scp[-1] == '--worker=all' and scp[-3] == '--zone=us-east5-a'
  for ssh in (unpack, setup, run):
    assert ssh[4:6] == ['ssh', 'aasp-v5p']
    assert flag(ssh, '--worker') == 'all'
    assert flag(ssh, '--zone') == 'us-east5-a'
  assert "-e '.[tpu]'" in flag(setup, '--command')
  remote = flag(run, '--command')
  assert 'nohup .venv/bin/aasp-pretrain' in remote and '> runs/aasp-v5p.log' in remote


def test_tpu_vm_remote_run_command_reaches_the_trainer_intact(tmp_path):
  """Executes the `run` command string in a fake home with a stand-in trainer on the 'host'."""
  result = sh(
    'tpu_vm.sh',
    'run',
    '--name=t',
    '--zone=z',
    '--run-name=r1',
    '--dry-run',
    '--config=configs/pretrain.py:variant=tiny',
    '--bucket=gs://bkt',
    '--',
    TRICKY,
  )
  (ssh,) = lines_of(result)
  fake_bin = tmp_path / 'aasp-jax' / '.venv' / 'bin'
  fake_bin.mkdir(parents=True)
  fake_tool(str(fake_bin), 'aasp-pretrain', 'printf "%s\\n" "$@"')
  subprocess.run(['bash', '-c', flag(ssh, '--command')], cwd=tmp_path, check=True, timeout=10)
  log = tmp_path / 'aasp-jax' / 'runs' / 'r1.log'
  deadline = time.monotonic() + 10  # the trainer runs in the background
  while not (log.exists() and TRICKY in log.read_text()) and time.monotonic() < deadline:
    time.sleep(0.02)
  assert log.read_text().splitlines() == [
    '--config=configs/pretrain.py:variant=tiny',
    '--workdir=gs://bkt/aasp/r1',
    '--distributed=on',
    TRICKY,
  ]
  assert (tmp_path / 'aasp-jax' / 'runs' / 'r1.pid').read_text().strip().isdigit()


def test_tpu_vm_other_commands():
  out = lines_of(
    sh(
      'tpu_vm.sh',
      'logs',
      'stop',
      'delete',
      '--name=t',
      '--zone=z',
      '--dry-run',
      env={'ACCELERATOR_TYPE': 'v6e-16'},
    )
  )
  logs, stop, delete = out
  assert flag(logs, '--worker') == '0' and 'tail' in flag(logs, '--command')
  assert flag(stop, '--worker') == 'all' and 'kill' in flag(stop, '--command')
  assert delete[4:6] == ['delete', 't'] and flag(delete, '--zone') == 'z'
  (create,) = lines_of(
    sh(
      'tpu_vm.sh', 'create', '--name=t', '--zone=z', '--dry-run', env={'ACCELERATOR_TYPE': 'v6e-16'}
    )
  )
  assert flag(create, '--version') == 'v2-alpha-tpuv6e' and '--spot' not in create
  (clone,) = lines_of(
    sh(
      'tpu_vm.sh',
      'copy',
      '--name=t',
      '--zone=z',
      '--dry-run',
      '--git-url=https://example.com/aasp.git',
      '--git-ref=v1',
    )
  )
  remote = flag(clone, '--command')
  assert flag(clone, '--worker') == 'all'
  assert 'git clone --quiet https://example.com/aasp.git aasp-jax' in remote
  assert 'fetch --quiet origin v1' in remote


def _mount_stand_ins(directory, have_gcsfuse):
  """Stand-ins for the tools the remote mount uses; each records its arguments in `calls`."""
  calls = os.path.join(directory, 'calls')
  record = f'echo "$(basename "$0") $*" >> {calls}'
  fake_tool(directory, 'mountpoint', record + '\nexit 1')  # not mounted yet
  for tool in ('sudo', 'curl', 'lsb_release'):
    fake_tool(directory, tool, record + ('\necho jammy' if tool == 'lsb_release' else ''))
  if have_gcsfuse:
    fake_tool(directory, 'gcsfuse', record)
  return calls


@pytest.mark.parametrize('have_gcsfuse', [True, False])
def test_tpu_vm_run_mounts_the_data_bucket_before_training(tmp_path, have_gcsfuse):
  """Executes the `run` command with stand-ins for mountpoint, sudo, gcsfuse, curl: the bucket is
  mounted read-only at /gcs/BUCKET (gcsfuse installed first where missing), then training starts
  with its arguments intact."""
  (ssh,) = lines_of(
    sh('tpu_vm.sh', 'run', '--name=t', '--zone=z', '--run-name=r1', '--bucket=bkt',
       '--data-bucket=gs://my-data', '--dry-run', '--', TRICKY)
  )  # fmt: skip
  tools = tmp_path / 'tools'
  tools.mkdir()
  calls = _mount_stand_ins(str(tools), have_gcsfuse)
  fake_bin = tmp_path / 'aasp-jax' / '.venv' / 'bin'
  fake_bin.mkdir(parents=True)
  fake_tool(str(fake_bin), 'aasp-pretrain', 'printf "%s\\n" "$@"')
  # Without gcsfuse on PATH, the install runs through the stand-in sudo, which installs nothing;
  # the mount then fails, and training must not start.
  env = {'PATH': f'{tools}:/usr/bin:/bin', 'HOME': str(tmp_path)}
  ran = subprocess.run(
    ['bash', '-c', flag(ssh, '--command')], cwd=tmp_path, env=env, capture_output=True, timeout=10
  )
  recorded = open(calls).read().splitlines()
  assert recorded[0] == 'mountpoint -q /gcs/my-data'
  log = tmp_path / 'aasp-jax' / 'runs' / 'r1.log'
  if have_gcsfuse:
    assert ran.returncode == 0, ran.stderr
    assert recorded[1:] == [
      'sudo mkdir -p /gcs/my-data',
      f'sudo chown {os.getuid()}:{os.getgid()} /gcs/my-data',
      'gcsfuse -o ro --implicit-dirs my-data /gcs/my-data',
    ]
    deadline = time.monotonic() + 10  # the trainer runs in the background
    while not (log.exists() and TRICKY in log.read_text()) and time.monotonic() < deadline:
      time.sleep(0.02)
    assert log.read_text().splitlines()[-1] == TRICKY
  else:
    assert any(c.startswith('curl ') for c in recorded)
    assert any('apt-get install -y -qq gcsfuse' in c for c in recorded)
    assert ran.returncode != 0 and not log.exists()


# ------------------------------------------------------------------------------------------------
# xpk.sh


def test_xpk_dry_run():
  out = lines_of(
    sh(
      'xpk.sh',
      'cluster-create',
      'run',
      'delete',
      'cluster-delete',
      '--cluster=aasp',
      '--zone=us-east5-a',
      '--project=proj',
      '--tpu-type=v5p-128',
      '--num-slices=2',
      '--spot',
      '--workload=aasp-b16',
      '--bucket=my-bucket',
      '--dry-run',
      '--',
      '--config.global_batch=1024',
    )
  )
  cluster_create, workload, delete, cluster_delete = out
  for cmd in out:
    assert flag(cmd, '--cluster') == 'aasp' and flag(cmd, '--zone') == 'us-east5-a'
    assert flag(cmd, '--project') == 'proj'
  assert cluster_create[:3] == ['xpk', 'cluster', 'create'] and '--spot' in cluster_create
  assert flag(cluster_create, '--tpu-type') == 'v5p-128'
  assert flag(cluster_create, '--num-slices') == '2'
  assert workload[:3] == ['xpk', 'workload', 'create']
  assert flag(workload, '--workload') == 'aasp-b16'
  assert flag(workload, '--tpu-type') == 'v5p-128' and flag(workload, '--num-slices') == '2'
  assert flag(workload, '--base-docker-image') == 'python:3.12-slim'
  assert flag(workload, '--script-dir') == REPO_ROOT
  command = flag(workload, '--command')
  assert command.startswith(
    "python3 -m pip install --quiet --root-user-action=ignore -e '.[tpu]' && "
  )
  assert command.endswith(
    'aasp-pretrain --config=configs/pretrain_base.py --workdir=gs://my-bucket/aasp/aasp-b16 '
    '--distributed=auto --config.global_batch=1024'
  )
  assert delete[:3] == ['xpk', 'workload', 'delete'] and flag(delete, '--workload') == 'aasp-b16'
  assert cluster_delete[:3] == ['xpk', 'cluster', 'delete']
  assert '--enable-gcsfuse-csi-driver' not in cluster_create
  assert not any(a.startswith('--storage') for a in workload)


def test_xpk_data_bucket_is_attached_and_mounted():
  out = lines_of(
    sh('xpk.sh', 'cluster-create', 'storage-attach', 'run', '--cluster=c', '--zone=z',
       '--workload=w', '--bucket=b', '--data-bucket=gs://my.data', '--dry-run')
  )  # fmt: skip
  cluster_create, attach, workload = out
  assert '--enable-gcsfuse-csi-driver' in cluster_create
  assert attach[:4] == ['xpk', 'storage', 'attach', 'aasp-data-my-data']
  assert flag(attach, '--type') == 'gcsfuse' and flag(attach, '--bucket') == 'my.data'
  assert flag(attach, '--mount-point') == '/gcs/my.data' and flag(attach, '--readonly') == 'true'
  assert flag(attach, '--cluster') == 'c' and flag(attach, '--zone') == 'z'
  assert flag(workload, '--storage') == 'aasp-data-my-data'


def test_xpk_docker_image_command_reaches_the_trainer_intact(tmp_path):
  (workload,) = lines_of(
    sh(
      'xpk.sh',
      'run',
      '--cluster=c',
      '--zone=z',
      '--workload=w',
      '--workdir=gs://b/run',
      '--docker-image=gcr.io/p/aasp:1',
      '--dry-run',
      '--',
      TRICKY,
    )
  )
  assert flag(workload, '--docker-image') == 'gcr.io/p/aasp:1'
  assert not any(a.startswith('--base-docker-image') for a in workload)
  fake_tool(str(tmp_path), 'aasp-pretrain', 'printf "%s\\n" "$@"')
  env = {'PATH': f'{tmp_path}:{os.environ["PATH"]}'}
  ran = subprocess.run(
    ['bash', '-c', flag(workload, '--command')],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=10,
  )
  assert ran.stdout.splitlines() == [
    '--config=configs/pretrain_base.py',
    '--workdir=gs://b/run',
    '--distributed=auto',
    TRICKY,
  ]


# ------------------------------------------------------------------------------------------------
# slurm_gpu.sh: the dry run is a script; run it with stand-ins for sbatch, srun, scontrol and the
# trainer, and check what each task's trainer receives.


def run_slurm_dry_run(tmp_path, *args):
  log_dir = tmp_path / 'logs'
  result = sh(
    'slurm_gpu.sh',
    '--workdir=/ckpt/b16',
    f'--log-dir={log_dir}',
    '--nodes=2',
    '--partition=gpu',
    '--dry-run',
    *args,
  )
  assert result.returncode == 0, result.stderr
  assert not log_dir.exists()  # a dry run writes nothing
  fakes = tmp_path / 'bin'
  fakes.mkdir()
  # sbatch runs the job script at once as if on its first node; srun runs the task command once,
  # as process 3 of 16, after recording its own flags.
  fake_tool(str(fakes), 'sbatch', 'SLURM_JOB_NODELIST="gpu[07-08]" exec bash "$1"')
  fake_tool(
    str(fakes),
    'srun',
    'echo "srun $*" >&2; while [[ $1 == --* ]]; do shift; done\n'
    'SLURM_NTASKS=16 SLURM_PROCID=3 exec "$@"',
  )
  fake_tool(
    str(fakes), 'scontrol', '[[ "$*" == "show hostnames gpu[07-08]" ]]\nprintf "gpu07\\ngpu08\\n"'
  )
  fake_tool(
    str(fakes),
    'aasp-pretrain',
    'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"\nprintf "%s\\n" "$@"',
  )
  env = {**os.environ, 'PATH': f'{fakes}:{os.environ["PATH"]}'}
  ran = subprocess.run(
    ['bash', '-c', result.stdout], check=False, env=env, capture_output=True, text=True, timeout=10
  )
  assert ran.returncode == 0, ran.stderr
  script = (log_dir / 'aasp-pretrain.sbatch').read_text()
  (srun_line,) = [line for line in ran.stderr.splitlines() if line.startswith('srun ')]
  return result.stdout, script, srun_line.split(), ran.stdout.splitlines()


def test_slurm_per_gpu_auto(tmp_path):
  printed, script, srun, trainer = run_slurm_dry_run(
    tmp_path, '--', '--config.global_batch=96', TRICKY
  )
  assert printed.splitlines()[-1] == f'sbatch {tmp_path}/logs/aasp-pretrain.sbatch'
  for line in [
    '#SBATCH --nodes=2',
    '#SBATCH --ntasks-per-node=8',
    '#SBATCH --gpus-per-node=8',
    '#SBATCH --partition=gpu',
    f'#SBATCH --output={tmp_path}/logs/%x-%j.out',
  ]:
    assert line in script.splitlines()
  assert '--ntasks-per-node=8' in srun and '--cpus-per-task=12' in srun
  assert '--gpus-per-task' not in ' '.join(srun)  # every task must see all GPUs (SLURM_LOCALID)
  assert trainer == [
    'JAX_LOCAL_DEVICE_IDS=',
    '--config=configs/pretrain_base.py',
    '--workdir=/ckpt/b16',
    '--distributed=auto',
    '--config.global_batch=96',
    TRICKY,
  ]


def test_slurm_per_node_explicit_coordinator(tmp_path):
  _, script, srun, trainer = run_slurm_dry_run(
    tmp_path,
    '--per-node',
    '--explicit-coordinator',
    '--port=23456',
    '--gpus-per-node=4',
    '--',
    TRICKY,
  )
  assert '#SBATCH --ntasks-per-node=1' in script.splitlines()
  assert '#SBATCH --gpus-per-node=4' in script.splitlines()
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
  assert '--ntasks-per-node=1' in srun and '--cpus-per-task=48' in srun
  assert trainer == [
    'JAX_LOCAL_DEVICE_IDS=0,1,2,3',  # one process drives all of its node's GPUs
    '--config=configs/pretrain_base.py',
    '--workdir=/ckpt/b16',
    TRICKY,
    '--coordinator_address=gpu07:23456',
    '--num_processes=16',
    '--process_id=3',
  ]


def test_slurm_container_and_venv():
  result = sh(
    'slurm_gpu.sh',
    '--workdir=/w',
    '--container-image=nvcr.io/x/jax:1',
    '--dry-run',
    '--container-mounts=/data:/data',
    '--venv=/opt/venv',
    '--repo-dir=/src/aasp',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 'cd /src/aasp' in lines and 'source /opt/venv/bin/activate' in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith('srun ')]
  assert flag(srun, '--container-image') == 'nvcr.io/x/jax:1'
  assert flag(srun, '--container-mounts') == '/src/aasp:/src/aasp,/data:/data'
  assert flag(srun, '--container-workdir') == '/src/aasp'


# ------------------------------------------------------------------------------------------------
# local_multiprocess.py


def load_local_launcher():
  spec = importlib.util.spec_from_file_location(
    'local_multiprocess', os.path.join(LAUNCH, 'local_multiprocess.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_local_dry_run_prints_one_command_per_process(monkeypatch, capsys):
  # The suite's XLA_FLAGS ask for 8 devices: children get their own count, other flags are kept.
  monkeypatch.setenv(
    'XLA_FLAGS', '--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8'
  )
  launcher = load_local_launcher()
  code = launcher.main(
    [
      '--num_processes=2',
      '--devices_per_process=4',
      '--port=4321',
      '--dry-run',
      '--',
      '--config=configs/pretrain.py',
      'a b',
    ]
  )
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:3] == [
      'JAX_PLATFORMS=cpu',
      'XLA_FLAGS=--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=4',
      'PYTHONUNBUFFERED=1',
    ]
    assert argv[3:] == [
      sys.executable,
      '-m',
      'aasp_jax.main',
      '--config=configs/pretrain.py',
      'a b',
      '--coordinator_address=127.0.0.1:4321',
      '--num_processes=2',
      f'--process_id={i}',
    ]


def run_local(*args, timeout=120):
  start = time.monotonic()
  result = subprocess.run(
    [sys.executable, os.path.join(LAUNCH, 'local_multiprocess.py'), *args],
    check=False,
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return result, time.monotonic() - start


def test_local_two_processes_form_one_eight_device_job():
  result, _ = run_local(
    '--num_processes=2',
    '--devices_per_process=4',
    '--module=tests.launch_probe_child',
    '--',
    '--unknown_trainer_flag=1',
  )
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    mine = [line for line in result.stdout.splitlines() if line.startswith(f'[p{i}] ')]
    assert f'[p{i}] process_index={i} process_count=2 devices=8 local_devices=4' in mine
    # Each process contributed 4 rows of 2 values equal to its index + 1: 8 * 1 + 8 * 2 = 24,
    # computed by gloo collectives across the two processes.
    assert f'[p{i}] global_sum=24.0 collectives=gloo' in mine


def test_local_failing_child_stops_the_others_and_sets_the_exit_code():
  result, elapsed = run_local(
    '--num_processes=2',
    '--devices_per_process=4',
    '--grace_seconds=5',
    '--module=tests.launch_probe_child',
    '--',
    '--fail_process=1',
    timeout=60,
  )
  assert result.returncode == 3, result.stdout + result.stderr
  assert '[p1] failing on purpose' in result.stdout
  assert 'p1 exited with 3' in result.stderr
  # Process 0 would otherwise wait for process 1 in jax.distributed.initialize for 60 s.
  assert elapsed < 30
