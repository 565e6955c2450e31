"""Run infrastructure shared by every script: the errors that end a run with one clear line,
atomic file writes with OS-error messages, output-folder checks, distributed set-up and thread caps.

    atomic_write(path, lambda f: f.write(data))   # temp file + rename; OutputError names folder and cause
    check_writable(work_dir)                        # fail now, not after hours of training
    rank, world, device = setup_distributed()       # torchrun's environment, nanoGPT style
    print0('only rank 0 prints')
    exit_error(e)                                   # 'error: <message>' on stderr, exit status 2

Holds nothing of the method, the data or the models. Imports only the standard library and torch;
every other module of the project may import it.
"""
import datetime
import errno
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------
# Errors that end a run with one line
# --------------------------------------------------------------------------

class DataError(Exception):
    """A data problem (missing folder, unreadable file, wrong format); the message says how to fix it.

    Raised in a DataLoader worker, it reaches the main process as type(e)(text) with the text
    'Caught DataError in DataLoader worker process 0.', the worker's traceback and its last line
    'mic_data.DataError: <message>'. The message is recovered from that text here, so that every
    script prints one line; the text stays in `worker_traceback`.
    """

    def __init__(self, message='', *args):
        self.worker_traceback = None
        if isinstance(message, str) and message.startswith(f'Caught {type(self).__name__} in DataLoader worker'):
            # the traceback's last line is '<module>.<class name>: <message>' (the message may span lines)
            lines = list(re.finditer(rf'^(?:[\w.]+\.)?{type(self).__name__}: ', message, re.MULTILINE))
            if lines:
                self.worker_traceback = message
                message = message[lines[-1].end():].rstrip('\n')
        super().__init__(message, *args)


class OutputError(DataError):
    """An output file or folder cannot be written: read-only file system, full disk, no permission,
    impossible path. The message names the folder, the cause and what to do."""


def exit_error(message):
    """How every script stops on a clear error: one line 'error: <message>' on stderr and exit
    status 2 (argparse's status for usage errors too). `message` may be an exception."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)



# --------------------------------------------------------------------------
# Writing files atomically, with messages that name the folder and the cause
# --------------------------------------------------------------------------

# errno -> (cause, what to do); {folder} is the output folder
_WRITE_FAULTS = {
    errno.EROFS: ('{folder} is on a read-only file system', 'choose a folder on a writable disk'),
    errno.ENOSPC: ('no space is left on the disk of {folder}', 'free some space or choose a folder on another disk'),
    errno.EDQUOT: ('the disk quota of {folder} is used up', 'free some space or choose a folder on another disk'),
    errno.EFBIG: ('the file is too large for the file system of {folder}', 'choose a folder on another disk'),
    errno.EACCES: ('permission denied in {folder}', 'choose a folder you can write to, or change its permissions'),
    errno.EPERM: ('permission denied in {folder}', 'choose a folder you can write to, or change its permissions'),
    errno.ENOENT: ('the folder {folder} does not exist', 'create it or choose an existing folder'),
    errno.ENOTDIR: ('a part of {folder} is a file, not a folder', 'choose another folder'),
    errno.EISDIR: ('a folder has the name of the file', 'remove that folder or choose another one'),
}


def _errno_text(e):
    return f'[{errno.errorcode.get(e.errno, e.errno)}] {e.strerror or e}'


def output_error(e, path, folder=None, what=None):
    """OutputError for the OSError `e` raised while writing `path` (a file in `folder`):
    '<what, default: cannot write PATH>: <cause naming the folder> ([ERRNO] text); <what to do>'."""
    folder = folder or os.path.dirname(os.path.abspath(path))
    cause, advice = _WRITE_FAULTS.get(e.errno, ('{folder}: ' + str(e.strerror or e), 'choose another folder'))
    return OutputError(f'{what or f"cannot write {path}"}: {cause.format(folder=folder)} ({_errno_text(e)}); {advice}')


def make_dirs(folder):
    """os.makedirs(folder, exist_ok=True); OutputError (naming the folder and the cause) when impossible."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parent = os.path.abspath(folder)
        while not os.path.isdir(parent):  # the deepest folder that exists
            parent = os.path.dirname(parent)
        if isinstance(e, FileExistsError) or e.errno == errno.ENOTDIR:
            cause = 'a file of that name (or of one of its parents) exists'
        elif e.errno == errno.ENOENT:  # e.g. under /proc: the parent exists but takes no new folders
            cause = f'{parent} does not allow new folders'
        else:
            cause = _WRITE_FAULTS.get(e.errno, ('{folder}: ' + str(e.strerror), ''))[0].format(folder=parent)
        raise OutputError(f'cannot create the folder {folder}: {cause} ({_errno_text(e)}); '
                          f'choose another output folder') from None


