"""Runs N trainer processes on this machine, joined by jax.distributed, to test multi-host code.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 [--port=auto]
      [--module=aasp_jax.main] [--grace_seconds=10] [--dry-run] -- ARGS...

Process i runs `python -m MODULE ARGS... --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` on CPU (JAX_PLATFORMS=cpu) with D fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D, any other XLA_FLAGS kept), so two processes
of four devices behave like two hosts of a pod slice: one 8-device mesh, process-local data
loading, cross-process collectives (gloo, jax's default on CPU).

Each child's output is streamed prefixed with `[pI] `. If a child fails, the others are stopped
(SIGTERM, then SIGKILL after the grace period) and the launcher exits with the failed child's
code (128 + signal number when a signal ended it), so a crash in one process never leaves the rest
waiting for a peer that will not come. --dry-run prints each child's command line, one per line.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits argv at the first `--`: launcher flags before it, the child's arguments after it."""
  if '--' in argv:
    cut = argv.index('--')
    argv, child_args = argv[:cut], argv[cut + 1 :]
  else:
    child_args = []
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1, help='fake CPU devices each')
  parser.add_argument('--port', default='auto', help="coordinator port, or 'auto' for a free one")
  parser.add_argument('--module', default='aasp_jax.main', help='run with python -m')
  parser.add_argument('--grace_seconds', type=float, default=10.0, help='SIGTERM to SIGKILL')
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true')
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be at least 1')
  if args.port != 'auto' and not args.port.isdigit():
    parser.error(f"--port must be a number or 'auto', not {args.port!r}")
  return args, child_args


def free_port() -> int:
  # The kernel picks an unused port; another program could take it before the coordinator binds
  # it, a race that is acceptable on a test machine.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env_updates(devices_per_process: int) -> dict[str, str]:
  """The environment entries every child gets on top of the launcher's own environment."""
  # An inherited device count (the test suite sets 8) would give every child the wrong number of
  # devices, so it is replaced; other XLA flags are the user's and are kept.
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return {
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': ' '.join(kept + [f'{DEVICE_COUNT_FLAG}={devices_per_process}']),
    # Lines reach the prefixer as they are printed, not when a child's buffer fills or it exits.
    'PYTHONUNBUFFERED': '1',
  }


def child_commands(args: argparse.Namespace, child_args: list[str], port: int) -> list[list[str]]:
  distributed = [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={args.num_processes}']
  return [
    [sys.executable, '-m', args.module, *child_args, *distributed, f'--process_id={i}']
    for i in range(args.num_processes)
  ]


def stream(proc: subprocess.Popen, prefix: bytes, lock: threading.Lock) -> None:
  """Copies a child's output to ours line by line, each line prefixed (one thread per child)."""
  for line in proc.stdout:
    with lock:
      sys.stdout.buffer.write(prefix + line)
      sys.stdout.buffer.flush()


def exit_code(returncode: int) -> int:
  # A child ended by a signal reports -signum; shells report that as 128 + signum.
  return 128 - returncode if returncode < 0 else returncode


def wait_for_first_failure(procs: list[subprocess.Popen]) -> int:
  """Waits until every child exited 0 (returns 0) or one failed (returns its exit code)."""
  while True:
    codes = [p.poll() for p in procs]
    for i, code in enumerate(codes):
      if code not in (None, 0):
        print(f'[launcher] p{i} exited with {exit_code(code)}', file=sys.stderr, flush=True)
        return exit_code(code)
    if all(code == 0 for code in codes):
      return 0
    time.sleep(0.05)


def stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
  """SIGTERM every child still running, then SIGKILL those still running after the grace period."""
  # Signals go to each child's process group (children start their own session), so processes a
  # child started itself, such as grain's data workers, stop with it.
  running = [p for p in procs if p.poll() is None]
  for p in running:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace_seconds
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def main(argv: list[str]) -> int:
  args, child_args = parse_args(argv)
  port = free_port() if args.port == 'auto' else int(args.port)
  commands = child_commands(args, child_args, port)
  env_updates = child_env_updates(args.devices_per_process)
  if args.dry_run:
    env_prefix = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env_updates.items())
    for command in commands:
      print(f'{env_prefix} {shlex.join(command)}')
    return 0

  # SIGTERM to the launcher (a CI timeout, a batch system) must also stop the children, which run
  # in their own sessions and would otherwise be left behind: turn it into an exit through the
  # `finally` below.
  def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, on_sigterm)
  env = {**os.environ, **env_updates}
  lock = threading.Lock()
  procs, threads = [], []
  try:
    for i, command in enumerate(commands):
      proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
      )
      procs.append(proc)
      thread = threading.Thread(target=stream, args=(proc, f'[p{i}] '.encode(), lock), daemon=True)
      thread.start()
      threads.append(thread)
    code = wait_for_first_failure(procs)
  except KeyboardInterrupt:
    code = 130
  finally:
    stop(procs, args.grace_seconds)
    for thread in threads:
      # A grandchild that outlived the kill could hold a pipe open; do not hang on it.
      thread.join(timeout=5)
  return code


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