def check_writable(folder):
    """Create `folder` if needed and write (then delete) a small hidden file in it, so that a
    read-only, full or forbidden output folder fails now with OutputError, not after hours of work."""
    make_dirs(folder)
    probe = os.path.join(folder, f'.write_check.{secrets.token_hex(4)}.tmp')  # a temp file (is_temp_file)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(b'MIC write check\n')
        finally:
            os.unlink(probe)
    except OSError as e:
        raise output_error(e, probe, folder, what=f'cannot write to the folder {folder}') from None


def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(f) on a temporary file beside `path`, then rename it to `path`.

    A crash never leaves a half-written file under the final name; leftovers are hidden files
    named '.<name>.<random>.tmp' in the same folder. An OSError while writing (read-only file
    system, full disk, permissions, missing folder) removes the temporary file, keeps an existing
    `path` as it was and raises OutputError naming the folder, the cause and what to do.
    """
    folder = os.path.dirname(path) or '.'
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{secrets.token_hex(4)}.tmp')
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the usual umask permissions
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise output_error(e, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error_in(e)
        if cause is not None:
            raise output_error(cause, path) from None
        raise


def _os_error_in(e):
    """The OSError (with an errno) that `e` is or arose from: a writer may replace the OSError of
    its file by its own error while cleaning up (torch.save: RuntimeError 'unexpected pos')."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def remove_temp_files(folder):
    """Delete the hidden temporary files that a killed atomic_write left in `folder`; their names.
    In a run folder only through RunLock.remove_temp_files: a live run's write looks the same."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if is_temp_file(name):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def is_temp_file(name):
    """True for the leftover temporary files of an interrupted atomic_write."""
    return name.startswith('.') and name.endswith('.tmp')


def save_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode='w')


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode='w')



# --------------------------------------------------------------------------
# Processes: torchrun set-up (nanoGPT style) and thread caps
# --------------------------------------------------------------------------

DIST_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a rank that died, then fails


def setup_distributed(device=None):
    """(rank, world_size, device) from torchrun's environment variables.

    Without RANK in the environment: (0, 1, device or cuda if available else cpu). Under torchrun the
    process group is initialised (NCCL on GPUs, device from LOCAL_RANK; gloo on the CPU) unless it
    already is. device: 'cpu', 'cuda' or None (cuda when available).
    """
    want = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(want)
    local = int(os.environ.get('LOCAL_RANK', 0))
    if str(want).startswith('cuda'):
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
        if not dist.is_initialized():
            dist.init_process_group('nccl', device_id=dev, timeout=DIST_TIMEOUT)
    else:
        dev = torch.device('cpu')
        if not dist.is_initialized():
            dist.init_process_group('gloo', timeout=DIST_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), dev


def is_main():
    """True on rank 0, or when not distributed: the process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def usable_cores():
    """The CPU cores this process may use: its affinity mask (taskset, a container's cpuset),
    lowered to a cgroup v2 CPU quota (docker --cpus) when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open('/sys/fs/cgroup/cpu.max') as f:
            quota, period = f.read().split()[:2]
        if quota != 'max':
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def limit_threads(local_world_size=None):
    """Cap this process's torch intra-op threads at usable_cores() divided by the processes of
    this node (local_world_size; default: torchrun's LOCAL_WORLD_SIZE, else 1). Never raises the
    number (OMP_NUM_THREADS=1 stays 1). Returns the number of threads now used."""
    if local_world_size is None:
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    limit = max(1, usable_cores() // max(1, int(local_world_size)))
    if torch.get_num_threads() > limit:
        torch.set_num_threads(limit)
    return torch.get_num_threads()



# --------------------------------------------------------------------------
# Stopping on request: SIGTERM (Slurm, Kubernetes, torchrun), SIGUSR1 (Slurm's warning), SIGINT (Ctrl-C)
# --------------------------------------------------------------------------

STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGINT')


def stop_exit_status(name):
    """The exit status after a requested stop: 128 + the signal's number, the status a shell gives
    a process killed by that signal (SIGINT 130, SIGUSR1 138, SIGTERM 143). Never 0: the run is not
    finished, so a supervisor that restarts failed jobs (Kubernetes, torchrun --max-restarts, a job
    script that requeues on failure) restarts it, and --resume continues where it stopped."""
    return 128 + int(getattr(signal, name))


class StopSignals:
    """Turns SIGTERM, SIGUSR1 and SIGINT into a request that the run loop reads between iterations.

        with StopSignals() as stop:
            for it in range(start, max_iters):
                ...one iteration...
                if stop.agreed(device):       # the same answer on every rank (one tiny all_reduce)
                    save(it + 1); sys.exit(stop_exit_status(stop.requested()))

    The handlers only record the signal: the first one wins, and later SIGTERM/SIGUSR1 and a second
    SIGINT are ignored, so that a second Ctrl-C while the checkpoint is written raises nothing. A
    third SIGINT aborts at once (KeyboardInterrupt, no checkpoint): the escape from a run that hangs
    (a stuck data loader or collective) and never reaches the next check. DataLoader workers forked
    inside the block inherit the handlers, so a signal to the whole process group leaves them quiet;
    the main process shuts them down. On exit the previous handlers come back.

    Only the main thread may install signal handlers; elsewhere the object does nothing.
    """

    def __init__(self, names=STOP_SIGNALS):
        self.names = tuple(names)
        self.name = None  # the first signal received
        self.interrupts = 0  # SIGINTs received
        self._previous = {}
        self._flag = self._host = self._event = self._work = None  # the pending distributed check
        self._agreed = None
        self.checkpoint_due = False  # the agreed answer to agreed()'s `checkpoint_due` (time-based checkpoints)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc):
        self.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _record(self, signum, frame):
        # No printing here: a handler runs between two bytecodes, possibly inside a print to the same stream.
        name = signal.Signals(signum).name
        if self.name is None:
            self.name = name
        if name == 'SIGINT':
            self.interrupts += 1
            if self.interrupts >= 3:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt

    def requested(self):
        """The name of the first stop signal received ('SIGTERM', ...), or None."""
        return self.name

    def agreed(self, device=None, checkpoint_due=False):
        """The stop signal every rank agrees on, or None; call it once per iteration on every rank.

        checkpoint_due: this rank's wish for a checkpoint (train.ckpt_minutes passed on its clock); the
        agreed answer (any rank's wish) is in self.checkpoint_due afterwards, so that all ranks save together.
        Not distributed: requested() and checkpoint_due as given. Under torchrun: each call posts this
        rank's flags (the signal's number, 0 for none; the wish) to an asynchronous all_reduce (MAX) and
        returns the result of the previous call's all_reduce, so that every rank gets the same answer at
        the same call, one iteration after the signal at the latest. Waiting for the previous result costs
        no host synchronisation with the current iteration's work: on a GPU the result is copied to
        pinned host memory behind an event.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self.checkpoint_due = bool(checkpoint_due)
            return self.requested()
        answer = self._collect()
        self._post(torch.device(device) if device is not None else torch.device('cpu'), checkpoint_due)
        return answer

    def _post(self, device, checkpoint_due):
        if self._flag is None:
            self._flag = torch.zeros(2, dtype=torch.int32, device=device)
            pinned = device.type == 'cuda'
            self._host = torch.zeros(2, dtype=torch.int32, pin_memory=pinned)
            self._event = torch.cuda.Event() if device.type == 'cuda' else None
        # one host-to-device copy of two numbers; non_blocking from pageable memory is still ordered on the stream
        self._flag.copy_(torch.tensor([int(getattr(signal, self.name)) if self.name else 0, int(bool(checkpoint_due))],
                                      dtype=torch.int32), non_blocking=True)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        if self._event is not None:
            self._work.wait()  # NCCL: the current stream waits for the collective, the host does not
            self._host.copy_(self._flag, non_blocking=True)
            self._event.record()

    def _collect(self):
        self.checkpoint_due = False
        if self._work is None:
            return self._agreed
        if self._event is not None:
            self._event.synchronize()  # waits for the previous iteration's flag only
        else:
            self._work.wait()
            self._host.copy_(self._flag)
        self._work = None
        code, due = self._host.tolist()
        self.checkpoint_due = bool(due)
        if code and self._agreed is None:
            self._agreed = signal.Signals(code).name
            if self.name is None:  # another rank was signalled: this one stops for the same reason
                self.name = self._agreed
        return self._agreed

    def close(self):
        """Wait for a pending all_reduce (before the process group is destroyed)."""
        if self._work is not None:
            self._work.wait()
            self._work = None



# --------------------------------------------------------------------------
# One training per run folder: the lock file
# --------------------------------------------------------------------------

LOCK_NAME = '.lock'


class RunLockError(RuntimeError):
    """The run folder is in use by another run (or holds a lock this process cannot judge)."""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """The lock file RUN/.lock ({host, pid, since}) that keeps a second training out of a run folder.

        with RunLock(work_dir) as lock:   # RunLockError names the run that holds the folder
            if lock.took_over: print(lock.took_over)   # a stale lock of a dead process was replaced
            remove_temp_files(work_dir)   # safe now: no other run writes here

    Created with O_CREAT | O_EXCL, so of two runs started at once exactly one gets it. A lock of a
    process on this host that no longer exists is stale and taken over (took_over says whose it was).
    A lock of another host cannot be checked from here: refused, with the command that removes it.
    Released (deleted, if still ours) on exit; a run killed with SIGKILL leaves it for the next one to
    take over.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.took_over = None
        self.held = False
        self.owner = {'host': socket.gethostname(), 'pid': os.getpid(),
                      'since': datetime.datetime.now().isoformat(timespec='seconds')}

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self):
        make_dirs(self.folder)
        for _ in range(3):  # create; on a stale lock remove it and create again (another run may race us)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                self._judge(self._read())
                continue
            except OSError as e:
                raise output_error(e, self.path, self.folder, what=f'cannot lock the run folder {self.folder}') \
                    from None
            with os.fdopen(fd, 'w') as f:
                json.dump(self.owner, f)
            self.held = True
            return self
        raise RunLockError(f'could not lock {self.folder}: another run keeps taking {self.path}')

    def _read(self):
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None  # released in the meantime: try again
        except (OSError, ValueError):
            return {}  # empty or damaged (its writer died right after creating it)

    def _judge(self, owner):
        """Return to try again (the lock was stale and is removed, or vanished), else raise."""
        if owner is None:
            return
        host, pid, since = owner.get('host'), owner.get('pid'), owner.get('since', '?')
        remove = f'if no training runs in this folder, delete the lock: rm {self.path}'
        if host == self.owner['host'] and isinstance(pid, int) and not _pid_alive(pid):
            os.unlink(self.path)
            self.took_over = (f'note: took over the lock of {self.folder} left by process {pid} '
                              f'(started {since}), which no longer runs')
            return
        if host == self.owner['host'] and isinstance(pid, int):
            raise RunLockError(f'{self.folder} is in use by another training (process {pid} on this host, '
                               f'{host}, since {since}); wait for it to end, stop it (kill {pid}: it saves and '
                               f'exits), or choose another train.work_dir. If that process is not a training '
                               f'(its number was reused), {remove}')
        if host is None or not isinstance(pid, int):
            raise RunLockError(f'{self.folder} is locked ({self.path} is unreadable or incomplete); {remove}')
        raise RunLockError(f'{self.folder} is in use by another training (process {pid} on host {host}, '
                           f'since {since}); this host cannot check whether it still runs. Wait for it to end, '
                           f'or choose another train.work_dir; {remove}')

    def remove_temp_files(self):
        """remove_temp_files(run folder), allowed only while the lock is held: another live run's
        checkpoint write in progress looks exactly like the leftover of a killed one."""
        if not self.held:
            raise RuntimeError(f'remove_temp_files of {self.folder} without holding its lock')
        return remove_temp_files(self.folder)

    def release(self):
        """Delete the lock file if it is still this process's."""
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner and owner.get('host') == self.owner['host'] and owner.get('pid') == self.owner['pid']:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def die_with_parent(parent_pid=None):
    """Have the kernel kill this process (SIGKILL) when its parent dies; for DataLoader workers
    (worker_init_fn), which otherwise notice a dead main process only at their next status check,
    seconds later. parent_pid: the main process's PID, read before the workers start (if this process
    already has another parent, that one died: exit now). Linux only (prctl PR_SET_PDEATHSIG);
    elsewhere nothing. Returns True when set."""
    if not sys.platform.startswith('linux'):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    if ok and parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)
    return ok
